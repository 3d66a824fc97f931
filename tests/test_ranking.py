"""Generative ranking data, model and objective (data/ranking.py, modeling/ranking_model.py, objectives/ranking.py).

Hand-made sequences check the interleaving and where labels sit; properties
check that no label reaches its own position or an earlier one, that action
tokens never carry a next-item label, and that malformed ratings are refused.
"""

from __future__ import annotations

import math

import gin
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from generative_recommenders.data.datasets import load_dataset
from generative_recommenders.data.ranking import (
    RankingSequences, padded_length, rating_actions, ranking_splits, sample_lengths, users_in_id_range,
)
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.data.synthetic import generate_synthetic, generate_synthetic_ratings
from generative_recommenders.data.candidates import CandidateIndex
from generative_recommenders.objectives.losses import RetrievalLoss
from generative_recommenders.modeling.ranking_model import RankingModel
from generative_recommenders.objectives.ranking import RankingObjective, ranking_losses
from generative_recommenders.evaluation.baselines import bias_baseline_predictions
from generative_recommenders.evaluation.ranking import RankingEvaluator
from generative_recommenders.evaluation.metrics import ranking_metrics

CPU = torch.device("cpu")
ENCODER_BINDINGS = [
    "hstu_encoder.num_blocks = 2", "hstu_encoder.num_heads = 2", "hstu_encoder.dqk = 8", "hstu_encoder.dv = 8",
    "hstu_encoder.attention_kernel = 'torch'",
    "sasrec_encoder.num_blocks = 2", "sasrec_encoder.num_heads = 2", "sasrec_encoder.ffn_hidden_dim = 16",
]


