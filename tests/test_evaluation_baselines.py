"""evaluation/baselines.py: the user+item bias model and its predictions from training interactions only."""

from __future__ import annotations

import numpy as np
import pytest

from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.evaluation.baselines import PROB_CLIP, BiasModel, bias_baseline_predictions


def test_bias_model_recovers_additive_ratings():
    rng = np.random.default_rng(0)
    users, items = np.repeat(np.arange(30), 10), rng.integers(0, 20, 300)
    truth = 3.0 + rng.normal(size=30)[users] + rng.normal(size=20)[items]
    model = BiasModel.fit(users, items, truth, 30, 20, reg=0.0, rounds=200)
    np.testing.assert_allclose(model.predict(users, items), truth, atol=1e-6)
    item_only = BiasModel.fit(users, items, truth, 30, 20, use_users=False, reg=0.0)
    for item in range(20):  # item means without shrinkage
        if (items == item).any():
            assert item_only.predict(np.array([0]), np.array([item]))[0] == pytest.approx(truth[items == item].mean())


def test_bias_baseline_uses_training_interactions_only():
    # Item 7 is rated 5 in training by user 0, and is user 1's candidate; item 8 only appears held out.
    data = SequenceData(
        name="b", item_ids=np.array([7, 8, 9, 7, 8], dtype=np.int32), ratings=np.array([5, 1, 2, 4, 5], np.float32),
        timestamps=np.arange(5), offsets=np.array([0, 3, 5]), user_ids=np.array([1, 2]),
        candidate_ids=np.array([7, 8, 9], dtype=np.int32))
    train = np.array([[0, 1, 0], [1, 1, 0]])  # user 0: item 7 (5); user 1: item 7 (4)
    evaluate = np.array([[0, 1, 2], [1, 1, 1]])
    pred = bias_baseline_predictions(data, train, evaluate, use_users=False)
    assert pred.valid.tolist() == [[True, True], [True, False]]
    assert pred.ratings[pred.valid].tolist() == [1.0, 2.0, 5.0]
    # No training rating of items 8 and 9: the global mean 4.5; liked rate 1 clipped.
    np.testing.assert_allclose(pred.expected_rating[pred.valid].numpy(), [4.5, 4.5, 4.5])
    np.testing.assert_allclose(pred.liked_prob[pred.valid].numpy(), [1 - PROB_CLIP] * 3)
