"""Negative sampling and the autoregressive losses (REFERENCE.md section 3).

Every valid position i of a history predicts the id at position i + 1. The
default loss is a sampled softmax over the positive and R uniformly drawn
negatives, with L2-normalised item embeddings and a temperature; a BCE loss
with one negative is the release's other option.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

NEGATIVE_EQUALS_POSITIVE_LOGIT = -5e4
SAMPLING_STRATEGIES = ("local", "in-batch")
LOSSES = ("SampledSoftmaxLoss", "BCELoss")


class NegativesSampler:
    """Draws negatives uniformly with replacement, and normalises item embeddings.

    "local": from the data set's candidate ids. "in-batch": from the unique
    positive ids of the current batch.
    """

    def __init__(self, strategy: str, candidate_ids: torch.Tensor, l2_norm: bool = True, eps: float = 1e-6) -> None:
        if strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"train_fn.sampling_strategy must be one of {SAMPLING_STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.candidate_ids = candidate_ids
        self.l2_norm = l2_norm
        self.eps = eps

    def normalize(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=-1, eps=self.eps) if self.l2_norm else embeddings

    def pool(self, positive_ids: torch.Tensor) -> torch.Tensor:
        """The ids negatives are drawn from (uniformly, with replacement)."""
        if self.strategy == "local":
            return self.candidate_ids
        return torch.unique(positive_ids[positive_ids != 0])


def sampled_softmax_loss(
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted mean of -log softmax([pos, negs])[0]; logits (L,) and (L, R), already / T."""
    negative_logits = negative_logits.masked_fill(
        negative_ids == positive_ids.unsqueeze(1), NEGATIVE_EQUALS_POSITIVE_LOGIT
    )
    logits = torch.cat([positive_logits.unsqueeze(1), negative_logits], dim=1)
    losses = -F.log_softmax(logits, dim=1)[:, 0]
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def bce_loss(
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Binary cross-entropy of the positive (label 1) and the first negative (label 0)."""
    # A negative that equals the positive is no negative: it contributes nothing.
    negative_weights = weights * (negative_ids[:, 0] != positive_ids).to(weights.dtype)
    losses = F.binary_cross_entropy_with_logits(
        positive_logits, torch.ones_like(positive_logits), reduction="none"
    ) * weights + F.binary_cross_entropy_with_logits(
        negative_logits[:, 0], torch.zeros_like(positive_logits), reduction="none"
    ) * negative_weights
    return losses.sum() / weights.sum().clamp(min=1.0)


def negative_logits(
    query: torch.Tensor,
    positive_ids: torch.Tensor,
    item_table: torch.nn.Module,
    sampler: NegativesSampler,
    num: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L, num) negative ids and their dot products with the (L, D) queries.

    Two equivalent ways, chosen by cost: gather the (L, num, D) negative
    embeddings, or, when the candidate set is small (C <= 2 * num * D, e.g.
    MovieLens), score every candidate with one matmul and pick the sampled
    columns, which avoids the embedding gather and its scatter-add backward.
    Both draw the same negatives from the same random numbers.
    """
    pool = sampler.pool(positive_ids)
    columns = torch.randint(0, pool.numel(), (positive_ids.numel(), num), device=pool.device, generator=generator)
    ids = pool[columns]
    if pool.numel() <= 2 * num * query.shape[-1]:
        scores = query @ sampler.normalize(item_table(pool)).T
        return ids, scores.gather(1, columns)
    return ids, torch.einsum("ld,lrd->lr", query, sampler.normalize(item_table(ids)))


def autoregressive_loss(
    loss_module: str,
    query: torch.Tensor,
    positive_ids: torch.Tensor,
    item_table: torch.nn.Module,
    sampler: NegativesSampler,
    num_negatives: int,
    temperature: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Loss for (L, D) queries and their (L,) next ids (0 = unsupervised)."""
    if loss_module not in LOSSES:
        raise ValueError(f"train_fn.loss_module must be one of {LOSSES}, got {loss_module!r}")
    weights = (positive_ids != 0).to(query.dtype)
    num = num_negatives if loss_module == "SampledSoftmaxLoss" else 1
    negative_ids, negatives = negative_logits(query, positive_ids, item_table, sampler, num, generator)
    positives = (query * sampler.normalize(item_table(positive_ids))).sum(-1)
    fn = sampled_softmax_loss if loss_module == "SampledSoftmaxLoss" else bce_loss
    return fn(positives / temperature, negatives / temperature, positive_ids, negative_ids, weights)
