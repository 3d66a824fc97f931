"""Metrics, vectorised in torch on any device: retrieval's rank metrics and generative ranking's (issue 12).

Retrieval: HR@K, NDCG@K and MRR of a target's rank among all candidates, as
expected values over the ranks its ties could take (evaluation/retrieval.py).

Ranking:
- AUC of "liked": the Mann-Whitney statistic, tied scores counted as half.
- NE (normalised entropy, as the paper reports): mean log loss divided by the
  entropy of the base rate (the fraction of positives) of the same examples;
  below 1 means better than always predicting the base rate.
- RMSE of the predicted rating; accuracy of the predicted rating class.
- Per user, over the held-out candidates ranked among each other by the
  "liked" score: the user's AUC (user_auc) and NDCG@10 with the liked label
  as the gain, averaged over the users they are defined for, those with
  candidates of both labels (`users_averaged` of them).
A metric undefined on the candidates' labels (AUC and NE with one label only,
the per-user metrics without a user of both labels) is left out of the
results, never NaN; `undefined_ranking_metrics` gives the reason.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, List, Tuple

import torch

from generative_recommenders.data.ranking import LIKED_RATING

# Retrieval's metrics at these cut-offs (metric_names); ranking's NDCG at NDCG_K.
HR_NDCG_KS = (1, 10, 20, 50, 100, 200)
HR_ONLY_KS = (500, 1000)
MRR_KS = (20,)  # MRR@20 (0 beyond rank 20), GRU4Rec's session metric
NDCG_K = 10
_PROB_EPS = 1e-7


def metric_names() -> list:
    names = [f"{m}@{k}" for k in HR_NDCG_KS for m in ("ndcg", "hr")]
    return names + [f"hr@{k}" for k in HR_ONLY_KS] + ["mrr"] + [f"mrr@{k}" for k in MRR_KS]


class RankMetrics:
    """Expected metric values over ranks h + 1 .. h + t + 1, from prefix sums of each metric's gain."""

    def __init__(self, rank_cap: int, device: torch.device) -> None:
        self.rank_cap = rank_cap
        ranks = torch.arange(1, rank_cap + 1, dtype=torch.float64, device=device)  # 1 .. cap
        zero = torch.zeros(1, dtype=torch.float64, device=device)
        self.discount_sum = torch.cat([zero, (1.0 / torch.log2(ranks + 1)).cumsum(0)])
        self.harmonic_sum = torch.cat([zero, (1.0 / ranks).cumsum(0)])

    @staticmethod
    def _sum_up_to(prefix: torch.Tensor, before: torch.Tensor, last: torch.Tensor, k: int) -> torch.Tensor:
        """Sum of a gain over ranks before+1..last when prefix[n] sums ranks 1..n and the gain is 0 beyond k."""
        return prefix[last.clamp(max=k)] - prefix[before.clamp(max=k)]

    def __call__(self, higher: torch.Tensor, ties: torch.Tensor, missing: torch.Tensor) -> Dict[str, torch.Tensor]:
        cap = self.rank_cap
        # Ranks beyond the cap (and unrankable targets) count as cap + 1, as the release's top-k search did.
        before = torch.where(missing, cap, higher)  # ranks before+1 .. last, each equally likely
        last = torch.where(missing, cap + 1, higher + ties + 1)
        width = (last - before).to(torch.float64)
        beyond_cap = (last - before.clamp(min=cap)).clamp(min=0).to(torch.float64)
        out = {}
        for k in HR_NDCG_KS + HR_ONLY_KS:
            k_ranked = min(k, cap)  # rank cap + 1 stands for "not found": never a hit
            out[f"hr@{k}"] = (last.clamp(max=k_ranked) - before).clamp(min=0).to(torch.float64) / width
            if k in HR_NDCG_KS:
                out[f"ndcg@{k}"] = self._sum_up_to(self.discount_sum, before, last, k_ranked) / width
        out["mrr"] = (self._sum_up_to(self.harmonic_sum, before, last, cap) + beyond_cap / (cap + 1)) / width
        for k in MRR_KS:
            out[f"mrr@{k}"] = self._sum_up_to(self.harmonic_sum, before, last, min(k, cap)) / width
        return out


