"""Ranking with several held-out candidates per user (issue 22): splits, context, per-user metrics, M-FALCON.

A hand case fixes where the holdout sits, what context each split's candidates
get and the per-user metrics of known scores; properties check that training
never reads a held-out interaction and that the per-user AUC is the plain pair
count; the evaluator's M-FALCON paths equal one pass per candidate in fp32.
"""

from __future__ import annotations

import json
import math

import gin
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from generative_recommenders.data.ranking import RankingSequences, padded_length, ranking_splits
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.evaluation.baselines import bias_baseline_predictions
from generative_recommenders.evaluation.metrics import (
    RankingPredictions, ranking_metrics, undefined_ranking_metrics, user_aucs,
)
from generative_recommenders.evaluation.ranking import RankingEvaluator
from generative_recommenders.modeling.ranking_model import RankingModel

CPU = torch.device("cpu")
MAX_ITEM_ID = 200  # _data's item ids stay below it for up to 9 users of up to 100 interactions
ENCODER_BINDINGS = [
    "hstu_encoder.num_blocks = 2", "hstu_encoder.num_heads = 2", "hstu_encoder.dqk = 4", "hstu_encoder.dv = 4",
    "hstu_encoder.attention_kernel = 'torch'",
    "sasrec_encoder.num_blocks = 2", "sasrec_encoder.num_heads = 2", "sasrec_encoder.ffn_hidden_dim = 8",
]


