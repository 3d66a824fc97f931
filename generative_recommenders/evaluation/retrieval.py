"""Retrieval evaluation (REFERENCE.md sections 7 and 13): rank each target among all candidates.

For each sample the objective gives the query (the encoder output after the
history); scores are dot products with the model's item vectors of every
candidate (normalised as in training).

- User protocols: items of the (truncated) history fed to the model are
  removed, and ranks beyond k = min(2500, #candidates) count as k + 1.
- Sessions (GRU4Rec's rules): nothing is removed (repeat clicks are
  legitimate targets) and ranks are exact.

Ties are scored at their expected value under a random order of the tied
items: a target with h strictly higher and t equally scored candidates has
rank uniform on h + 1 .. h + t + 1, and every metric is averaged over that
range. A model that scores everything alike thus gets HR@K = K / #candidates,
not 1. Non-finite queries or item vectors stop the run (FloatingPointError):
NaN scores would otherwise compare as "not higher" and rank every target first.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from generative_recommenders.cuda_graph import CudaGraphStep
from generative_recommenders.data.candidates import CandidateIndex
from generative_recommenders.data.samples import Batch, DeviceSequences, history_total
from generative_recommenders.evaluation.metrics import RankMetrics, average, metric_names
from generative_recommenders.precision import autocast

RANK_CAP = 2500

Query = Callable[[torch.nn.Module, Batch], torch.Tensor]
Baseline = Callable[[Batch], torch.Tensor]  # (B, C) scores of the candidates (evaluation/next_item_baselines)


def remove_columns(scores: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """(B, C) scores with the (B, n) columns `exclude` (-1: none) set to -inf."""
    num_candidates = scores.shape[1]
    # One extra "sink" column takes the scatter of padding and non-candidate ids.
    sink = torch.where(exclude >= 0, exclude, num_candidates)
    return torch.nn.functional.pad(scores, (0, 1)).scatter(1, sink, float("-inf"))[:, :num_candidates]


def history_columns(batch: Batch, index: CandidateIndex) -> torch.Tensor:
    """(B, N) candidate columns of each row's history items (-1 for padding, the target and non-candidates)."""
    pos = torch.arange(batch.ids.shape[1], device=batch.ids.device)
    return index.columns(torch.where(pos[None, :] < batch.lengths[:, None], batch.ids, 0))


def rank_counts(scores: torch.Tensor, target_columns: torch.Tensor, exclude: Optional[torch.Tensor] = None):
    """(B, C) scores, (B,) target columns (-1: not a candidate), optional (B, n) columns to remove (-1: none).

    Returns (higher, ties, missing): candidates scored strictly above the
    target, others scored equal to it, and whether the target cannot be ranked
    (not a candidate, or removed).
    """
    if exclude is not None:
        scores = remove_columns(scores, exclude)
    target = scores.gather(1, target_columns.clamp(min=0).unsqueeze(1))
    higher = (scores > target).sum(dim=1)
    ties = (scores == target).sum(dim=1) - 1
    missing = (target_columns < 0) | torch.isneginf(target.squeeze(1))
    return higher, ties, missing


class Evaluator:
    """Averages every metric over a split's (user, end) samples, batch by batch on the device.

    `query(model, batch)` gives the (B, D) queries (the objective's). With a
    `baseline` the model is ignored and the baseline's scores of each batch
    rank the candidates (next_item_baselines/). Under the model's padded
    layout each full batch is one CUDA-graph replay (see cuda_graph.py); per-sample metrics do not depend
    on how samples are batched. `mixed_precision` (train_fn.mixed_precision,
    precision.py) applies to the query's forward pass; scores are fp32.
    """

    def __init__(self, model: torch.nn.Module, query: Query, sequences: DeviceSequences, index: CandidateIndex,
                 max_history: int, batch_size: int, filter_history: bool = True, rank_cap: Optional[int] = RANK_CAP,
                 baseline: Optional[Baseline] = None, mixed_precision: str = "none") -> None:
        self.model, self.query, self.sequences, self.index = model, query, sequences, index
        self.max_history, self.batch_size = max_history, batch_size
        self.filter_history = filter_history
        self.baseline = baseline
        self.mixed_precision = mixed_precision
        cap = index.num_candidates if rank_cap is None else min(rank_cap, index.num_candidates)
        self.metrics = RankMetrics(cap, sequences.offsets.device)
        self.candidates: Optional[torch.Tensor] = None  # (C, D): refreshed per evaluation, read by every batch
        self.step = CudaGraphStep(self._batch_sums, model if baseline is None else None)

    def refresh_candidates(self) -> None:
        """Reads the candidates' current vectors into the buffer every batch scores against (none for a baseline)."""
        if self.baseline is not None:
            return
        matrix = self.model.item_vectors(self.index.candidate_ids)
        if not bool(torch.isfinite(matrix).all()):
            raise FloatingPointError("non-finite item embeddings at evaluation")
        if self.candidates is None:
            self.candidates = matrix
        else:  # in place: a captured graph reads this buffer
            self.candidates.copy_(matrix)

    def queries(self, batch: Batch) -> torch.Tensor:
        """(B, D) fp32 queries: the objective's, its forward pass under `mixed_precision` (precision.py).

        fp32 because the scores are products of them: bf16 scores would tie candidates the model tells apart.
        """
        with autocast(self.mixed_precision, batch.ids.device):
            query = self.query(self.model, batch)
        return query.float()

    def score(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, D) queries and their (B, C) scores of every candidate, removed history items at -inf.

        The ranking evaluated here is the one recommendations are read from
        (recommend.py), after `refresh_candidates`.
        """
        if self.baseline is not None:
            scores = self.baseline(batch)
            query = scores.new_ones(scores.shape[0], 1)  # a finite stand-in: baselines have no query
        else:
            query = self.queries(batch)
            scores = query @ self.candidates.T
        if self.filter_history:
            scores = remove_columns(scores, history_columns(batch, self.index))
        return query, scores

    def _batch_sums(self, samples: torch.Tensor, total: int) -> torch.Tensor:
        """Sums of every metric over one batch, then the non-finite query count, then the batch size."""
        batch = self.sequences.gather(samples, self.max_history, self.model.max_seq_len, total)
        query, scores = self.score(batch)
        per_sample = self.metrics(*rank_counts(scores, self.index.columns(batch.targets)))
        non_finite = (~torch.isfinite(query).all(dim=1)).sum().to(torch.float64).unsqueeze(0)
        count = non_finite.new_full((1,), batch.targets.numel())
        return torch.cat([torch.stack([per_sample[n].sum() for n in metric_names()]), non_finite, count])

    @torch.no_grad()
    def __call__(self, samples: np.ndarray, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Metric averages over `samples` (this rank's share, summed over ranks)."""
        was_training = self.model.training
        self.model.eval()
        self.refresh_candidates()
        device = self.sequences.offsets.device
        on_device = torch.as_tensor(samples, device=device)  # one upload, no per-batch host sync
        sums = torch.zeros(len(metric_names()) + 2, dtype=torch.float64, device=device)
        for b, start in enumerate(range(0, samples.shape[0], self.batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            end = start + self.batch_size
            sums += self.step(on_device[start:end], history_total(samples[start:end], self.max_history))
        if dist.is_initialized():
            dist.all_reduce(sums)
        self.model.train(was_training)
        values = sums.tolist()
        if values[-2] > 0:
            raise FloatingPointError(f"non-finite user embeddings for {int(values[-2])} evaluation samples")
        return average(dict(zip(metric_names(), values[:-2])), values[-1])