def average(sums: Dict[str, float], count: float) -> Dict[str, float]:
    return {name: value / max(count, 1.0) for name, value in sums.items()}


def format_metrics(metrics: Dict[str, float], names: Iterable[str] = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")) -> str:
    return " ".join(f"{n}={metrics[n]:.4f}" for n in names if n in metrics and not math.isnan(metrics[n]))


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


PER_USER_METRICS = ("user_auc", f"ndcg@{NDCG_K}")
_PAIR_CHUNK = 1 << 22  # score pairs compared at once by user_aucs


def user_aucs(scores: torch.Tensor, liked: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(S,) AUC of each row's valid entries (ties: 1/2); NaN for a row without both labels."""
    pos, neg = valid & liked, valid & ~liked
    step = max(1, _PAIR_CHUNK // max(scores.shape[1] ** 2, 1))
    wins = []
    for start in range(0, scores.shape[0], step):  # (rows, K, K) comparisons, a chunk of rows at a time
        s = scores[start:start + step].double()
        beats = (s[:, :, None] > s[:, None, :]).double() + 0.5 * (s[:, :, None] == s[:, None, :]).double()
        pairs = pos[start:start + step, :, None] & neg[start:start + step, None, :]
        wins.append((beats * pairs).sum((1, 2)))
    num_pairs = pos.sum(1).double() * neg.sum(1).double()
    return torch.where(num_pairs > 0, torch.cat(wins) / num_pairs.clamp(min=1), math.nan)


def _label_mix(ratings: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, bool, torch.Tensor]:
    """(liked labels, whether the valid candidates have both labels, (S,) rows with both labels)."""
    liked = ratings >= LIKED_RATING
    positives = (liked & valid).sum(1)
    negatives = (~liked & valid).sum(1)
    return liked, bool(positives.sum() > 0 and negatives.sum() > 0), (positives > 0) & (negatives > 0)


def undefined_ranking_metrics(ratings: torch.Tensor, valid: torch.Tensor) -> Dict[str, str]:
    """Metric -> why ranking_metrics leaves it out for candidates with these (S, K) labels (nothing: all defined)."""
    _, both_labels, mixed_users = _label_mix(ratings, valid)
    reasons = {}
    if not both_labels:
        reasons.update(dict.fromkeys(("auc", "ne"), "the candidates are all liked or all not liked"))
    if not bool(mixed_users.any()):
        reasons.update(dict.fromkeys(PER_USER_METRICS, "no user has two candidates of different labels"))
    return reasons


def ranking_metrics(pred: RankingPredictions) -> Dict[str, float]:
    """auc, ne, rmse, accuracy over all valid candidates; user_auc, ndcg@10 averaged over users_averaged users.

    Metrics undefined on these labels are left out (undefined_ranking_metrics says why).
    """
    valid = pred.valid
    liked_all, both_labels, mixed_users = _label_mix(pred.ratings, valid)
    liked, probs, ratings = liked_all[valid], pred.liked_prob[valid], pred.ratings[valid]
    metrics = {"auc": auc(probs, liked), "ne": normalized_entropy(probs, liked)} if both_labels else {}
    metrics.update({
        "rmse": rmse(pred.expected_rating[valid], ratings),
        "accuracy": accuracy(pred.rating_class[valid], ratings.floor().long()),
    })
    if bool(mixed_users.any()):
        scores, gains = pred.liked_prob[mixed_users], liked_all[mixed_users]
        metrics["user_auc"] = float(user_aucs(scores, gains, valid[mixed_users]).mean())
        metrics[f"ndcg@{NDCG_K}"] = float(ndcg_at_k(scores, gains.double(), valid[mixed_users]).mean())
    metrics.update({"users_averaged": float(mixed_users.sum()), "liked_rate": float(liked.double().mean()),
                    "candidates": float(valid.sum())})
    return metrics