def _data(lengths, ratings=None) -> SequenceData:
    """User u's k-th interaction: item 10 * (u + 1) + k, time 100 * k + u, rating `ratings` or 1 + (k mod 5)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate([10 * (u + 1) + np.arange(n) for u, n in enumerate(lengths)])
    stamps = np.concatenate([100 * np.arange(n) + u for u, n in enumerate(lengths)])
    if ratings is None:
        ratings = np.concatenate([1 + np.arange(n) % 5 for n in lengths])
    return SequenceData(name="holdout", item_ids=items.astype(np.int32), ratings=np.asarray(ratings, np.float32),
                        timestamps=stamps.astype(np.int64), offsets=offsets,
                        user_ids=np.arange(1, len(lengths) + 1), candidate_ids=np.arange(1, 60, dtype=np.int32))


def _model(encoder: str, max_seq_len: int, seed: int) -> RankingModel:
    gin.clear_config()
    gin.parse_config(ENCODER_BINDINGS)
    try:
        torch.manual_seed(seed)
        model = RankingModel(encoder, MAX_ITEM_ID, max_seq_len, 8, dropout_rate=0.2, head_hidden_dim=8)
    finally:
        gin.clear_config()
    with torch.no_grad():  # weights far from the small init, so that every term of the encoder shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model


# ----------------------------------------------------------------------------- the hand case


def test_holdout_positions_and_context_by_hand():
    """k = 2: user 0 (7 interactions) and user 1 (5); user 2 (4 < 2k + 1) is left out."""
    data = _data([7, 5, 4])
    splits = ranking_splits(data.lengths, 2)
    assert splits["train"].tolist() == [[0, 3, 0], [1, 1, 0]]
    assert splits["valid"].tolist() == [[0, 3, 2], [1, 1, 2]]
    assert splits["test"].tolist() == [[0, 5, 2], [1, 3, 2]]
    sequences = RankingSequences(data, CPU)
    # Candidates: user 0's interactions 3, 4 (valid) and 5, 6 (test); user 1's 1, 2 and 3, 4.
    items, stamps, ratings, valid = sequences.candidates(torch.as_tensor(splits["test"]), 2)
    assert items.tolist() == [[15, 16], [23, 24]] and stamps.tolist() == [[500, 600], [301, 401]]
    assert ratings.tolist() == [[1, 2], [4, 5]] and valid.all()
    items, _, ratings, _ = sequences.candidates(torch.as_tensor(splits["valid"]), 2)
    assert items.tolist() == [[13, 14], [21, 22]] and ratings.tolist() == [[4, 5], [2, 3]]
    # Context of the test candidates: everything before them, the validation interactions with their actions.
    history = splits["test"].copy()
    history[:, 2] = 0
    test_context = sequences.batch(history, max_history=4, padded_len=8)
    assert test_context.item_ids[0].tolist() == [11, 0, 12, 0, 13, 0, 14, 0]  # last 4 of user 0's first 5
    assert test_context.action_ids[0].tolist() == [0, 2, 0, 3, 0, 4, 0, 5]
    assert test_context.item_ids[1].tolist() == [20, 0, 21, 0, 22, 0, 0, 0]
    # Training: the sequence before the validation candidates, nothing later.
    train = sequences.batch(splits["train"], max_history=4, padded_len=8)
    assert train.item_ids.tolist() == [[10, 0, 11, 0, 12, 0, 0, 0], [20, 0, 0, 0, 0, 0, 0, 0]]


def test_per_user_metrics_by_hand():
    """User 0: liked, liked, not (scores 0.9, 0.2, 0.5): AUC 1/2, one of two pairs won. User 1: not, liked
    (0.1, 0.8): AUC 1. User 2: liked, liked: no pair, left out of the per-user means; the all-over AUC keeps it."""
    pred = RankingPredictions(
        liked_prob=torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.0], [0.3, 0.7, 0.0]]),
        expected_rating=torch.tensor([[4.0, 4.0, 2.0], [2.0, 5.0, 0.0], [4.0, 4.0, 0.0]]),
        rating_class=torch.tensor([[4, 4, 2], [2, 5, 1], [4, 4, 1]]),
        ratings=torch.tensor([[4.0, 5.0, 1.0], [3.0, 4.0, 0.0], [5.0, 4.0, 0.0]]),
        valid=torch.tensor([[True, True, True], [True, True, False], [True, True, False]]),
    )
    m = ranking_metrics(pred)
    assert m["users_averaged"] == 2 and m["candidates"] == 7
    assert m["user_auc"] == pytest.approx((0.5 + 1.0) / 2)
    # NDCG@10, gains = liked: user 0 ranks (0.9 liked, 0.5 not, 0.2 liked): (1 + 1/2) / (1 + 1/log2(3)).
    user0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((user0 + 1.0) / 2)
    # Over all seven candidates: liked scores 0.9, 0.2, 0.8, 0.3, 0.7 against not liked 0.5, 0.1.
    assert m["auc"] == pytest.approx(roc_auc_score([1, 1, 0, 0, 1, 1, 1], [0.9, 0.2, 0.5, 0.1, 0.8, 0.3, 0.7]))


def test_undefined_metrics_are_left_out_with_their_reason():
    one = RankingPredictions(liked_prob=torch.tensor([[0.4], [0.6]]), expected_rating=torch.tensor([[3.0], [4.0]]),
                             rating_class=torch.tensor([[3], [4]]), ratings=torch.tensor([[2.0], [5.0]]),
                             valid=torch.ones(2, 1, dtype=torch.bool))
    m = ranking_metrics(one)
    assert "user_auc" not in m and "ndcg@10" not in m and m["users_averaged"] == 0
    assert all(math.isfinite(v) for v in m.values())
    assert set(undefined_ranking_metrics(one.ratings, one.valid)) == {"user_auc", "ndcg@10"}
    all_liked = RankingPredictions(**{**one.__dict__, "ratings": torch.tensor([[4.0], [5.0]])})
    m = ranking_metrics(all_liked)
    assert not {"auc", "ne", "user_auc", "ndcg@10"} & set(m) and m["rmse"] >= 0
    reasons = undefined_ranking_metrics(all_liked.ratings, all_liked.valid)
    assert set(reasons) == {"auc", "ne", "user_auc", "ndcg@10"} and "all liked" in reasons["auc"]


# ----------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_user_auc_is_the_pair_count_per_row(rows, width, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, (rows, width)).astype(np.float64)  # few values: ties
    liked = rng.random((rows, width)) < 0.5
    valid = rng.random((rows, width)) < 0.8
    got = user_aucs(torch.tensor(scores), torch.tensor(liked), torch.tensor(valid)).numpy()
    for r in range(rows):
        pos, neg = scores[r][valid[r] & liked[r]], scores[r][valid[r] & ~liked[r]]
        if pos.size == 0 or neg.size == 0:
            assert math.isnan(got[r])
            continue
        wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
        assert got[r] == pytest.approx(wins / (pos.size * neg.size), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=5), k=st.integers(1, 6),
       max_history=st.integers(1, 12))
def test_training_reads_no_held_out_interaction(lengths, k, max_history):
    """Item ids are unique per interaction: training batches read only interactions before the validation
    candidates; each split's context ends right before its candidates, which are the user's last k (test)
    and the k before them (valid)."""
    data = _data(lengths)
    splits = ranking_splits(data.lengths, k)
    if splits["train"].shape[0] == 0:
        return
    sequences = RankingSequences(data, CPU)
    width = padded_length(max_history, k)
    for user, end, _ in splits["train"]:
        n = data.lengths[user]
        assert end == n - 2 * k
        batch = sequences.batch(np.array([[user, end, 0]]), max_history, width)
        read = set(batch.item_ids[batch.item_ids > 0].tolist()) | set(batch.next_item[batch.next_item > 0].tolist())
        assert read == set(10 * (user + 1) + np.arange(max(0, end - max_history), end))
    for name, last in (("valid", 2 * k), ("test", k)):
        for user, end, count in splits[name]:
            assert end == data.lengths[user] - last and count == k
            items, _, _, _ = sequences.candidates(torch.tensor([[user, end, count]]), k)
            assert items[0].tolist() == (10 * (user + 1) + np.arange(end, end + k)).tolist()


# ----------------------------------------------------------------------------- M-FALCON evaluation


@pytest.mark.parametrize("encoder", ["HSTU", "SASRec"])
@pytest.mark.parametrize("seed", [0, 1])
def test_m_falcon_evaluation_equals_one_pass_per_candidate(encoder, seed):
    """fp32: the evaluation's M-FALCON passes (fused, and HSTU's cached history) give one pass per
    candidate's predictions. Equal to rounding (1e-6), not bitwise: the candidate's attention term is
    summed at another column and the matmuls run over other row counts."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(9, 30, 7)
    data = _data(lengths.tolist(), rng.integers(1, 6, int(lengths.sum())))
    k, max_history = 4, 8
    test = ranking_splits(data.lengths, k)["test"]
    model = _model(encoder, padded_length(max_history, k), seed)
    evaluator = RankingEvaluator(model, RankingSequences(data, CPU), max_history, batch_size=3)
    single = evaluator.predictions(test, "per_candidate")
    assert evaluator.paths() == (("m_falcon", "cached", "per_candidate") if encoder == "HSTU"
                                 else ("m_falcon", "per_candidate"))
    for path in evaluator.paths()[:-1]:
        joint = evaluator.predictions(test, path)
        assert torch.equal(joint.ratings, single.ratings) and torch.equal(joint.valid, single.valid)
        torch.testing.assert_close(joint.liked_prob, single.liked_prob, rtol=0, atol=1e-6, msg=path)
        torch.testing.assert_close(joint.expected_rating, single.expected_rating, rtol=0, atol=1e-5, msg=path)
    assert model.training  # the evaluator puts the model back as it found it


