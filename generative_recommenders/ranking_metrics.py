"""Metrics of generative ranking (issue 12), vectorised in torch on any device.

- AUC of "liked": the Mann-Whitney statistic, tied scores counted as half.
- NE (normalised entropy, as the paper reports): mean log loss divided by the
  entropy of the base rate (the fraction of positives) of the same examples;
  below 1 means better than always predicting the base rate.
- RMSE of the predicted rating; accuracy of the predicted rating class.
- NDCG@10 per user of the held-out candidates ranked among each other by the
  "liked" score, with the liked label as the gain; averaged over users with
  at least two candidates and at least one liked one (otherwise undefined).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List

import torch

from generative_recommenders.data.ranking import LIKED_RATING

NDCG_K = 10
_PROB_EPS = 1e-7


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties: 1/2); NaN without both."""
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1).double()
    positives = labels.sum()
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        return math.nan
    order = torch.argsort(scores)
    _, counts = torch.unique_consecutive(scores[order], return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = torch.repeat_interleave(ends - (counts.double() - 1) / 2, counts)  # 1-based, ties averaged
    rank_sum = (mean_rank * labels[order]).sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def normalized_entropy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean log loss / entropy of the base rate; NaN when the labels are all equal."""
    p = probs.reshape(-1).double().clamp(_PROB_EPS, 1 - _PROB_EPS)
    y = labels.reshape(-1).double()
    log_loss = -(y * torch.log(p) + (1 - y) * torch.log1p(-p)).mean()
    rate = y.mean()
    if rate <= 0 or rate >= 1:
        return math.nan
    entropy = -(rate * torch.log(rate) + (1 - rate) * torch.log1p(-rate))
    return float(log_loss / entropy)


def rmse(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    return float((predictions.double() - targets.double()).square().mean().sqrt())


def accuracy(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    return float((predicted == targets).double().mean())


def ndcg_at_k(scores: torch.Tensor, gains: torch.Tensor, valid: torch.Tensor, k: int = NDCG_K) -> torch.Tensor:
    """(S,) NDCG@k of each row's valid entries ranked by score (ties: earlier entry first); NaN where IDCG = 0."""
    gains = torch.where(valid, gains.double(), 0.0)
    order = torch.argsort(scores.double().masked_fill(~valid, -math.inf), dim=1, descending=True, stable=True)
    discount = 1.0 / torch.log2(torch.arange(2, scores.shape[1] + 2, device=scores.device, dtype=torch.float64))
    discount[k:] = 0.0
    dcg = (gains.gather(1, order) * discount).sum(1)
    idcg = (gains.sort(dim=1, descending=True).values * discount).sum(1)
    return torch.where(idcg > 0, dcg / idcg, math.nan)


@dataclasses.dataclass
class RankingPredictions:
    """Per sample (user) and candidate slot, (S, K); `valid` marks real candidates."""

    liked_prob: torch.Tensor
    expected_rating: torch.Tensor
    rating_class: torch.Tensor  # predicted rating 1..5
    ratings: torch.Tensor  # labels
    valid: torch.Tensor

    @staticmethod
    def concat(parts: List["RankingPredictions"]) -> "RankingPredictions":
        """The rows of several batches (with the same number of candidate slots)."""
        fields = dataclasses.fields(RankingPredictions)
        return RankingPredictions(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields))


def ranking_metrics(pred: RankingPredictions) -> Dict[str, float]:
    """auc, ne, rmse, accuracy (of "liked" and of the rating over all valid candidates), ndcg@10 per user."""
    valid = pred.valid
    liked = (pred.ratings >= LIKED_RATING)[valid]
    probs = pred.liked_prob[valid]
    ratings = pred.ratings[valid]
    metrics = {
        "auc": auc(probs, liked),
        "ne": normalized_entropy(probs, liked),
        "rmse": rmse(pred.expected_rating[valid], ratings),
        "accuracy": accuracy(pred.rating_class[valid], ratings.floor().long()),
        "liked_rate": float(liked.double().mean()),
        "candidates": float(valid.sum()),
    }
    per_user = ndcg_at_k(pred.liked_prob, (pred.ratings >= LIKED_RATING).double(), valid)
    defined = ~torch.isnan(per_user) & (valid.sum(1) > 1)
    metrics[f"ndcg@{NDCG_K}"] = float(per_user[defined].mean()) if defined.any() else math.nan
    metrics["ndcg_users"] = float(defined.sum())
    return metrics
