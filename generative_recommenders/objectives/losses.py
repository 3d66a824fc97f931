"""Retrieval losses: score (query, item) pairs and push the positive above the rest.

Every loss takes (L, D) queries, their (L,) positive item ids (0 = no
supervision) and the model's `item_vectors` (ids -> the embeddings scored
against, L2-normalised unless train_fn.item_l2_norm is off); logits are dot
products / temperature.

The sampled losses score each position against R negatives drawn uniformly with
replacement (`negative_logits`). On CUDA, when the L * R draws are at least as
many as the pool's items (all frozen sampled-softmax recipes), the whole pool is
normalised once and the ops/gathered_dot.py kernel takes each query's dot
products with its sampled rows in registers: neither the (L, R, D) gathered
embeddings nor the (L, pool) scores of a dense matmul exist, and the gradient
of the pool's vectors is added in place with atomics instead of through the
gathered rows and the embedding's sort-based scatter. Without the kernel (CPU,
or fewer draws than items) a small pool is scored whole with one matmul and
its sampled columns picked, a large one by gathering the sampled embeddings.

- SampledSoftmaxLoss (the release's default, REFERENCE.md section 3):
  cross-entropy over the positive and R negatives drawn uniformly with
  replacement; a negative equal to the positive gets logit -5e4.
- BCELoss (the release's other option): binary cross-entropy of the positive
  and one negative, at temperature 1 as in the release.
- FullSoftmaxLoss ("SASRec+", REFERENCE.md section 12): cross-entropy over
  every candidate (ops/linear_cross_entropy.py): on CUDA a fused Triton kernel
  whose (L, C) logits never leave the chip, elsewhere in row chunks so they
  never exist at once. When the candidates are consecutive ids and the item
  table is given, the loss gets its raw rows and normalises them itself (the
  kernel returns the raw rows' gradient: no autograd backward of F.normalize).
- BPRLoss / BPRMaxLoss (GRU4Rec's pairwise losses, Hidasi et al.): mean of
  -log sigmoid(s+ - s-) over R negatives; BPR-max weights the pairs by the
  softmax of the negatives' scores and adds reg * sum softmax * s-^2.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from generative_recommenders.config import ConfigError
from generative_recommenders.data.candidates import CandidateIndex
from generative_recommenders.modeling.embeddings import ItemTable
from ops.gathered_dot import gathered_dot
from ops.gathered_dot import triton_available as gathered_dot_kernel_available
from ops.linear_cross_entropy import linear_cross_entropy

NEGATIVE_EQUALS_POSITIVE_LOGIT = -5e4
SAMPLING_STRATEGIES = ("local", "in-batch")
SAMPLED_LOSSES = ("SampledSoftmaxLoss", "BCELoss", "BPRLoss", "BPRMaxLoss")
LOSSES = SAMPLED_LOSSES + ("FullSoftmaxLoss",)

ItemVectors = Callable[[Union[torch.Tensor, slice]], torch.Tensor]  # ids, or a slice of consecutive ids


class NegativesSampler:
    """Draws negatives uniformly with replacement.

    "local": from the data set's candidate ids. "in-batch": from the unique
    positive ids of the current batch (a host sync: not for CUDA graphs).
    """

    def __init__(self, strategy: str, candidate_ids: torch.Tensor) -> None:
        if strategy not in SAMPLING_STRATEGIES:
            raise ConfigError(f"train_fn.sampling_strategy must be one of {', '.join(SAMPLING_STRATEGIES)}; "
                              f"got {strategy!r}")
        self.strategy = strategy
        self.candidate_ids = candidate_ids
        self.candidate_range = consecutive_range(candidate_ids)

    @property
    def graph_safe(self) -> bool:
        return self.strategy == "local"

    def pool(self, positive_ids: torch.Tensor) -> torch.Tensor:
        """The ids negatives are drawn from."""
        if self.strategy == "local":
            return self.candidate_ids
        return torch.unique(positive_ids[positive_ids != 0])

    def pool_rows(self, pool: torch.Tensor) -> Union[torch.Tensor, slice]:
        """`pool` for item_vectors: a slice when it is the candidates and they are consecutive ids."""
        return self.candidate_range if self.strategy == "local" and self.candidate_range else pool


def consecutive_range(ids: torch.Tensor) -> Optional[slice]:
    """slice(first, last + 1) when `ids` are consecutive increasing integers (checked once, on the host)."""
    if ids.numel() == 0 or not bool((ids[1:] - ids[:-1] == 1).all()):
        return None
    return slice(int(ids[0]), int(ids[-1]) + 1)


def negative_logits(
    query: torch.Tensor,
    positive_ids: torch.Tensor,
    item_vectors: ItemVectors,
    sampler: NegativesSampler,
    num: int,
    generator: Optional[torch.Generator] = None,
    item_table: Optional[ItemTable] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L, num) negative ids and their dot products with the (L, D) queries.

    Three equivalent ways, chosen by cost (module docstring); all draw the
    same negatives from the same random numbers, and none syncs with the
    host or depends on the data for a shape (CUDA graphs) when the sampler
    is "local":
    - fused kernel (CUDA with Triton, L * num >= pool size): `gathered_dot`
      of the sampled columns against item_vectors of the whole pool (then no
      more work than item_vectors of every drawn id), or, when the pool is a
      range of consecutive ids and `item_table` is given, against the raw
      table rows, normalised inside the kernel;
    - small pool (<= 2 * num * D ids, e.g. MovieLens on CPU): one matmul of
      the queries with the whole pool, then the sampled columns (on 2 CPU
      cores, 800 items, D = 32, L = 3,000, num = 64, about the embedded
      default: 8 ms forward+backward, against 105 ms for the per-id path and
      72 ms for gathering rows of the normalised pool);
    - otherwise: the (L, num, D) sampled item vectors and a batched dot.
    """
    pool = sampler.pool(positive_ids)
    columns = torch.randint(0, pool.numel(), (positive_ids.numel(), num), device=pool.device, generator=generator)
    ids = pool[columns]
    if positive_ids.numel() * num >= pool.numel() and gathered_dot_kernel_available(query.device):
        rows = sampler.pool_rows(pool)
        if isinstance(rows, slice) and item_table is not None:  # normalised in the kernel, row by row
            return ids, gathered_dot(query, item_table.weight, columns, rows.start, item_table.eps)
        return ids, gathered_dot(query, item_vectors(rows), columns)
    if pool.numel() <= 2 * num * query.shape[-1]:
        return ids, (query @ item_vectors(sampler.pool_rows(pool)).T).gather(1, columns)
    return ids, torch.einsum("ld,lrd->lr", query, item_vectors(ids))


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of per-position losses over the supervised positions (weight 0: unsupervised); 0 when none is."""
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def sampled_softmax_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor, positive_ids: torch.Tensor,
                         negative_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of -log softmax([pos, negs])[0]; logits (L,) and (L, R), already / T."""
    negative_logits = negative_logits.masked_fill(negative_ids == positive_ids.unsqueeze(1),
                                                  NEGATIVE_EQUALS_POSITIVE_LOGIT)
    logits = torch.cat([positive_logits.unsqueeze(1), negative_logits], dim=1)
    return weighted_mean(-F.log_softmax(logits, dim=1)[:, 0], weights)


