"""Multi-task losses of generative ranking (issue 12).

At every supervised position of a RankingBatch (candidates, or the history
items of a training sample): binary cross-entropy of "liked" (rating >= 4), and
the rating's cross-entropy over the classes 1..5 or its squared error,
depending on the model's rating head. Optionally, as in the paper, the
next-item retrieval loss (objectives/losses.py, train_fn.loss_module) at
history item positions (action tokens and the last history item carry no
next-item label). Each term has a weight; weight 0 switches it off (it is then
not computed).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import gin
import torch
import torch.nn.functional as F

from generative_recommenders.config import ConfigError
from generative_recommenders.data.ranking import LIKED_RATING, RankingBatch
from generative_recommenders.modeling.ranking_model import RankingModel
from generative_recommenders.objectives.losses import RetrievalLoss, weighted_mean
from ops.jagged import jagged_values

TERMS = ("liked", "rating", "next_item")


@gin.configurable("ranking_objective")
@dataclasses.dataclass(frozen=True)
class RankingObjective:
    liked_weight: float = 1.0
    rating_weight: float = 1.0
    next_item_weight: float = 0.0  # the retrieval term: train_fn.loss_module, num_negatives, temperature

    def __post_init__(self) -> None:
        weights = [getattr(self, f"{term}_weight") for term in TERMS]
        if min(weights) < 0 or max(weights) == 0:
            raise ConfigError(f"ranking_objective weights must be >= 0 with at least one > 0, got {weights}")

    def weight(self, term: str) -> float:
        return getattr(self, f"{term}_weight")


def rating_loss(model: RankingModel, rating_output: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
    """Per-position loss: cross-entropy of the class floor(rating), or the squared error."""
    if model.heads.rating_head == "regression":
        return (rating_output - ratings).square()
    classes = (ratings.floor().long() - 1).clamp(min=0)  # unsupervised positions (0) get weight 0
    return F.cross_entropy(rating_output, classes, reduction="none")


def ranking_losses(
    model: torch.nn.Module,
    batch: RankingBatch,
    objective: RankingObjective,
    retrieval_loss: Optional[RetrievalLoss] = None,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """Each switched-on term and their weighted sum "loss" for one batch.

    `model` may be a DDP wrapper of a RankingModel; the next-item term needs `retrieval_loss`.
    """
    core: RankingModel = getattr(model, "module", model)
    out, offsets = model(batch)
    total = out.shape[0]
    ratings = jagged_values(batch.ratings, offsets, total)
    outputs = core.heads(out)  # fp32 logits, also under mixed precision
    weights = (ratings > 0).to(outputs["liked"].dtype)
    terms = {}
    if objective.liked_weight > 0:
        liked = (ratings >= LIKED_RATING).to(outputs["liked"].dtype)
        terms["liked"] = weighted_mean(
            F.binary_cross_entropy_with_logits(outputs["liked"], liked, reduction="none"), weights)
    if objective.rating_weight > 0:
        terms["rating"] = weighted_mean(rating_loss(core, outputs["rating"], ratings), weights)
    if objective.next_item_weight > 0:
        if retrieval_loss is None:
            raise ValueError("the next-item term needs a RetrievalLoss")
        terms["next_item"] = retrieval_loss(core.retrieval_queries(out), jagged_values(batch.next_item, offsets, total),
                                            core.item_vectors, generator, core.item_table())
    terms["loss"] = sum(objective.weight(term) * value for term, value in terms.items())
    return terms
