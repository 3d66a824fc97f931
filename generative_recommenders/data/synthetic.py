"""A small MovieLens-like data set the project makes itself (no download needed).

Items belong to topics and have Zipfian popularity; each user likes a few
topics. A user's next item is often the fixed "successor" of the previous one
(a learnable sequential pattern), otherwise a popular unseen item of one of
the user's topics. Timestamps grow by random gaps. Deterministic for a seed.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np

from generative_recommenders.config import ConfigError, check_positive
from generative_recommenders.data.sequence_store import SequenceData

SYNTHETIC = "synthetic"  # the data set names the generated sets are loaded by (data/datasets.py)
SYNTHETIC_RATINGS = "synthetic-ratings"  # the same sequences with learnable ratings (generative ranking)


def _pick_unseen(rng: np.random.Generator, pool: np.ndarray, cdf: np.ndarray, seen: np.ndarray) -> int:
    """A popular item of `pool` not yet `seen` (a mask over item ids); any unseen one after 20 misses.

    The draw is `rng.choice(pool, p=weights)` written out (the same uniform
    number and search on the weights' normalised cumulative sum, so the same
    data), with the cumulative sum made once per user: long histories make
    millions of draws.
    """
    for _ in range(20):
        item = int(pool[cdf.searchsorted(rng.random(), side="right")])
        if not seen[item]:
            return item
    unseen = pool[~seen[pool]]
    return int(rng.choice(unseen)) if unseen.size else int(rng.choice(pool))


def _check_settings(num_users: int, num_items: int, num_topics: int, min_length: int, max_length: int,
                    median_length: float, follow_prob: float, seed: int) -> None:
    check_positive("synthetic_data", num_users=num_users, num_items=num_items, num_topics=num_topics,
                   min_length=min_length, max_length=max_length)
    if num_topics < 2:  # every user likes two distinct topics
        raise ConfigError(f"synthetic_data.num_topics must be >= 2, got {num_topics}")
    if min_length > max_length:
        raise ConfigError(f"synthetic_data.min_length ({min_length}) must be <= max_length ({max_length})")
    if isinstance(median_length, bool) or not isinstance(median_length, (int, float)) or not median_length > 0:
        raise ConfigError(f"synthetic_data.median_length must be a positive number, got {median_length!r}")
    if not 0.0 <= follow_prob <= 1.0:
        raise ConfigError(f"synthetic_data.follow_prob must be in [0, 1], got {follow_prob}")
    if seed < 0:
        raise ConfigError(f"synthetic_data.seed must be >= 0, got {seed}")


@gin.configurable("synthetic_data")
def generate_synthetic(
    num_users: int = 2000,
    num_items: int = 800,
    num_topics: int = 16,
    min_length: int = 8,
    max_length: int = 60,
    median_length: float = 20.0,
    follow_prob: float = 0.7,
    seed: int = 0,
) -> SequenceData:
    """Lengths are log-normal around `median_length`, clipped to [min_length, max_length]."""
    _check_settings(num_users, num_items, num_topics, min_length, max_length, median_length, follow_prob, seed)
    rng = np.random.default_rng(seed)
    items = np.arange(1, num_items + 1)
    topic = rng.integers(0, num_topics, num_items + 1)
    popularity = 1.0 / rng.permutation(num_items + 1).clip(min=1).astype(np.float64)
    successor = np.zeros(num_items + 1, dtype=np.int64)
    for t in range(num_topics):
        members = rng.permutation(items[topic[1:] == t])
        successor[members] = np.roll(members, -1)
    sequences, stamps = [], []
    for _ in range(num_users):
        liked = rng.choice(num_topics, size=2, replace=False)
        pool = items[np.isin(topic[1:], liked)]
        cdf = np.cumsum(popularity[pool] / popularity[pool].sum())
        cdf /= cdf[-1]
        length = int(np.clip(rng.lognormal(np.log(median_length), 0.6), min_length, max_length))
        seen = np.zeros(num_items + 1, dtype=bool)
        seq = [_pick_unseen(rng, pool, cdf, seen)]
        seen[seq[0]] = True
        while len(seq) < length:
            nxt = int(successor[seq[-1]])
            if rng.random() >= follow_prob or seen[nxt]:
                nxt = _pick_unseen(rng, pool, cdf, seen)
            seq.append(nxt)
            seen[nxt] = True
        sequences.append(np.asarray(seq, dtype=np.int32))
        gaps = rng.lognormal(np.log(3600.0), 2.0, size=length).astype(np.int64)
        stamps.append(978_300_000 + np.cumsum(gaps))
    lengths = np.array([len(s) for s in sequences])
    return SequenceData(
        name="synthetic",
        item_ids=np.concatenate(sequences),
        ratings=np.full(lengths.sum(), 4.0, dtype=np.float32),
        timestamps=np.concatenate(stamps),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        user_ids=np.arange(1, num_users + 1, dtype=np.int64),
        candidate_ids=items.astype(np.int32),
    )


def random_sequences(
    num_users: int, max_item_id: int, num_candidates: int, mean_length: float, max_length: int, seed: int = 0
) -> SequenceData:
    """Fast, structureless sequences with a real data set's shape (for throughput benchmarks).

    Lengths are log-normal with the given mean, clipped to [5, max_length];
    items are Zipf-distributed over the candidates; timestamps increase.
    """
    rng = np.random.default_rng(seed)
    sigma = 0.8
    lengths = np.clip(rng.lognormal(np.log(mean_length) - sigma**2 / 2, sigma, num_users), 5, max_length).astype(np.int64)
    candidates = np.unique(np.linspace(1, max_item_id, num_candidates).astype(np.int32))
    ranks = np.minimum(rng.zipf(1.2, lengths.sum()), candidates.size) - 1
    item_ids = candidates[rng.permutation(candidates.size)[ranks]]
    timestamps = 978_300_000 + np.cumsum(rng.integers(1, 100_000, lengths.sum()))
    return SequenceData(
        name=f"random-{num_users}x{max_item_id}",
        item_ids=item_ids.astype(np.int32),
        ratings=np.full(lengths.sum(), 4.0, dtype=np.float32),
        timestamps=timestamps.astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        user_ids=np.arange(1, num_users + 1, dtype=np.int64),
        candidate_ids=candidates,
    )


@gin.configurable("synthetic_ratings")
def generate_synthetic_ratings(
    num_users: int = 2000,
    num_items: int = 800,
    num_factors: int = 8,
    affinity_scale: float = 1.0,
    drift_scale: float = 0.15,
    noise_scale: float = 0.5,
    seed: int = 0,
) -> SequenceData:
    """`generate_synthetic`'s sequences with ratings 1..5 that a sequential model can learn (ranking).

    rating = round(3.4 + item bias + user bias + affinity_scale * u.v / sqrt(F) + mood + noise),
    clipped to [1, 5]; u, v are random user and item factors, so a user's past
    ratings of similar items tell how they rate an item (beyond the item's and
    the user's means), and the mood is a per-user random walk along the
    sequence, so recent ratings tell more than old ones.
    """
    data = generate_synthetic(num_users=num_users, num_items=num_items, seed=seed)
    rng = np.random.default_rng([seed, 1])  # its own stream: the sequences stay those of `seed`
    user_of_row = np.repeat(np.arange(num_users), data.lengths)
    user_factors = rng.normal(size=(num_users, num_factors))
    item_factors = rng.normal(size=(num_items + 1, num_factors))
    affinity = (user_factors[user_of_row] * item_factors[data.item_ids]).sum(1) / np.sqrt(num_factors)
    walk = np.cumsum(rng.normal(0.0, drift_scale, data.num_interactions))
    mood = walk - walk[data.offsets[:-1]][user_of_row]  # each user's walk starts at 0
    score = (3.4 + rng.normal(0.0, 0.5, num_items + 1)[data.item_ids] + rng.normal(0.0, 0.4, num_users)[user_of_row]
             + affinity_scale * affinity + mood + rng.normal(0.0, noise_scale, data.num_interactions))
    ratings = np.clip(np.rint(score), 1, 5).astype(np.float32)
    return dataclasses.replace(data, name="synthetic-ratings", ratings=ratings)