def bce_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor, positive_ids: torch.Tensor,
             negative_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the positive (label 1) and the first negative (label 0)."""
    # A negative that equals the positive is no negative: it contributes nothing.
    negative_weights = weights * (negative_ids[:, 0] != positive_ids).to(weights.dtype)
    positive = F.binary_cross_entropy_with_logits(positive_logits, torch.ones_like(positive_logits), reduction="none")
    negative = F.binary_cross_entropy_with_logits(negative_logits[:, 0], torch.zeros_like(positive_logits),
                                                  reduction="none")
    return (positive * weights + negative * negative_weights).sum() / weights.sum().clamp(min=1.0)


def bpr_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor, positive_ids: torch.Tensor,
             negative_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the negatives (those unequal to the positive) of -log sigmoid(s+ - s-)."""
    real = (negative_ids != positive_ids.unsqueeze(1)).to(positive_logits.dtype)
    pair_losses = -F.logsigmoid(positive_logits.unsqueeze(1) - negative_logits) * real
    return weighted_mean(pair_losses.sum(1) / real.sum(1).clamp(min=1.0), weights)


def bpr_max_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor, positive_ids: torch.Tensor,
                 negative_ids: torch.Tensor, weights: torch.Tensor, regularization: float) -> torch.Tensor:
    """-log sum_j softmax(s-)_j sigmoid(s+ - s-_j) + reg * sum_j softmax(s-)_j (s-_j)^2."""
    real = negative_ids != positive_ids.unsqueeze(1)
    log_p = torch.log_softmax(negative_logits.masked_fill(~real, float("-inf")), dim=1)
    # Rows whose negatives all equal the positive have no pairs: log_p is NaN there, zeroed below.
    log_p = torch.where(real, log_p, float("-inf"))
    ranking = -torch.logsumexp(log_p + F.logsigmoid(positive_logits.unsqueeze(1) - negative_logits), dim=1)
    penalty = (log_p.exp() * negative_logits.square()).sum(1)
    has_pairs = real.any(1)
    losses = torch.where(has_pairs, ranking + regularization * penalty, 0.0)
    return weighted_mean(losses, weights)


