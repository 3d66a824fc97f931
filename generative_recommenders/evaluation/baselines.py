"""Ranking baselines (issue 12): item-mean and user+item bias models of the ratings and the liked rate.

value(user, item) = mean + user bias + item bias, fit by regularised
alternating least squares on the training interactions (everything before
each user's validation candidates): once on the rating, once on the liked
indicator, whose prediction clipped to [PROB_CLIP, 1 - PROB_CLIP] is the liked
probability. Without user biases it is the item-mean baseline (item means
shrunk towards the global mean by `reg` pseudo-counts). Its predictions feed
the same metrics as the model's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from generative_recommenders.data.ranking import LIKED_RATING, NUM_ACTIONS
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.evaluation.metrics import RankingPredictions

PROB_CLIP = 1e-3


@dataclasses.dataclass
class BiasModel:
    mean: float
    user_bias: np.ndarray
    item_bias: np.ndarray

    @staticmethod
    def fit(users: np.ndarray, items: np.ndarray, values: np.ndarray, num_users: int, num_items: int,
            use_users: bool = True, reg: float = 5.0, rounds: int = 10) -> "BiasModel":
        mean = float(values.mean())
        user_bias, item_bias = np.zeros(num_users), np.zeros(num_items)
        item_count = np.bincount(items, minlength=num_items) + reg
        user_count = np.bincount(users, minlength=num_users) + reg
        for _ in range(rounds if use_users else 1):
            item_bias = np.bincount(items, values - mean - user_bias[users], minlength=num_items) / item_count
            if use_users:
                user_bias = np.bincount(users, values - mean - item_bias[items], minlength=num_users) / user_count
        return BiasModel(mean, user_bias, item_bias)

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.mean + self.user_bias[users] + self.item_bias[items]


def _rows(data: SequenceData, users: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat interaction rows offsets[u] + start + [0, count) of each (u, start, count), concatenated."""
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(data.offsets[users] + starts, counts) + within


def bias_baseline_predictions(data: SequenceData, train_samples: np.ndarray, eval_samples: np.ndarray,
                              use_users: bool = True) -> RankingPredictions:
    """Predictions for the candidates of `eval_samples`, fit on the interactions of `train_samples`."""
    user_of_row = np.repeat(np.arange(data.num_users), data.lengths)
    train = _rows(data, train_samples[:, 0], np.zeros_like(train_samples[:, 1]), train_samples[:, 1])
    fit_args = (user_of_row[train], data.item_ids[train])
    sizes = (data.num_users, data.max_item_id + 1)
    rating = BiasModel.fit(*fit_args, data.ratings[train].astype(np.float64), *sizes, use_users=use_users)
    liked = BiasModel.fit(*fit_args, (data.ratings[train] >= LIKED_RATING).astype(np.float64), *sizes,
                          use_users=use_users)
    num_slots = int(eval_samples[:, 2].max())
    valid = np.arange(num_slots)[None, :] < eval_samples[:, 2:3]
    rows = np.zeros(valid.shape, dtype=np.int64)
    rows[valid] = _rows(data, eval_samples[:, 0], eval_samples[:, 1], eval_samples[:, 2])
    users, items = user_of_row[rows], data.item_ids[rows]
    expected = np.clip(rating.predict(users, items), 1, NUM_ACTIONS)
    return RankingPredictions(
        liked_prob=torch.as_tensor(np.clip(liked.predict(users, items), PROB_CLIP, 1 - PROB_CLIP)),
        expected_rating=torch.as_tensor(expected),
        rating_class=torch.as_tensor(np.rint(expected).astype(np.int64)),
        ratings=torch.as_tensor(data.ratings[rows]),
        valid=torch.as_tensor(valid),
    )
