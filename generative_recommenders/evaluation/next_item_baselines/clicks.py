"""What the next-item baselines read: the training clicks they fit on, and the prefixes of a batch.

Both are in model item ids (1..max_item_id; 0 is padding). A baseline scores
every item id and `candidate_scores` keeps the candidates' columns, in the
order of the evaluation's candidate index.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp
import torch

from generative_recommenders.data.samples import Batch
from generative_recommenders.data.sequence_store import SequenceData


@dataclasses.dataclass(frozen=True)
class TrainingClicks:
    """The clicks of the training samples, grouped by sample (session) in click order."""

    items: np.ndarray  # (E,) item id of each click
    session: np.ndarray  # (E,) 0-based index of its session (training sample)
    position: np.ndarray  # (E,) 0-based position within its session
    end_time: np.ndarray  # (S,) time of each session's last click
    num_ids: int  # max item id + 1: the width of every item-indexed array

    @property
    def num_sessions(self) -> int:
        return self.end_time.size

    @staticmethod
    def of(data: SequenceData, train_samples: np.ndarray) -> "TrainingClicks":
        """The first `end` clicks of each training sample (user, end): whole sessions for session data."""
        counts = train_samples[:, 1]
        session = np.repeat(np.arange(counts.size), counts)
        position = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = data.offsets[train_samples[session, 0]] + position
        end_time = data.timestamps[data.offsets[train_samples[:, 0]] + counts - 1]
        return TrainingClicks(data.item_ids[rows].astype(np.int64), session, position, end_time,
                              data.max_item_id + 1)

    def session_items(self) -> sp.csr_matrix:
        """(S, num_ids) count of each item's clicks in each session."""
        ones = np.ones(self.items.size)
        return sp.csr_matrix((ones, (self.session, self.items)), shape=(self.num_sessions, self.num_ids))


@dataclasses.dataclass(frozen=True)
class Prefixes:
    """The histories of a batch as flat clicks: the input every model of the evaluation reads."""

    row: np.ndarray  # (P,) batch row of each click
    position: np.ndarray  # (P,) 0-based position within its prefix
    items: np.ndarray  # (P,) item id
    lengths: np.ndarray  # (B,) prefix lengths (the batch's history lengths: its last max_sequence_length clicks)
    last: np.ndarray  # (B,) the last click's item id (0 for an empty prefix)

    @staticmethod
    def of(batch: Batch) -> "Prefixes":
        ids, lengths = batch.ids.cpu().numpy().astype(np.int64), batch.lengths.cpu().numpy().astype(np.int64)
        row, position = np.nonzero(np.arange(ids.shape[1])[None, :] < lengths[:, None])
        last = np.where(lengths > 0, ids[np.arange(ids.shape[0]), np.maximum(lengths - 1, 0)], 0)
        return Prefixes(row, position, ids[row, position], lengths, last)

    @property
    def size(self) -> int:
        return self.lengths.size


def candidate_scores(scores: np.ndarray, candidate_ids: torch.Tensor) -> torch.Tensor:
    """(B, C) float64 scores of the candidates, from (B, num_ids) scores of every item id, on their device."""
    ids = candidate_ids.cpu().numpy()
    return torch.as_tensor(np.ascontiguousarray(scores[:, ids]), device=candidate_ids.device)


def rank_within_rows(rows: np.ndarray) -> np.ndarray:
    """0-based rank of each entry among the entries of its row, for entries sorted by row."""
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if rows.size else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, rows.size])
    return np.arange(rows.size) - np.repeat(starts, counts)


def keep_top_per_row(matrix: sp.csr_matrix, keep: int) -> sp.csr_matrix:
    """The `keep` largest entries of each row (ties: lower column first), the others dropped."""
    coo = matrix.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    kept = order[rank_within_rows(coo.row[order]) < keep]
    return sp.csr_matrix((coo.data[kept], (coo.row[kept], coo.col[kept])), shape=matrix.shape)
