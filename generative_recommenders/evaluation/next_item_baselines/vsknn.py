"""Session-kNN with vector-multiplication similarity (V-SKNN; Ludewig & Jannach 2018, session-rec's
`VMContextKNN`), with these choices, all session-rec's unless said otherwise:

- Prefix vector: item p_j at position j = 1..L of the prefix weighs j / L, a
  linear decay from 1 at the last click (session-rec's `weighting='div'`, its
  default; an item clicked twice keeps its later weight).
- Similarity of a training session s (a set of items): the sum of the weights
  of the prefix's distinct items that s holds, divided by their number.
- Candidates: the training sessions holding any item of the prefix; when
  there are more than `sample_size` = 500, the 500 most recent (latest last
  click; ties: the session later in the data); of them the `k` = 100 most
  similar are the neighbours (ties: the more recent session).
- Score of item i: the sum over neighbours s holding i of
  sim(s) / step(s) * (1 + idf_weight * idf(i)), where step(s) = 1 + the
  number of clicks after the prefix's last click that s holds (session-rec's
  `weighting_score='div'`), idf(i) = ln(#training sessions / #training clicks
  on i) as session-rec computes it, and idf_weight = 10, the IDF weighting
  of session-rec's example configurations (`idf_weighting: 10`).
- Items of the prefix are scored too (`remind=True`): repeat clicks are
  targets of the evaluation. The final division by the maximum is left out
  (it changes no ranking); items no neighbour holds score 0 and tie.

The prefix is the batch's history, as the models read it (its last
max_sequence_length clicks; session-rec uses the whole session). Vectorised
per batch with sparse products; similarities are kept as integer position
sums (the 1 / (L * #items) factor is the same for every candidate of a
prefix), so equal similarities tie exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp
import torch

from generative_recommenders.data.samples import Batch
from generative_recommenders.evaluation.next_item_baselines.clicks import (Prefixes, TrainingClicks,
                                                                           candidate_scores, rank_within_rows)

K = 100
SAMPLE_SIZE = 500
IDF_WEIGHT = 10.0


@dataclasses.dataclass
class VSKNN:
    sessions: sp.csr_matrix  # (S, num_ids) 1 where a training session holds an item
    recency: np.ndarray  # (S,) 0 for the most recent training session
    item_weight: np.ndarray  # (num_ids,) 1 + idf_weight * idf
    candidate_ids: torch.Tensor
    k: int = K
    sample_size: int = SAMPLE_SIZE

    def _last_positions(self, prefixes: Prefixes) -> np.ndarray:
        """(B, num_ids) 1-based position of each item's last click in each prefix, 0 where absent."""
        last = np.zeros((prefixes.size, self.sessions.shape[1]), dtype=np.int64)
        np.maximum.at(last, (prefixes.row, prefixes.items), prefixes.position + 1)
        return last

    def neighbours(self, prefixes: Prefixes, last: np.ndarray):
        """(rows, sessions, similarities) of each prefix's neighbours, grouped by row."""
        row, item = np.nonzero(last)
        query = sp.csr_matrix((last[row, item].astype(np.float64), (row, item)), shape=last.shape)
        overlap = (query @ self.sessions.T).tocoo()  # integer sums of positions over the shared items
        rows, cols, sums = overlap.row, overlap.col, overlap.data
        recent = np.lexsort((self.recency[cols], rows))
        sampled = recent[rank_within_rows(rows[recent]) < self.sample_size]
        rows, cols, sums = rows[sampled], cols[sampled], sums[sampled]
        nearest = np.lexsort((self.recency[cols], -sums, rows))
        kept = nearest[rank_within_rows(rows[nearest]) < self.k]
        rows, cols = rows[kept], cols[kept]
        distinct = np.count_nonzero(last, axis=1)
        similarity = sums[kept] / (prefixes.lengths[rows] * distinct[rows])
        return rows, cols, similarity

    def _steps(self, rows: np.ndarray, cols: np.ndarray, last: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """1 + clicks after the prefix's last click that each neighbour holds: from its latest shared click."""
        indptr, indices = self.sessions.indptr, self.sessions.indices
        sizes = indptr[cols + 1] - indptr[cols]
        within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        items = indices[np.repeat(indptr[cols], sizes) + within]
        latest = np.maximum.reduceat(last[np.repeat(rows, sizes), items], np.cumsum(sizes) - sizes)
        return lengths[rows] - latest + 1

    def __call__(self, batch: Batch) -> torch.Tensor:
        """(B, C) scores of the candidates after each row's history."""
        prefixes = Prefixes.of(batch)
        last = self._last_positions(prefixes)
        rows, cols, similarity = self.neighbours(prefixes, last)
        weights = similarity / self._steps(rows, cols, last, prefixes.lengths)
        neighbourhood = sp.csr_matrix((weights, (rows, cols)), shape=(prefixes.size, self.sessions.shape[0]))
        scores = (neighbourhood @ self.sessions).toarray() * self.item_weight[None, :]
        return candidate_scores(scores, self.candidate_ids)


def fit_vsknn(clicks: TrainingClicks, candidate_ids: torch.Tensor, k: int = K, sample_size: int = SAMPLE_SIZE,
              idf_weight: float = IDF_WEIGHT) -> VSKNN:
    sessions = clicks.session_items()
    sessions.data[:] = 1.0  # sets of items
    # Most recent first; equal times: the later session first.
    order = np.lexsort((-np.arange(clicks.num_sessions), -clicks.end_time))
    recency = np.empty(clicks.num_sessions, dtype=np.int64)
    recency[order] = np.arange(clicks.num_sessions)
    item_clicks = np.bincount(clicks.items, minlength=clicks.num_ids)
    idf = np.log(clicks.num_sessions / np.maximum(item_clicks, 1))  # items never clicked are held by no session
    return VSKNN(sessions, recency, 1.0 + idf_weight * idf, candidate_ids, k, sample_size)
