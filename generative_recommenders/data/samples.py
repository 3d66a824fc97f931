"""Train/evaluation samples of the two protocols, and batches assembled on the device.

A sample is (user, end): the user's first `end` interactions, of which the
last is the target and up to `max_sequence_length` before it (the most recent
ones) are the history.

- "paper" (the release's protocol): train end = n - 1, eval end = n.
- "leave_one_out": train end = n - 2, valid end = n - 1, test end = n; the
  model is selected on valid and test is reported at that epoch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict

import numpy as np
import torch

from generative_recommenders.data.sequence_store import SequenceData

PROTOCOLS = {
    "paper": {"train": 1, "eval": 0},
    "leave_one_out": {"train": 2, "valid": 1, "test": 0},
}


def selection_split(protocol: str) -> str:
    """The split whose metrics choose the best epoch."""
    return "eval" if protocol == "paper" else "valid"


def make_splits(lengths: np.ndarray, protocol: str) -> Dict[str, np.ndarray]:
    """Split name -> (S, 2) int64 array of (user, end). Users too short for a split are left out."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"train_fn.protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    splits = {}
    for name, held_out in PROTOCOLS[protocol].items():
        ends = lengths - held_out
        keep = ends >= 2  # a sample needs a target and at least one history item
        if not keep.all():
            logging.warning("%s split: %d users with fewer than %d interactions left out",
                            name, int((~keep).sum()), held_out + 2)
        users = np.nonzero(keep)[0]
        splits[name] = np.stack([users, ends[keep]], axis=1).astype(np.int64)
    return splits


def history_total(samples: np.ndarray, max_history: int) -> int:
    """Number of history positions of (user, end) samples: the jagged length of their batch."""
    return int(np.minimum(samples[:, 1] - 1, max_history).sum())


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor  # (B, N) history ids, target at position `lengths`, then zeros
    timestamps: torch.Tensor  # (B, N), target timestamp at position `lengths`
    lengths: torch.Tensor  # (B,) history lengths
    targets: torch.Tensor  # (B,)
    total: int  # sum of lengths, known on the host so the model needs no device sync


class DeviceSequences:
    """All sequences as flat tensors on one device; batches are gathered there."""

    def __init__(self, data: SequenceData, device: torch.device) -> None:
        self.item_ids = torch.as_tensor(data.item_ids, dtype=torch.long, device=device)
        self.timestamps = torch.as_tensor(data.timestamps, dtype=torch.long, device=device)
        self.offsets = torch.as_tensor(data.offsets, dtype=torch.long, device=device)

    def batch(self, samples: np.ndarray, max_history: int, padded_len: int) -> Batch:
        """samples: (B, 2) host array of (user, end)."""
        on_device = torch.as_tensor(samples, device=self.offsets.device)
        return self.gather(on_device, max_history, padded_len, history_total(samples, max_history))

    def gather(self, samples: torch.Tensor, max_history: int, padded_len: int, total: int) -> Batch:
        """Builds the batch of (B, 2) (user, end) samples already on the device; no host sync."""
        if max_history + 1 > padded_len:
            raise ValueError(f"padded length {padded_len} cannot hold {max_history} history items and a target")
        users, ends = samples[:, 0], samples[:, 1]
        lengths = (ends - 1).clamp(max=max_history)
        target_index = self.offsets[users] + ends - 1
        pos = torch.arange(padded_len, device=samples.device)
        valid = pos[None, :] <= lengths[:, None]
        index = torch.where(valid, (target_index - lengths)[:, None] + pos[None, :], 0)
        ids = torch.where(valid, self.item_ids[index], 0)
        timestamps = torch.where(valid, self.timestamps[index], 0)
        return Batch(ids, timestamps, lengths, self.item_ids[target_index], total)