def test_timing_reports_each_paths_rate_and_its_gap():
    data = _data([12] * 5)
    test = ranking_splits(data.lengths, 3)["test"]
    model = _model("HSTU", padded_length(6, 3), 0)
    timing = RankingEvaluator(model, RankingSequences(data, CPU), 6, batch_size=2).timing(test, repeats=1)
    assert timing["users"] == 5 and timing["candidates"] == 15
    assert set(timing["per_candidate"]) == {"seconds", "candidates_per_second"}
    for path in ("m_falcon", "cached"):
        rate = timing[path]
        assert rate["candidates_per_second"] == pytest.approx(15 / rate["seconds"])
        assert rate["speedup"] == pytest.approx(rate["candidates_per_second"]
                                                / timing["per_candidate"]["candidates_per_second"])
        assert 0 <= rate["max_abs_diff_liked_prob"] < 1e-5
    json.dumps(timing, allow_nan=False)


def test_baselines_score_the_same_holdout_candidates():
    data = _data([12, 15, 11, 14])
    splits = ranking_splits(data.lengths, 3)
    pred = bias_baseline_predictions(data, splits["train"], splits["test"])
    _, _, ratings, valid = RankingSequences(data, CPU).candidates(torch.as_tensor(splits["test"]), 3)
    assert torch.equal(pred.ratings.float(), ratings) and torch.equal(pred.valid, valid)
    assert ranking_metrics(pred)["candidates"] == 12
