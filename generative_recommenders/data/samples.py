"""Train/evaluation samples of the protocols, and batches assembled on the device.

A sample is (user, end): the user's first `end` interactions, of which the
last is the target and up to `max_sequence_length` before it (the most recent
ones) are the history.

- "paper" (the release's protocol): train end = n - 1, eval end = n.
- "leave_one_out": train end = n - 2, valid end = n - 1, test end = n; the
  model is selected on valid and test is reported at that epoch.
- "sessions" (session data, REFERENCE.md section 13): each sequence is a
  session of one split. Train sessions are trained on whole (end = n); every
  position of a valid or test session is evaluated (end = 2..n): the session
  so far predicts its next click. Selection on valid when the data has it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Dict

import numpy as np
import torch

from generative_recommenders.config import ConfigError
from generative_recommenders.data.sequence_store import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, SequenceData

HELD_OUT = {
    "paper": {"train": 1, "eval": 0},
    "leave_one_out": {"train": 2, "valid": 1, "test": 0},
}
SESSIONS = "sessions"


def selection_split(protocol: str, splits: Dict[str, np.ndarray]) -> str:
    """The split whose metrics choose the best epoch."""
    if protocol == "paper":
        return "eval"
    return "valid" if "valid" in splits else "test"


def _user_splits(lengths: np.ndarray, protocol: str) -> Dict[str, np.ndarray]:
    splits = {}
    for name, held_out in HELD_OUT[protocol].items():
        ends = lengths - held_out
        keep = ends >= 2  # a sample needs a target and at least one history item
        if not keep.all():
            logging.warning("%s split: %d users with fewer than %d interactions left out",
                            name, int((~keep).sum()), held_out + 2)
        users = np.nonzero(keep)[0]
        splits[name] = np.stack([users, ends[keep]], axis=1).astype(np.int64)
    return splits


def _every_position(sessions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(S, 2) samples (session, end) for end = 2..n of each session."""
    counts = np.maximum(lengths[sessions] - 1, 0)
    owner = np.repeat(sessions, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    ends = np.arange(counts.sum()) - first + 2
    return np.stack([owner, ends], axis=1).astype(np.int64)


def _session_splits(data: SequenceData) -> Dict[str, np.ndarray]:
    lengths = data.lengths
    of_split = {code: np.nonzero((data.user_split == code) & (lengths >= 2))[0]
                for code in (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST)}
    splits = {"train": np.stack([of_split[SPLIT_TRAIN], lengths[of_split[SPLIT_TRAIN]]], axis=1).astype(np.int64)}
    if of_split[SPLIT_VALID].size:
        splits["valid"] = _every_position(of_split[SPLIT_VALID], lengths)
    splits["test"] = _every_position(of_split[SPLIT_TEST], lengths)
    return splits


def make_splits(data: SequenceData, protocol: str) -> Dict[str, np.ndarray]:
    """Split name -> (S, 2) int64 array of (user, end). Users too short for a split are left out."""
    is_sessions = data.user_split is not None
    if protocol not in (*HELD_OUT, SESSIONS):
        raise ConfigError(f"train_fn.protocol must be one of {', '.join([*HELD_OUT, SESSIONS])}; got {protocol!r}")
    if is_sessions != (protocol == SESSIONS):
        raise ConfigError(f"data set {data.name!r} holds {'sessions' if is_sessions else 'users'}: set "
                          f"train_fn.protocol = {'sessions' if is_sessions else 'paper or leave_one_out'}")
    return _session_splits(data) if is_sessions else _user_splits(data.lengths, protocol)


def history_total(samples: np.ndarray, max_history: int) -> int:
    """Number of history positions of (user, end[, kept]) samples: the jagged length of their batch."""
    if samples.shape[1] == 3:
        return int(samples[:, 2].sum())
    return int(np.minimum(samples[:, 1] - 1, max_history).sum())


def stochastic_length_cap(max_len: int, alpha: float) -> int:
    """N^(alpha/2), the length a shortened history keeps (rounded down: positions are whole)."""
    return int(math.floor(max_len ** (alpha / 2) + 1e-9))  # 1024 ** 0.8 is 256 up to rounding


def stochastic_lengths(lengths: np.ndarray, max_len: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Kept lengths of histories of `lengths` (each <= max_len = N) under Stochastic Length.

    A history of n <= N^(alpha/2) positions is kept whole; a longer one is
    shortened to N^(alpha/2) positions with probability 1 - N^alpha / n^2 and
    kept whole otherwise, so its expected attention cost stays O(N^alpha).
    One uniform number is drawn per history, used or not.
    """
    cap = stochastic_length_cap(max_len, alpha)
    keep_whole = np.minimum(1.0, float(max_len) ** alpha / np.maximum(lengths, 1).astype(np.float64) ** 2)
    shorten = (lengths > cap) & (rng.random(lengths.shape[0]) >= keep_whole)
    return np.where(shorten, cap, lengths).astype(np.int64)


def with_stochastic_lengths(samples: np.ndarray, max_history: int, alpha: float,
                            rng: np.random.Generator) -> np.ndarray:
    """(S, 3) samples (user, end, kept history length) from (S, 2) ones, N being max_history."""
    lengths = np.minimum(samples[:, 1] - 1, max_history)
    kept = stochastic_lengths(lengths, max_history, alpha, rng)
    return np.concatenate([samples, kept[:, None]], axis=1)


def kept_offsets(lengths: torch.Tensor, kept: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width): the first kept[b] entries of row b are a uniformly random kept[b]-subset of
    0..lengths[b]-1 in increasing order (the rest is `width`). Drawn with torch's generator on
    the device, without a host sync (so inside a CUDA graph too)."""
    pos = torch.arange(width, device=lengths.device)
    # Float64 keys: ties (which would favour low positions) are then practically impossible.
    keys = torch.rand(lengths.shape[0], width, dtype=torch.float64, device=lengths.device)
    keys = torch.where(pos[None, :] < lengths[:, None], keys, 2.0)  # positions past the history rank last
    order = keys.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, pos.expand_as(order).contiguous())
    chosen = rank < kept[:, None]
    return torch.where(chosen, pos[None, :], width).sort(dim=1).values


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
        """Builds the batch of (B, 2) (user, end) samples already on the device; no host sync.

        (B, 3) samples (user, end, kept) keep `kept` random positions of their
        history (kept_offsets) and are trained on as if that were the history:
        each kept position's label is the next kept item, the last one's the target.
        """
        if max_history + 1 > padded_len:
            raise ValueError(f"padded length {padded_len} cannot hold {max_history} history items and a target")
        users, ends = samples[:, 0], samples[:, 1]
        full = (ends - 1).clamp(max=max_history)
        target_index = self.offsets[users] + ends - 1
        pos = torch.arange(padded_len, device=samples.device)
        if samples.shape[1] == 3:
            lengths = samples[:, 2]
            within = kept_offsets(full, lengths, padded_len)
            within = torch.where(pos[None, :] == lengths[:, None], full[:, None], within)  # the target
        else:
            lengths, within = full, pos[None, :]
        valid = pos[None, :] <= lengths[:, None]
        index = torch.where(valid, (target_index - full)[:, None] + within, 0)
        ids = torch.where(valid, self.item_ids[index], 0)
        timestamps = torch.where(valid, self.timestamps[index], 0)
        return Batch(ids, timestamps, lengths, self.item_ids[target_index], total)
