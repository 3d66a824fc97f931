"""Stochastic Length (README "Stochastic Length"): the kept-length rule, the kept positions, determinism,
evaluation on full histories, and the synthetic generator's length range."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from generative_recommenders.config import ConfigError, TrainConfig
from generative_recommenders.data.samples import (DeviceSequences, history_total, kept_offsets, make_splits,
                                                  stochastic_length_cap, stochastic_lengths, with_stochastic_lengths)
from generative_recommenders.data.synthetic import _pick_unseen, generate_synthetic
from generative_recommenders.tasks.retrieval import RetrievalTask
from test_samples import _data
from tiny_config import TINY, train_tiny

ALPHAS = st.floats(min_value=1.0, max_value=2.0, exclude_min=True)


def test_cap_is_n_to_the_half_alpha_rounded_down():
    assert [stochastic_length_cap(200, a) for a in (1.6, 1.7, 1.8, 1.9, 2.0)] == [69, 90, 117, 153, 200]
    assert [stochastic_length_cap(1024, a) for a in (1.6, 1.7, 1.8, 1.9, 2.0)] == [256, 362, 512, 724, 1024]


@settings(max_examples=200, deadline=None)
@given(max_len=st.integers(1, 4096), alpha=ALPHAS, seed=st.integers(0, 2**32 - 1),
       fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50))
def test_kept_lengths_follow_the_papers_rule(max_len, alpha, seed, fractions):
    lengths = np.array([round(f * max_len) for f in fractions], dtype=np.int64)
    kept = stochastic_lengths(lengths, max_len, alpha, np.random.default_rng(seed))
    draws = np.random.default_rng(seed).random(len(lengths))  # the rule draws one number per history
    cap = math.floor(max_len ** (alpha / 2) + 1e-9)
    for n, k, u in zip(lengths, kept, draws):
        # Whole when n <= N^(alpha/2); otherwise shortened to N^(alpha/2) with probability 1 - N^alpha / n^2.
        expected = cap if n > cap and u >= max_len ** alpha / n ** 2 else n
        assert k == expected
        assert k <= n


@pytest.mark.parametrize("max_len,alpha,n", [(200, 1.6, 200), (200, 1.8, 150), (1024, 1.7, 400), (1024, 1.9, 1000)])
def test_shortening_frequency_matches_its_probability(max_len, alpha, n):
    draws = 200_000
    kept = stochastic_lengths(np.full(draws, n), max_len, alpha, np.random.default_rng(7))
    cap = stochastic_length_cap(max_len, alpha)
    assert set(np.unique(kept)) <= {cap, n}
    shortened = int((kept == cap).sum())
    p = 1 - max_len ** alpha / n ** 2
    # Two-sided exact binomial test at 1e-6: a wrong probability (or length) fails, the right one practically never.
    assert stats.binomtest(shortened, draws, p).pvalue > 1e-6, (shortened / draws, p)


def test_samples_get_their_kept_length_and_totals_count_it():
    samples = np.array([[0, 5], [1, 300], [2, 2]], dtype=np.int64)
    out = with_stochastic_lengths(samples, 200, 1.6, np.random.default_rng(0))
    assert out.shape == (3, 3) and (out[:, :2] == samples).all()
    assert out[0, 2] == 4 and out[2, 2] == 1 and out[1, 2] in (69, 200)  # history lengths 4, min(299, 200), 1
    assert history_total(out, 200) == int(out[:, 2].sum())
    assert history_total(samples, 200) == 4 + 200 + 1


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 40), st.floats(0.0, 1.0)), min_size=1, max_size=8),
       width_extra=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_kept_offsets_are_an_increasing_subset_of_the_history(rows, width_extra, seed):
    lengths = torch.tensor([n for n, _ in rows])
    kept = torch.tensor([round(f * n) for n, f in rows])
    width = int(lengths.max()) + width_extra
    torch.manual_seed(seed)
    out = kept_offsets(lengths, kept, width)
    for row, n, k in zip(out.tolist(), lengths.tolist(), kept.tolist()):
        chosen = row[:k]
        assert chosen == sorted(set(chosen)) and all(0 <= c < n for c in chosen)
        assert row[k:] == [width] * (width - k)


def test_every_subset_of_kept_positions_is_equally_likely():
    n, k, draws = 8, 3, 56 * 400
    torch.manual_seed(0)
    out = kept_offsets(torch.full((draws,), n), torch.full((draws,), k), n + 2)[:, :k]
    counts = {subset: 0 for subset in itertools.combinations(range(n), k)}
    for row in out.tolist():
        counts[tuple(row)] += 1
    assert stats.chisquare(list(counts.values())).pvalue > 1e-6


def test_gathered_subsequence_keeps_items_with_their_timestamps_and_the_target():
    lengths = np.array([30, 12, 4])
    sequences = DeviceSequences(_data(lengths), torch.device("cpu"))
    samples = np.array([[0, 30, 7], [1, 12, 11], [2, 4, 3]], dtype=np.int64)  # (user, end, kept)
    torch.manual_seed(3)
    batch = sequences.gather(torch.as_tensor(samples), 25, 27, history_total(samples, 25))
    assert batch.lengths.tolist() == [7, 11, 3]
    for b, (user, end, kept) in enumerate(samples):
        ids, ts = batch.ids[b].tolist(), batch.timestamps[b].tolist()
        first = end - 1 - min(end - 1, 25)  # the history window: the last min(end - 1, 25) items before the target
        positions = [i - 100 * (user + 1) - 1 for i in ids[:kept]]
        assert positions == sorted(set(positions)) and all(first <= p < end - 1 for p in positions)
        assert ts[:kept] == [1000 * (user + 1) + 10 * p for p in positions]  # each kept item's own timestamp
        target = 100 * (user + 1) + end  # item end - 1 of the user
        assert ids[kept] == target == batch.targets[b].item()
        assert ts[kept] == 1000 * (user + 1) + 10 * (end - 1)
        assert ids[kept + 1:] == [0] * (27 - kept - 1) and ts[kept + 1:] == [0] * (27 - kept - 1)
    # Labels are the next kept item (next-item objective: ids shifted by one), the last kept one's the target.


def test_kept_whole_histories_gather_as_without_stochastic_length():
    lengths = np.array([30, 12, 4])
    sequences = DeviceSequences(_data(lengths), torch.device("cpu"))
    plain = np.array([[0, 30], [1, 12], [2, 4]], dtype=np.int64)
    whole = np.concatenate([plain, np.minimum(plain[:, 1:] - 1, 25)], axis=1)
    a = sequences.batch(plain, 25, 27)
    b = sequences.gather(torch.as_tensor(whole), 25, 27, history_total(whole, 25))
    for name in ("ids", "timestamps", "lengths", "targets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.total == b.total


def test_positions_are_the_same_under_the_same_seed():
    sequences = DeviceSequences(_data(np.array([50, 50])), torch.device("cpu"))
    samples = torch.tensor([[0, 50, 10], [1, 50, 10]])

    def draw(seed):
        torch.manual_seed(seed)
        return sequences.gather(samples, 40, 42, 20).ids

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.fixture
def tiny_encoder():
    """The tiny HSTU's gin bindings (an encoder's settings come from gin), cleared afterwards."""
    import gin

    gin.parse_config([b for b in TINY if b.startswith("hstu_encoder.")])
    yield
    gin.clear_config()


def _task(alpha, max_len=20):
    config = TrainConfig(max_sequence_length=max_len, item_embedding_dim=8, num_negatives=8,
                         stochastic_length_alpha=alpha)
    return RetrievalTask(config, _data(np.array([40, 30, 25, 8, 3])), torch.device("cpu"))


def test_train_samples_depend_on_seed_epoch_and_rank_only(tiny_encoder):
    task = _task(1.6)
    train = task.splits["train"]
    first = task.train_samples(train, epoch=0, rank=0)
    assert first.shape == (train.shape[0], 3)
    assert np.array_equal(first, task.train_samples(train, epoch=0, rank=0))
    draws = [task.train_samples(train, epoch=e, rank=r)[:, 2] for e in range(8) for r in range(2)]
    assert len({d.tobytes() for d in draws}) > 1  # the draws change with epoch and rank
    assert task.train_samples(train, 0, 0) is not train
    # alpha = 2 keeps N^(alpha/2) = N positions, as many as a history can have: nothing to draw.
    assert _task(2.0).train_samples(train, 0, 0) is train
    assert _task(None).train_samples(train, 0, 0) is train


def test_evaluation_sees_full_histories(tiny_encoder):
    with_sl, without = _task(1.6), _task(None)
    without.model.load_state_dict(with_sl.model.state_dict())
    for name in with_sl.eval_splits:
        assert with_sl.splits[name].shape[1] == 2
        torch.manual_seed(0)
        a = with_sl.evaluate(with_sl.splits[name])
        torch.manual_seed(1)  # the evaluation draws nothing: another seed gives the same metrics
        assert a == without.evaluate(without.splits[name])


def test_training_records_tokens_and_resumes_to_the_same_draws(tmp_path, on_cpu):
    sl = ["train_fn.stochastic_length_alpha = 1.6"]
    full = train_tiny(tmp_path, sl, run_name="full")
    train_tiny(tmp_path, sl + ["train_fn.num_epochs = 2"], run_name="split")
    resumed = train_tiny(tmp_path, sl, run_name="split")
    keys = ("train_loss", "train_tokens", "eval")
    assert [[e[k] for k in keys] for e in resumed["per_epoch"]] == [[e[k] for k in keys] for e in full["per_epoch"]]
    off = train_tiny(tmp_path, ["train_fn.num_epochs = 1"], run_name="off")["per_epoch"][0]
    data = generate_synthetic(num_users=600, num_items=300)
    assert off["train_tokens"] == history_total(make_splits(data, "paper")["train"], 20)
    assert off["train_steps"] == full["per_epoch"][0]["train_steps"] == math.ceil(len(data.lengths) / 64)
    assert all(e["train_tokens"] < off["train_tokens"] for e in full["per_epoch"])
    assert len({e["train_tokens"] for e in full["per_epoch"]}) > 1  # redrawn every epoch


@pytest.mark.parametrize("value,message", [
    (1.0, "must be in \\(1, 2\\]"), (2.5, "must be in \\(1, 2\\]"), (float("nan"), "must be in \\(1, 2\\]"),
    ("1.6", "must be a number or None"), (True, "must be a number or None"),
])
def test_bad_alpha_is_refused_in_one_line(value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(stochastic_length_alpha=value).validate()


def test_alpha_is_refused_for_ranking():
    with pytest.raises(ConfigError, match="applies to task retrieval"):
        TrainConfig(task="ranking", stochastic_length_alpha=1.6).validate()


# --- the synthetic generator's length range -----------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(size=st.integers(1, 60), seed=st.integers(0, 10_000))
def test_written_out_draw_is_numpys_weighted_choice(size, seed):
    weights = np.random.default_rng(seed + 1).random(size) + 1e-3
    weights /= weights.sum()
    pool = np.arange(10, 10 + size)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    seen = np.zeros(10 + size, dtype=bool)
    ours, numpys = np.random.default_rng(seed), np.random.default_rng(seed)
    for _ in range(20):
        assert _pick_unseen(ours, pool, cdf, seen) == int(numpys.choice(pool, p=weights))


def test_long_histories_in_the_length_range():
    data = generate_synthetic(num_users=60, num_items=3000, min_length=300, max_length=1500, median_length=900)
    assert data.lengths.min() >= 300 and data.lengths.max() <= 1500
    assert 600 < np.median(data.lengths) < 1300
    with pytest.raises(ConfigError, match="median_length must be a positive number"):
        generate_synthetic(median_length=0)
