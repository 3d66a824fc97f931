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

    def sample_ids(
        self, positive_ids: torch.Tensor, num: int, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """(L,) positives -> (L, num) negative ids."""
        pool = self.candidate_ids if self.strategy == "local" else torch.unique(positive_ids[positive_ids != 0])
        index = torch.randint(
            0, pool.numel(), (positive_ids.numel(), num), device=pool.device, generator=generator
        )
        return pool[index]


def sampled_softmax_loss(
    query: torch.Tensor,
    positive_embeddings: torch.Tensor,
    negative_embeddings: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Weighted mean of -log softmax([pos, negs] / T)[0]; (L, D), (L, D), (L, R, D)."""
    positive_logits = (query * positive_embeddings).sum(-1, keepdim=True) / temperature
    negative_logits = torch.einsum("ld,lrd->lr", query, negative_embeddings) / temperature
    negative_logits = negative_logits.masked_fill(
        negative_ids == positive_ids.unsqueeze(1), NEGATIVE_EQUALS_POSITIVE_LOGIT
    )
    logits = torch.cat([positive_logits, negative_logits], dim=1)
    losses = -F.log_softmax(logits, dim=1)[:, 0]
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def bce_loss(
    query: torch.Tensor,
    positive_embeddings: torch.Tensor,
    negative_embeddings: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Binary cross-entropy of the positive (label 1) and one negative (label 0)."""
    positive_logits = (query * positive_embeddings).sum(-1) / temperature
    negative_logits = (query * negative_embeddings[:, 0]).sum(-1) / temperature
    # A negative that equals the positive is no negative: it contributes nothing.
    negative_weights = weights * (negative_ids[:, 0] != positive_ids).to(weights.dtype)
    losses = F.binary_cross_entropy_with_logits(
        positive_logits, torch.ones_like(positive_logits), reduction="none"
    ) * weights + F.binary_cross_entropy_with_logits(
        negative_logits, torch.zeros_like(negative_logits), reduction="none"
    ) * negative_weights
    return losses.sum() / weights.sum().clamp(min=1.0)


def autoregressive_loss(
    loss_module: str,
    query: torch.Tensor,
    positive_ids: torch.Tensor,
    item_table: torch.nn.Module,
    sampler: NegativesSampler,
    num_negatives: int,
    temperature: float,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss for (L, D) queries and their (L,) next ids (0 = unsupervised). Returns (loss, #supervised)."""
    if loss_module not in LOSSES:
        raise ValueError(f"train_fn.loss_module must be one of {LOSSES}, got {loss_module!r}")
    weights = (positive_ids != 0).to(query.dtype)
    num = num_negatives if loss_module == "SampledSoftmaxLoss" else 1
    negative_ids = sampler.sample_ids(positive_ids, num, generator)
    positive_embeddings = sampler.normalize(item_table(positive_ids))
    negative_embeddings = sampler.normalize(item_table(negative_ids))
    fn = sampled_softmax_loss if loss_module == "SampledSoftmaxLoss" else bce_loss
    loss = fn(query, positive_embeddings, negative_embeddings, positive_ids, negative_ids, weights, temperature)
    return loss, weights.sum()
