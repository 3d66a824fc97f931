"""Retrieval evaluation (REFERENCE.md section 7): rank the target among all candidates.

For each user the query is the encoder output at the last history position.
Scores are dot products with the L2-normalised embeddings of every candidate;
items of the (truncated) history fed to the model are removed; the target's
1-based rank r is searched within the top k = min(2500, #candidates) and set
to k + 1 outside it. Ties are broken in the target's favour: r is one plus the
number of remaining candidates that score strictly higher.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from generative_recommenders.cuda_graph import CudaGraphStep
from generative_recommenders.data.samples import DeviceSequences, history_total

RANK_CAP = 2500
HR_NDCG_KS = (1, 10, 50, 100, 200)
HR_ONLY_KS = (500, 1000)


def metric_names() -> list:
    names = [f"{m}@{k}" for k in HR_NDCG_KS for m in ("ndcg", "hr")]
    return names + [f"hr@{k}" for k in HR_ONLY_KS] + ["mrr"]


class CandidateIndex:
    """Maps item ids to columns of the candidate score matrix."""

    def __init__(self, candidate_ids: torch.Tensor, max_item_id: int) -> None:
        self.candidate_ids = candidate_ids
        column = torch.full((max_item_id + 1,), -1, dtype=torch.long, device=candidate_ids.device)
        column[candidate_ids.long()] = torch.arange(candidate_ids.numel(), device=candidate_ids.device)
        self.column = column
        self.top_k = min(RANK_CAP, candidate_ids.numel())

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Column of each id, -1 for ids that are not candidates (0 = padding included)."""
        return self.column[ids.clamp(0, self.column.numel() - 1)].masked_fill(ids >= self.column.numel(), -1)


def target_ranks(
    query: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    index: CandidateIndex,
    target_ids: torch.Tensor,
    history_ids: torch.Tensor,
) -> torch.Tensor:
    """(B, D) queries, (C, D) normalised candidates, (B,) targets, (B, n) history (0 = padding) -> (B,) ranks."""
    num_candidates = candidate_embeddings.shape[0]
    # One extra "sink" column takes the scatter of padding and non-candidate ids.
    scores = torch.nn.functional.pad(query @ candidate_embeddings.T, (0, 1))
    history_cols = index.columns(history_ids)
    history_cols = torch.where(history_cols >= 0, history_cols, num_candidates)
    scores = scores.scatter(1, history_cols, float("-inf"))[:, :num_candidates]
    target_cols = index.columns(target_ids)
    target_scores = scores.gather(1, target_cols.clamp(min=0).unsqueeze(1))
    ranks = 1 + (scores > target_scores).sum(dim=1)
    missing = (target_cols < 0) | torch.isneginf(target_scores.squeeze(1))
    return torch.where(missing | (ranks > index.top_k), index.top_k + 1, ranks)


def metrics_from_ranks(ranks: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-user metric values (B,) for each metric name."""
    ranks = ranks.to(torch.float64)
    out = {}
    for k in HR_NDCG_KS:
        hit = (ranks <= k).to(torch.float64)
        out[f"hr@{k}"] = hit
        out[f"ndcg@{k}"] = hit / torch.log2(ranks + 1)
    for k in HR_ONLY_KS:
        out[f"hr@{k}"] = (ranks <= k).to(torch.float64)
    out["mrr"] = 1.0 / ranks
    return out


def average(sums: Dict[str, float], count: float) -> Dict[str, float]:
    return {name: value / max(count, 1.0) for name, value in sums.items()}


def format_metrics(metrics: Dict[str, float], names: Iterable[str] = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")) -> str:
    return " ".join(f"{n}={metrics[n]:.4f}" for n in names if n in metrics and not math.isnan(metrics[n]))


class Evaluator:
    """Averages every metric over a split's (user, end) samples, batch by batch on the device.

    With `popularity` (C,) the model is ignored and candidates are ranked by it
    (the most-popular baseline), with the same history filter. With `use_graph`
    each full batch is one CUDA-graph replay (see cuda_graph.py); the per-user
    metrics do not depend on how users are batched.
    """

    def __init__(self, model: torch.nn.Module, sequences: DeviceSequences, index: CandidateIndex, max_history: int,
                 batch_size: int, use_graph: bool = False, popularity: Optional[torch.Tensor] = None) -> None:
        self.model, self.sequences, self.index = model, sequences, index
        self.max_history, self.batch_size = max_history, batch_size
        self.popularity = popularity
        self.candidates: Optional[torch.Tensor] = None  # (C, D) or (C, 1): refreshed per evaluation, read by every batch
        self.step = CudaGraphStep(self._batch_sums, use_graph and popularity is None)

    def _candidate_matrix(self) -> torch.Tensor:
        """Normalised candidate embeddings, or the popularity scores as a (C, 1) column."""
        if self.popularity is not None:
            return self.popularity.to(torch.float32).unsqueeze(1)
        candidates = self.model.item_embedding(self.index.candidate_ids.long())
        return torch.nn.functional.normalize(candidates, dim=-1, eps=1e-6)

    def _batch_sums(self, samples: torch.Tensor, total: int) -> torch.Tensor:
        """Sums of every metric over one batch, then the batch size."""
        batch = self.sequences.gather(samples, self.max_history, self.model.max_seq_len, total)
        if self.popularity is None:
            out, offsets = self.model(batch.ids, batch.timestamps, batch.lengths, batch.total)
            query = out[offsets[:-1] + batch.lengths - 1]
        else:
            query = self.candidates.new_ones(batch.targets.numel(), 1)
        pos = torch.arange(batch.ids.shape[1], device=batch.ids.device)
        history = torch.where(pos[None, :] < batch.lengths[:, None], batch.ids, 0)
        per_user = metrics_from_ranks(target_ranks(query, self.candidates, self.index, batch.targets, history))
        count = per_user["mrr"].new_full((1,), batch.targets.numel())
        return torch.cat([torch.stack([per_user[n].sum() for n in metric_names()]), count])

    @torch.no_grad()
    def __call__(self, samples: np.ndarray, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Metric averages over `samples` (this rank's share, summed over ranks)."""
        was_training = self.model.training
        self.model.eval()
        if self.candidates is None:
            self.candidates = self._candidate_matrix()
        else:  # in place: a captured graph reads this buffer
            self.candidates.copy_(self._candidate_matrix())
        device = self.sequences.offsets.device
        on_device = torch.as_tensor(samples, device=device)  # one upload, no per-batch host sync
        sums = torch.zeros(len(metric_names()) + 1, dtype=torch.float64, device=device)
        for b, start in enumerate(range(0, samples.shape[0], self.batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            end = start + self.batch_size
            sums += self.step(on_device[start:end], history_total(samples[start:end], self.max_history))
        if dist.is_initialized():
            dist.all_reduce(sums)
        self.model.train(was_training)
        values = sums.tolist()
        return average(dict(zip(metric_names(), values[:-1])), values[-1])