def _data(sequences, ratings=None, name="hand") -> SequenceData:
    """User u's k-th interaction: item sequences[u][k], time 1000 * (u + 1) + 10 * k, rating 1 + (k mod 5)."""
    lengths = [len(s) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if ratings is None:
        ratings = np.concatenate([1 + np.arange(n) % 5 for n in lengths]).astype(np.float32)
    stamps = np.concatenate([1000 * (u + 1) + 10 * np.arange(n) for u, n in enumerate(lengths)])
    return SequenceData(
        name=name, item_ids=np.concatenate(sequences).astype(np.int32), ratings=np.asarray(ratings, np.float32),
        timestamps=stamps.astype(np.int64), offsets=offsets, user_ids=np.arange(1, len(lengths) + 1),
        candidate_ids=np.arange(1, 100, dtype=np.int32))


def _model(encoder: str, max_seq_len: int, max_item_id: int = 99, dim: int = 16, **kwargs) -> RankingModel:
    gin.clear_config()
    gin.parse_config(ENCODER_BINDINGS)
    try:
        return RankingModel(encoder, max_item_id, max_seq_len, dim, dropout_rate=0.0, **kwargs)
    finally:
        gin.clear_config()


# ----------------------------------------------------------------------------- ratings as actions


def test_rating_actions_round_half_stars_down():
    got = rating_actions(np.array([1.0, 2.5, 3.99, 4.0, 4.5, 5.0], dtype=np.float32))
    assert got.tolist() == [1, 2, 3, 4, 4, 5]  # liked (>= 4) <=> action >= 4


@given(bad=st.sampled_from([0.0, 0.99, 5.01, 6.0, -3.0, math.nan, math.inf, -math.inf]),
       where=st.integers(0, 5))
def test_malformed_ratings_give_a_clear_error(bad, where):
    ratings = np.array([1, 2, 3, 4, 5, 3], dtype=np.float32)
    ratings[where] = bad
    with pytest.raises(ValueError, match=rf"hand: 1 ratings .* row {where}"):
        rating_actions(ratings, "hand")
    with pytest.raises(ValueError, match="ratings"):
        RankingSequences(_data([[1, 2, 3], [4, 5, 6]], ratings), CPU)


# ----------------------------------------------------------------------------- splits


def test_splits_hold_out_the_last_k_chronologically():
    lengths = np.array([5, 2, 3, 7])
    one = ranking_splits(lengths, 1)
    # Users need 2k + 1 interactions: user 1 (2) is left out for k = 1.
    assert one["train"].tolist() == [[0, 3, 0], [2, 1, 0], [3, 5, 0]]
    assert one["valid"].tolist() == [[0, 3, 1], [2, 1, 1], [3, 5, 1]]
    assert one["test"].tolist() == [[0, 4, 1], [2, 2, 1], [3, 6, 1]]
    two = ranking_splits(lengths, 2)
    assert two["train"].tolist() == [[0, 1, 0], [3, 3, 0]]
    assert two["valid"].tolist() == [[0, 1, 2], [3, 3, 2]]  # history ends before the validation candidates
    assert two["test"].tolist() == [[0, 3, 2], [3, 5, 2]]  # history includes them
    with pytest.raises(ValueError):
        ranking_splits(lengths, 0)


def test_users_selected_by_id_range():
    data = _data([[1, 2, 3]] * 4)
    data.user_ids = np.array([2998, 2999, 3000, 1])
    mask = users_in_id_range(data, 1, 2999)
    assert mask.tolist() == [True, True, False, True]
    assert ranking_splits(data.lengths, 1, mask)["test"][:, 0].tolist() == [0, 1, 3]


# ----------------------------------------------------------------------------- interleaving by hand


def test_training_sample_interleaves_items_and_actions():
    data = _data([[11, 12, 13, 14, 15]])  # ratings 1..5, times 1000, 1010, ..., 1040
    batch = RankingSequences(data, CPU).batch(np.array([[0, 3, 0]]), max_history=10, padded_len=8)
    assert batch.item_ids.tolist() == [[11, 0, 12, 0, 13, 0, 0, 0]]
    assert batch.action_ids.tolist() == [[0, 1, 0, 2, 0, 3, 0, 0]]
    assert batch.timestamps.tolist() == [[1000, 1000, 1010, 1010, 1020, 1020, 1020, 1020]]
    assert batch.lengths.tolist() == [6] and batch.total == 6 and batch.num_targets is None
    # Each item position is a candidate for its own action (the next token); the last has no next item.
    assert batch.ratings.tolist() == [[1, 0, 2, 0, 3, 0, 0, 0]]
    assert batch.next_item.tolist() == [[12, 0, 13, 0, 0, 0, 0, 0]]


def test_evaluation_samples_append_candidates_without_their_actions():
    data = _data([[11, 12, 13, 14, 15, 16]])
    sequences = RankingSequences(data, CPU)
    valid = sequences.batch(np.array([[0, 2, 2]]), max_history=10, padded_len=8)
    assert valid.item_ids.tolist() == [[11, 0, 12, 0, 13, 14, 0, 0]]
    assert valid.action_ids.tolist() == [[0, 1, 0, 2, 0, 0, 0, 0]]
    assert valid.timestamps.tolist() == [[1000, 1000, 1010, 1010, 1020, 1030, 1030, 1030]]
    assert valid.ratings.tolist() == [[0, 0, 0, 0, 3, 4, 0, 0]]  # labels at the candidates only
    assert valid.num_targets.tolist() == [2] and valid.lengths.tolist() == [6]
    # Test: the most recent max_history interactions, validation ones included.
    test = sequences.batch(np.array([[0, 4, 2]]), max_history=2, padded_len=8)
    assert test.item_ids.tolist() == [[13, 0, 14, 0, 15, 16, 0, 0]]
    assert test.action_ids.tolist() == [[0, 3, 0, 4, 0, 0, 0, 0]]
    assert test.ratings.tolist() == [[0, 0, 0, 0, 5, 1, 0, 0]]
    assert sample_lengths(np.array([[0, 4, 2], [0, 1, 0]]), 2).tolist() == [6, 2]


def test_candidate_labels_never_enter_the_inputs():
    data = _data([[11, 12, 13, 14, 15, 16], [21, 22, 23]])
    samples = np.array([[0, 4, 2], [1, 2, 1]])
    base = RankingSequences(data, CPU).batch(samples, 10, 12)
    data.ratings[[4, 5, 8]] = [1.0, 2.0, 3.0]  # the candidates' ratings
    changed = RankingSequences(data, CPU).batch(samples, 10, 12)
    for name in ("item_ids", "action_ids", "timestamps", "lengths", "num_targets"):
        assert torch.equal(getattr(base, name), getattr(changed, name)), name
    assert not torch.equal(base.ratings, changed.ratings)


# ----------------------------------------------------------------------------- no label leaks through the model


@settings(max_examples=12, deadline=None)
@given(encoder=st.sampled_from(["HSTU", "SASRec"]), length=st.integers(2, 8), position=st.integers(0, 7),
       seed=st.integers(0, 2**16))
def test_no_label_reaches_its_own_position_or_earlier(encoder, length, position, seed):
    """Changing a_i and every later token (items, actions, times after a_i) leaves outputs up to x_i as they were."""
    position = min(position, length - 1)
    rng = np.random.default_rng(seed)
    data = _data([rng.integers(1, 99, length)], rng.integers(1, 6, length))
    torch.manual_seed(seed)
    model = _model(encoder, 2 * length).eval()
    batch = RankingSequences(data, CPU).batch(np.array([[0, length, 0]]), length, 2 * length)
    base, _ = model(batch)
    item_pos = 2 * position
    batch.action_ids[0, item_pos + 1::2] = torch.as_tensor(rng.integers(1, 6, length - position))
    batch.item_ids[0, item_pos + 2::2] = torch.as_tensor(rng.integers(1, 99, length - position - 1))
    later = rng.integers(1, 10**6, 2 * length - item_pos - 2)
    batch.timestamps[0, item_pos + 2:] += torch.as_tensor(np.sort(later))
    out, _ = model(batch)
    torch.testing.assert_close(out[: item_pos + 1], base[: item_pos + 1])
    if position < length - 1:
        assert not torch.allclose(out[item_pos + 1:], base[item_pos + 1:])


def _gradients_at_positions(objective: RankingObjective, rating_head: str = "classification") -> dict:
    """|d term / d encoder output| per position, for each term, on one training sample."""
    data = _data([[11, 12, 13, 14, 15]])
    batch = RankingSequences(data, CPU).batch(np.array([[0, 5, 0]]), 10, 10)
    model = _model("HSTU", 10, rating_head=rating_head)
    out = torch.randn(batch.total, 16, requires_grad=True)
    model.forward = lambda b: (out, torch.tensor([0, b.total]))  # the objective sees this output
    retrieval = RetrievalLoss("SampledSoftmaxLoss", CandidateIndex(torch.arange(1, 100), 99), num_negatives=4)
    terms = ranking_losses(model, batch, objective, retrieval, torch.Generator().manual_seed(0))
    grads = {}
    for name, value in terms.items():
        (grad,) = torch.autograd.grad(value, out, retain_graph=True)
        grads[name] = grad.abs().sum(1)
    return grads


def test_losses_supervise_item_positions_only():
    grads = _gradients_at_positions(RankingObjective(liked_weight=1.0, rating_weight=0.5, next_item_weight=2.0))
    items, actions = torch.arange(0, 10, 2), torch.arange(1, 10, 2)
    for name in ("liked", "rating"):
        assert (grads[name][items] > 0).all() and (grads[name][actions] == 0).all(), name
    # Next item: item positions with a next history item (not the last one); never action tokens.
    assert (grads["next_item"][items[:-1]] > 0).all()
    assert grads["next_item"][items[-1]] == 0 and (grads["next_item"][actions] == 0).all()
    assert set(grads) == {"liked", "rating", "next_item", "loss"}


def test_loss_switches_and_weights():
    liked_only = _gradients_at_positions(RankingObjective(rating_weight=0.0))
    assert set(liked_only) == {"liked", "loss"}
    torch.testing.assert_close(liked_only["loss"], liked_only["liked"])
    regression = _gradients_at_positions(RankingObjective(liked_weight=0.0), rating_head="regression")
    assert set(regression) == {"rating", "loss"}
    with pytest.raises(ValueError):
        RankingObjective(liked_weight=0.0, rating_weight=0.0)
    with pytest.raises(ValueError):
        RankingObjective(liked_weight=-1.0)


def test_weighted_sum_of_terms():
    data = _data([[11, 12, 13, 14, 15], [21, 22, 23, 24]])
    batch = RankingSequences(data, CPU).batch(np.array([[0, 5, 0], [1, 4, 0]]), 10, 10)
    torch.manual_seed(0)
    model = _model("SASRec", 10)
    objective = RankingObjective(liked_weight=0.3, rating_weight=2.0)
    terms = ranking_losses(model, batch, objective)
    torch.testing.assert_close(terms["loss"], 0.3 * terms["liked"] + 2.0 * terms["rating"])
    with pytest.raises(ValueError, match="RetrievalLoss"):
        ranking_losses(model, batch, RankingObjective(next_item_weight=1.0))


# ----------------------------------------------------------------------------- synthetic ratings, learning


def test_synthetic_ratings_keep_the_sequences():
    plain = generate_synthetic(num_users=200, num_items=100, seed=3)
    rated = generate_synthetic_ratings(num_users=200, num_items=100, seed=3)
    assert np.array_equal(rated.item_ids, plain.item_ids) and np.array_equal(rated.timestamps, plain.timestamps)
    assert set(np.unique(rated.ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 0.2 < (rated.ratings >= 4).mean() < 0.8
    again = generate_synthetic_ratings(num_users=200, num_items=100, seed=3)
    assert np.array_equal(again.ratings, rated.ratings)
    assert not np.array_equal(generate_synthetic_ratings(num_users=200, num_items=100, seed=4).ratings[:50],
                              rated.ratings[:50])


def test_synthetic_ratings_by_name():
    gin.parse_config(["synthetic_ratings.num_users = 30", "synthetic_ratings.num_items = 40"])
    try:
        data = load_dataset("synthetic-ratings", "unused")
    finally:
        gin.clear_config()
    assert data.name == "synthetic-ratings" and data.num_users == 30
    rating_actions(data.ratings)  # valid actions


def _train(model: RankingModel, sequences: RankingSequences, train: np.ndarray, max_history: int,
           epochs: int, batch_size: int = 64) -> None:
    """The training step the trainer will run: gather on the device, ranking losses, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    objective = RankingObjective()
    model.train()
    on_device = torch.as_tensor(train)
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(train.shape[0])
        for start in range(0, train.shape[0], batch_size):
            rows = order[start:start + batch_size]
            batch = sequences.gather(on_device[rows], max_history, model.max_seq_len,
                                     int(sample_lengths(train[rows], max_history).sum()), False)
            optimizer.zero_grad(set_to_none=True)
            ranking_losses(model, batch, objective)["loss"].backward()
            optimizer.step()


@pytest.mark.slow
def test_hstu_ranking_beats_the_item_mean_baseline():
    """On synthetic ratings a small HSTU ranker beats the item-mean baseline (AUC, NE, RMSE).

    Measured: AUC 0.756 against 0.673 (item mean) and 0.747 (user + item bias, a
    margin too small to assert on 1,500 test candidates).
    """
    data = generate_synthetic_ratings(num_users=1500, num_items=200, seed=0)
    splits = ranking_splits(data.lengths, 1)
    max_history = 30
    sequences = RankingSequences(data, CPU)
    torch.manual_seed(0)
    model = _model("HSTU", padded_length(max_history, 1), data.max_item_id, dim=32)
    _train(model, sequences, splits["train"], max_history, epochs=6)
    got = RankingEvaluator(model, sequences, max_history, 256)(splits["test"])
    item_mean = ranking_metrics(bias_baseline_predictions(data, splits["train"], splits["test"], use_users=False))
    assert got["auc"] > item_mean["auc"] + 0.03, (got, item_mean)
    assert got["ne"] < item_mean["ne"] and got["rmse"] < item_mean["rmse"]