def full_softmax_loss(query: torch.Tensor, items: torch.Tensor, columns: torch.Tensor, weights: torch.Tensor,
                      temperature: float, eps: Optional[float] = None) -> torch.Tensor:
    """Weighted mean of -log softmax(query @ items.T / T)[positive column]; columns (L,), weights (L,);
    with eps, items are raw rows scored as F.normalize(items, eps=eps) (ops/linear_cross_entropy.py)."""
    return linear_cross_entropy(query, items, columns, temperature, weights, eps)


def _fp32(call: Callable) -> Callable:
    """RetrievalLoss.__call__ in (at least) fp32 whatever precision the encoder ran in
    (train_fn.mixed_precision, precision.py): autocast is off inside, and bf16 queries and item vectors are
    upcast (fp32 and fp64 pass unchanged)."""

    def upcast(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.promote_types(x.dtype, torch.float32))

    def fp32_call(self, query, positive_ids, item_vectors, generator=None, item_table=None):
        with torch.autocast(query.device.type, enabled=False):
            return call(self, upcast(query), positive_ids, lambda ids: upcast(item_vectors(ids)), generator,
                        item_table)

    fp32_call.__doc__ = call.__doc__
    return fp32_call


class RetrievalLoss:
    """The configured loss over (query, positive id) pairs; see the module docstring."""

    def __init__(self, name: str, candidates: CandidateIndex, sampling_strategy: str = "local",
                 num_negatives: int = 128, temperature: float = 0.05, bpr_max_regularization: float = 1.0) -> None:
        if name not in LOSSES:
            raise ConfigError(f"train_fn.loss_module must be one of {', '.join(LOSSES)}; got {name!r}")
        if name == "BCELoss" and temperature != 1.0:
            raise ConfigError("train_fn.loss_module = 'BCELoss' uses temperature 1.0 in the release "
                              f"(REFERENCE.md section 3); set train_fn.temperature = 1.0 (got {temperature})")
        self.name = name
        self.candidates = candidates
        self.sampler = NegativesSampler(sampling_strategy, candidates.candidate_ids)
        self.num_negatives = 1 if name == "BCELoss" else num_negatives
        self.temperature = temperature
        self.bpr_max_regularization = bpr_max_regularization

    @property
    def graph_safe(self) -> bool:
        """Whether the loss runs without host syncs (CUDA-graph capture)."""
        return self.name == "FullSoftmaxLoss" or self.sampler.graph_safe

    @_fp32
    def __call__(self, query: torch.Tensor, positive_ids: torch.Tensor, item_vectors: ItemVectors,
                 generator: Optional[torch.Generator] = None, item_table: Optional[ItemTable] = None) -> torch.Tensor:
        """Loss of (L, D) queries and their (L,) positive ids (0 = unsupervised)."""
        weights = (positive_ids != 0).to(query.dtype)
        if self.name == "FullSoftmaxLoss":
            columns = self.candidates.columns(positive_ids)
            weights = weights * (columns >= 0).to(query.dtype)
            rows = self.sampler.candidate_range
            if rows is not None and item_table is not None:  # the raw rows, normalised inside the loss
                return full_softmax_loss(query, item_table.weight[rows], columns, weights, self.temperature,
                                         item_table.eps)
            items = item_vectors(rows or self.candidates.candidate_ids)
            return full_softmax_loss(query, items, columns, weights, self.temperature)
        negative_ids, negatives = negative_logits(query, positive_ids, item_vectors, self.sampler,
                                                  self.num_negatives, generator, item_table)
        positives = (query * item_vectors(positive_ids)).sum(-1)
        args = (positives / self.temperature, negatives / self.temperature, positive_ids, negative_ids, weights)
        if self.name == "SampledSoftmaxLoss":
            return sampled_softmax_loss(*args)
        if self.name == "BCELoss":
            return bce_loss(*args)
        if self.name == "BPRLoss":
            return bpr_loss(*args)
        return bpr_max_loss(*args, regularization=self.bpr_max_regularization)
