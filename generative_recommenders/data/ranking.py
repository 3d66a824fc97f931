"""Generative ranking samples (issue 12): interleaved item/action sequences and their labels.

A user's interactions (item x_k, rating r_k, time t_k) become the tokens
x_0, a_0, x_1, a_1, ... where a_k is the action of r_k (1..5) and every token
carries its interaction's timestamp. A sample is a row (user, history_end,
num_candidates): the user's last min(history_end, max_history) interactions
before `history_end`, interleaved, followed by the next `num_candidates`
items without their actions, which are the labels ("liked" = rating >= 4, and
the rating). Candidates are M-FALCON targets (ops/targets.py): each is
encoded as if it alone followed the history.

Protocol, k = num_holdout (train_fn.ranking_holdout): a user's last k
interactions are the test candidates and the k before them the validation
candidates, chronologically. The validation history (context) ends before its
candidates; the test history includes the validation interactions, with their
ratings as actions. The training sample is the sequence before the validation
candidates with every item position a target-aware candidate: under the causal
mask item x_i's position sees x_0, a_0, ..., x_i but never a_i or anything
later. So training never sees a validation or test interaction, and the k
candidates of a split are never context for each other. Next-item labels (for
an optional retrieval loss) sit at item positions only, and the last history
item has none (its next item is held out).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from generative_recommenders.data.sequence_store import SequenceData

NUM_ACTIONS = 5  # ratings 1..5; action id 0 is padding
LIKED_RATING = 4.0


def rating_actions(ratings: np.ndarray, source: str = "data") -> np.ndarray:
    """Action ids 1..5 of ratings in [1, 5]; half stars round down, so liked (>= 4) <=> action >= 4."""
    bad = ~np.isfinite(ratings) | (ratings < 1) | (ratings > NUM_ACTIONS)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{source}: {int(bad.sum())} ratings are not finite numbers in [1, {NUM_ACTIONS}] (first at row "
            f"{first}: {ratings[first]!r}); ranking uses ratings as actions, so every interaction needs one"
        )
    return np.floor(ratings).astype(np.int64)


def users_in_id_range(data: SequenceData, first: int, last: int) -> np.ndarray:
    """(num_users,) bool: users whose own id lies in [first, last] (ml-1m: exact ratings for 1..2999 only)."""
    return (data.user_ids >= first) & (data.user_ids <= last)


def ranking_splits(lengths: np.ndarray, num_holdout: int = 1,
                   users: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Split name -> (S, 3) int64 rows (user, history_end, num_candidates); see the module docstring.

    `users` (bool per user) restricts the samples; users with fewer than
    2 * num_holdout + 1 interactions (no training item left) are left out.
    """
    if num_holdout < 1:
        raise ValueError(f"num_holdout must be >= 1, got {num_holdout}")
    considered = np.ones(lengths.shape, dtype=bool) if users is None else users
    keep = lengths >= 2 * num_holdout + 1
    selected = considered & keep
    short = int((considered & ~keep).sum())
    if short:
        logging.warning("ranking splits: %d users with fewer than %d interactions left out", short, 2 * num_holdout + 1)
    user = np.nonzero(selected)[0].astype(np.int64)
    n = lengths[user].astype(np.int64)
    k = np.full_like(n, num_holdout)

    def rows(end: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return np.stack([user, end, candidates], axis=1)

    return {
        "train": rows(n - 2 * k, np.zeros_like(n)),
        "valid": rows(n - 2 * k, k),
        "test": rows(n - k, k),
    }


def sample_lengths(samples: np.ndarray, max_history: int) -> np.ndarray:
    """Tokens of each sample: two per history interaction, one per candidate."""
    return 2 * np.minimum(samples[:, 1], max_history) + samples[:, 2]


def padded_length(max_history: int, max_candidates: int) -> int:
    """The longest sample: the model's max_seq_len must be at least this."""
    return 2 * max_history + max_candidates


@dataclasses.dataclass
class RankingBatch:
    """Dense (B, N) interleaved samples, left-aligned; `total` = sum(lengths) known on the host."""

    item_ids: torch.Tensor  # item id at history item and candidate positions, 0 elsewhere
    action_ids: torch.Tensor  # action 1..5 at history action positions, 0 elsewhere
    timestamps: torch.Tensor  # each token's interaction time; past the end, the last token's
    lengths: torch.Tensor  # (B,) tokens
    num_targets: Optional[torch.Tensor]  # (B,) candidates at the end; None when no sample has any
    ratings: torch.Tensor  # rating label where supervised (candidates, or history items of training samples), else 0
    next_item: torch.Tensor  # next history item at history item positions, 0 elsewhere and at the last one
    total: int


class RankingSequences:
    """Items, actions, ratings and timestamps of all users as flat tensors on one device."""

    def __init__(self, data: SequenceData, device: torch.device) -> None:
        actions = rating_actions(data.ratings, data.name)  # fail before any upload
        self.item_ids = torch.as_tensor(data.item_ids, dtype=torch.long, device=device)
        self.actions = torch.as_tensor(actions, device=device)
        self.ratings = torch.as_tensor(data.ratings, dtype=torch.float32, device=device)
        self.timestamps = torch.as_tensor(data.timestamps, dtype=torch.long, device=device)
        self.offsets = torch.as_tensor(data.offsets, dtype=torch.long, device=device)

    def batch(self, samples: np.ndarray, max_history: int, padded_len: int) -> RankingBatch:
        """Uploads (B, 3) host samples and gathers them (tests, inference; training uploads once per epoch)."""
        on_device = torch.as_tensor(samples, device=self.offsets.device)
        return self.gather(on_device, max_history, padded_len, int(sample_lengths(samples, max_history).sum()),
                           bool(samples[:, 2].any()))

    def candidates(self, samples: torch.Tensor, num_slots: int) -> Tuple[torch.Tensor, ...]:
        """(B, num_slots) item ids, timestamps and ratings of the (B, 3) samples' candidates, and which slots
        are real (those past a sample's num_candidates hold item 0, its last candidate's time, rating 0)."""
        users, ends, counts = samples[:, 0], samples[:, 1], samples[:, 2]
        slots = torch.arange(num_slots, device=samples.device)[None, :]
        valid = slots < counts[:, None]
        first = self.offsets[users] + ends
        row = first[:, None] + torch.minimum(slots, (counts[:, None] - 1).clamp(min=0))
        return (torch.where(valid, self.item_ids[row], 0), self.timestamps[row],
                torch.where(valid, self.ratings[row], 0.0), valid)

    def gather(self, samples: torch.Tensor, max_history: int, padded_len: int, total: int,
               with_targets: bool) -> RankingBatch:
        """Builds the batch of (B, 3) samples already on the device, without host syncs.

        `total` and `with_targets` (any sample has candidates) come from the host's copy of the samples.
        """
        users, ends, candidates = samples[:, 0], samples[:, 1], samples[:, 2]
        history = ends.clamp(max=max_history)
        lengths = 2 * history + candidates
        start = self.offsets[users]
        pos = torch.arange(padded_len, device=samples.device)[None, :]
        in_history = pos < 2 * history[:, None]
        valid = pos < lengths[:, None]
        is_item_slot = pos % 2 == 0
        # Flat interaction row of each token: history pairs share one; candidates follow history_end.
        row = torch.where(in_history, (start + ends - history)[:, None] + pos // 2,
                          (start + ends)[:, None] + pos - 2 * history[:, None])
        last_row = torch.where(candidates > 0, start + ends + candidates - 1, start + ends - 1)
        row = torch.where(valid, row, last_row[:, None])
        is_item = valid & (~in_history | is_item_slot)
        history_item = in_history & is_item_slot
        labelled = torch.where(candidates[:, None] > 0, valid & ~in_history, history_item)
        has_next = history_item & (pos < 2 * history[:, None] - 2)
        next_row = torch.where(has_next, row + 1, 0)
        return RankingBatch(
            item_ids=torch.where(is_item, self.item_ids[row], 0),
            action_ids=torch.where(in_history & ~is_item_slot, self.actions[row], 0),
            timestamps=self.timestamps[row],
            lengths=lengths,
            num_targets=candidates if with_targets else None,
            ratings=torch.where(labelled, self.ratings[row], 0.0),
            next_item=torch.where(has_next, self.item_ids[next_row], 0),
            total=total,
        )
