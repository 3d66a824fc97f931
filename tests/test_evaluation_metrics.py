"""evaluation/metrics.py (AUC, NE, RMSE, accuracy, NDCG) against direct formulas and sklearn's AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from generative_recommenders.evaluation.metrics import (
    RankingPredictions, accuracy, auc, ndcg_at_k, normalized_entropy, ranking_metrics, rmse,
)

labelled_scores = st.integers(2, 60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 6), min_size=n, max_size=n),  # few distinct values: many ties
    st.lists(st.booleans(), min_size=n, max_size=n),
))


@settings(max_examples=60, deadline=None)
@given(case=labelled_scores)
def test_auc_matches_sklearn_with_ties(case):
    scores, labels = (torch.tensor(x, dtype=torch.float64) for x in case)
    if labels.min() == labels.max():
        assert math.isnan(auc(scores, labels))
        return
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_auc_by_hand():
    # Positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9 > 0.5), (0.9 > 0.1), (0.5 = 0.5 -> 1/2), (0.5 > 0.1).
    assert auc(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(3.5 / 4)
    assert auc(torch.tensor([0.2, 0.2]), torch.tensor([1, 0])) == 0.5


@settings(max_examples=40, deadline=None)
@given(probs=st.lists(st.floats(0.01, 0.99), min_size=2, max_size=40), seed=st.integers(0, 1000))
def test_normalized_entropy_is_log_loss_over_base_rate_entropy(probs, seed):
    labels = np.random.default_rng(seed).integers(0, 2, len(probs))
    if labels.min() == labels.max():
        labels[0] = 1 - labels[0]
    p = np.array(probs)
    log_loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    rate = labels.mean()
    expected = log_loss / -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert normalized_entropy(torch.tensor(p), torch.tensor(labels)) == pytest.approx(expected, rel=1e-10)


def test_normalized_entropy_of_the_base_rate_is_one():
    labels = torch.tensor([1, 0, 0, 1, 1])
    assert normalized_entropy(torch.full((5,), 0.6), labels) == pytest.approx(1.0)
    assert math.isnan(normalized_entropy(torch.full((3,), 0.5), torch.ones(3)))


def test_rmse_and_accuracy():
    assert rmse(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 5.0])) == pytest.approx(math.sqrt((1 + 4) / 2))
    assert accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5, 5])) == 0.5


def _ndcg_loop(scores, gains, valid, k):
    """Per row: sort the valid entries by score (stable), DCG / ideal DCG with 1 / log2(rank + 1)."""
    out = []
    for s, g, v in zip(scores, gains, valid):
        entries = [(s[j], g[j]) for j in range(len(s)) if v[j]]
        ranked = [g_ for _, g_ in sorted(entries, key=lambda e: -e[0])]
        ideal = sorted((g_ for _, g_ in entries), reverse=True)
        dcg = sum(g_ / math.log2(r + 2) for r, g_ in enumerate(ranked[:k]))
        idcg = sum(g_ / math.log2(r + 2) for r, g_ in enumerate(ideal[:k]))
        out.append(dcg / idcg if idcg > 0 else math.nan)
    return out


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 14), k=st.sampled_from([1, 3, 10]), seed=st.integers(0, 999))
def test_ndcg_matches_a_loop(rows, width, k, seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(rows, width))  # distinct: the tie order is not under test here
    gains = rng.integers(0, 3, (rows, width)).astype(np.float64)
    valid = rng.random((rows, width)) < 0.8
    got = ndcg_at_k(torch.tensor(scores), torch.tensor(gains), torch.tensor(valid), k).tolist()
    want = _ndcg_loop(scores, gains, valid, k)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_ndcg_by_hand():
    # Gains [0, 1, 1] scored [0.9, 0.8, 0.1]: DCG = 1/log2(3) + 1/log2(4), IDCG = 1 + 1/log2(3).
    got = ndcg_at_k(torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([[0.0, 1.0, 1.0]]),
                    torch.ones(1, 3, dtype=torch.bool))
    assert got.item() == pytest.approx((1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3)))


def test_ranking_metrics_of_hand_predictions():
    pred = RankingPredictions(
        liked_prob=torch.tensor([[0.9, 0.2], [0.7, 0.0]]),
        expected_rating=torch.tensor([[4.5, 2.0], [3.0, 0.0]]),
        rating_class=torch.tensor([[5, 2], [3, 1]]),
        ratings=torch.tensor([[4.0, 2.0], [5.0, 0.0]]),
        valid=torch.tensor([[True, True], [True, False]]),
    )
    m = ranking_metrics(pred)
    assert m["auc"] == pytest.approx(1.0)  # liked: 0.9, 0.7 vs not liked: 0.2
    assert m["rmse"] == pytest.approx(math.sqrt((0.25 + 0 + 4) / 3))
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["candidates"] == 3 and m["liked_rate"] == pytest.approx(2 / 3)
    # User 1's two candidates have both labels; user 2 has one candidate: the per-user metrics are user 1's.
    assert m["ndcg@10"] == pytest.approx(1.0) and m["user_auc"] == 1.0 and m["users_averaged"] == 1
