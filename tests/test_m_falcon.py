"""M-FALCON: the target mask and bias (ops), the history key/value cache, and candidate scoring.

The ground truth everywhere is one forward pass per candidate: the history
followed by that candidate alone. Attention level: the PyTorch formula
(tested against a naive loop in test_hstu_attention.py) on [prefix, target].
Model level: a data set in which the user's sequence is the history plus that
one candidate, gathered as an ordinary one-candidate sample.

Triton runs under TRITON_INTERPRET=1 without CUDA (tiny shapes); larger shapes
are marked gpu.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import gin  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ops.hstu_attention as hstu_module  # noqa: E402
from generative_recommenders.data.ranking import RankingSequences, padded_length, ranking_splits  # noqa: E402
from generative_recommenders.data.sequence_store import SequenceData  # noqa: E402
from generative_recommenders.inference.m_falcon import MFalconScorer  # noqa: E402
from generative_recommenders.modeling.ranking_model import RankingModel  # noqa: E402
from generative_recommenders.evaluation.ranking import RankingEvaluator  # noqa: E402
from ops.hstu_attention import hstu_attention_reference, hstu_target_attention, target_bias  # noqa: E402
from ops.jagged import complete_cumsum, dense_to_jagged  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NUM_BUCKETS = 128


# ----------------------------------------------------------------------------- attention level


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + list(np.cumsum(lengths, dtype=np.int64)), dtype=torch.long)


def _attention_inputs(prefixes, targets, extra, heads, dqk, dv, seed, dtype=torch.float32, device="cpu",
                      ts_scale=10**6):
    """Random q, k, v, sorted timestamps and bias weights for sequences [prefix_b, targets_b]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [p + t for p, t in zip(prefixes, targets)]
    n = max(max(lengths) + extra, 1)
    total = sum(lengths)
    scale = dqk ** -0.25
    q, k = (torch.randn(total, heads, dqk, generator=gen) * scale for _ in range(2))
    v = torch.randn(total, heads, dv, generator=gen)
    ts = torch.randint(0, ts_scale, (len(lengths), n), generator=gen).sort(dim=1).values
    ts_w = torch.randn(NUM_BUCKETS + 1, generator=gen) * 0.5
    pos_w = torch.randn(2 * n - 1, generator=gen) * 0.5
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to), _offsets(lengths).to(**to), n,
            ts.to(**to), ts_w.to(**to), pos_w.to(**to), torch.tensor(targets, **to))


def _single_target_pass(q, k, v, offsets, n, ts, ts_w, pos_w, b, prefix, t, normalization="silu", with_bias=True):
    """Output row of target t of sequence b from a pass over [prefix, that target] only (plain causal).

    The target's "next" timestamp (position prefix + 1) is its own: the layout targets read.
    """
    start = int(offsets[b])
    rows = list(range(start, start + prefix)) + [start + prefix + t]
    target_ts = ts[b, prefix + t]
    single_ts = ts[b:b + 1].clone()
    single_ts[0, prefix:] = target_ts
    bias = (single_ts, ts_w, pos_w) if with_bias else (None, None, None)
    out = hstu_attention_reference(q[rows], k[rows], v[rows], _offsets([prefix + 1]).to(q.device), n, *bias,
                                   normalization=normalization)
    return out[-1]


def _prefix_pass(q, k, v, offsets, n, ts, ts_w, pos_w, b, prefix, normalization="silu", with_bias=True):
    """Rows of the prefix alone, its last timestamp repeated past its end."""
    start = int(offsets[b])
    single_ts = ts[b:b + 1].clone()
    single_ts[0, prefix:] = ts[b, prefix - 1]
    bias = (single_ts, ts_w, pos_w) if with_bias else (None, None, None)
    return hstu_attention_reference(q[start:start + prefix], k[start:start + prefix], v[start:start + prefix],
                                    _offsets([prefix]).to(q.device), n, *bias, normalization=normalization)


target_cases = st.fixed_dictionaries({
    "prefixes": st.lists(st.integers(0, 7), min_size=1, max_size=4),
    "targets": st.lists(st.integers(0, 5), min_size=4, max_size=4),
    "extra": st.integers(0, 2),
    "heads": st.integers(1, 2),
    "dqk": st.integers(1, 4),
    "dv": st.integers(1, 3),
    "seed": st.integers(0, 2**16),
    "normalization": st.sampled_from(["silu", "softmax"]),
    "with_bias": st.booleans(),
})


def _case(case):
    targets = case["targets"][: len(case["prefixes"])]
    return case["prefixes"], targets


@settings(max_examples=40, deadline=None)
@given(case=target_cases)
def test_reference_targets_equal_one_pass_per_target(case):
    """Every target row equals a pass with that target alone after the prefix; prefix rows equal the prefix alone."""
    prefixes, targets = _case(case)
    q, k, v, offsets, n, ts, ts_w, pos_w, num_targets = _attention_inputs(
        prefixes, targets, case["extra"], case["heads"], case["dqk"], case["dv"], case["seed"])
    norm, with_bias = case["normalization"], case["with_bias"]
    bias = (ts, ts_w, pos_w) if with_bias else (None, None, None)
    out = hstu_attention_reference(q, k, v, offsets, n, *bias, normalization=norm, num_targets=num_targets)
    for b, (prefix, count) in enumerate(zip(prefixes, targets)):
        start = int(offsets[b])
        for t in range(count):
            expected = _single_target_pass(q, k, v, offsets, n, ts, ts_w, pos_w, b, prefix, t, norm, with_bias)
            torch.testing.assert_close(out[start + prefix + t], expected, rtol=1e-5, atol=1e-6)
        if count and prefix:
            expected = _prefix_pass(q, k, v, offsets, n, ts, ts_w, pos_w, b, prefix, norm, with_bias)
            torch.testing.assert_close(out[start:start + prefix], expected, rtol=1e-5, atol=1e-6)


def test_zero_targets_is_the_causal_formula():
    q, k, v, offsets, n, ts, ts_w, pos_w, _ = _attention_inputs([5, 0, 3], [0, 0, 0], 1, 2, 4, 3, 0)
    plain = hstu_attention_reference(q, k, v, offsets, n, ts, ts_w, pos_w)
    zero = hstu_attention_reference(q, k, v, offsets, n, ts, ts_w, pos_w, num_targets=torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)


def test_targets_do_not_see_each_other():
    """Changing one target's key and value changes no other row of its sequence."""
    q, k, v, offsets, n, ts, ts_w, pos_w, num_targets = _attention_inputs([4], [3], 0, 1, 4, 2, 1)
    base = hstu_attention_reference(q, k, v, offsets, n, ts, ts_w, pos_w, num_targets=num_targets)
    k2, v2 = k.clone(), v.clone()
    k2[5] += 3.0
    v2[5] -= 2.0
    out = hstu_attention_reference(q, k2, v2, offsets, n, ts, ts_w, pos_w, num_targets=num_targets)
    unchanged = [0, 1, 2, 3, 4, 6]
    torch.testing.assert_close(out[unchanged], base[unchanged])
    assert not torch.allclose(out[5], base[5])


def _dense_targets(x, offsets, prefixes, targets, part):
    """(B, max count, ...) rows of each sequence's prefix ("prefix") or targets ("targets"), zero padded."""
    width = max(max(prefixes if part == "prefix" else targets), 1)
    out = x.new_zeros((len(prefixes), width) + x.shape[1:])
    for b, (p, t) in enumerate(zip(prefixes, targets)):
        start = int(offsets[b]) + (0 if part == "prefix" else p)
        count = p if part == "prefix" else t
        out[b, :count] = x[start:start + count]
    return out


@settings(max_examples=30, deadline=None)
@given(case=target_cases)
def test_target_attention_from_cached_prefix(case):
    """hstu_target_attention on the prefix's keys/values gives the full M-FALCON pass's target rows."""
    prefixes, targets = _case(case)
    q, k, v, offsets, n, ts, ts_w, pos_w, num_targets = _attention_inputs(
        prefixes, targets, case["extra"], case["heads"], case["dqk"], case["dv"], case["seed"])
    norm, with_bias = case["normalization"], case["with_bias"]
    bias = (ts, ts_w, pos_w) if with_bias else (None, None, None)
    full = hstu_attention_reference(q, k, v, offsets, n, *bias, normalization=norm, num_targets=num_targets)
    target_ts = torch.stack([
        torch.nn.functional.pad(ts[b, p:p + t], (0, max(max(targets), 1) - t))
        for b, (p, t) in enumerate(zip(prefixes, targets))])
    prefix_k, prefix_v = (_dense_targets(x, offsets, prefixes, targets, "prefix") for x in (k, v))
    bias = target_bias(torch.tensor(prefixes), prefix_k.shape[1], n, ts, target_ts)
    got = hstu_target_attention(
        *(_dense_targets(x, offsets, prefixes, targets, "targets") for x in (q, k, v)), prefix_k, prefix_v, bias, n,
        *((ts_w, pos_w) if with_bias else (None, None)), normalization=norm)
    expected = _dense_targets(full, offsets, prefixes, targets, "targets")
    valid = torch.arange(expected.shape[1])[None, :] < torch.tensor(targets)[:, None]
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Triton kernel

triton_cases = st.fixed_dictionaries({
    "prefixes": st.lists(st.integers(0, 30), min_size=1, max_size=3),
    "targets": st.lists(st.integers(0, 12), min_size=3, max_size=3),
    "extra": st.integers(0, 3),
    "heads": st.integers(1, 2),
    "dims": st.sampled_from([(8, 8), (16, 16), (12, 25)]),
    "seed": st.integers(0, 2**16),
    "with_bias": st.booleans(),
})


def _triton_vs_reference(prefixes, targets, extra, heads, dims, seed, with_bias, dtype=torch.float32,
                         fwd_config=None, tol=1e-4):
    from ops.triton.hstu_attention import _hstu_attention, kernel_time_buckets

    q, k, v, offsets, n, ts, ts_w, pos_w, num_targets = _attention_inputs(
        prefixes, targets, extra, heads, *dims, seed, dtype, DEVICE)
    bias = (ts, ts_w, pos_w) if with_bias else (None, None, None)
    out = _hstu_attention(q, k, v, offsets, n, *bias, fwd_config=fwd_config, num_targets=num_targets)
    # The kernel's own bucket function (see test_triton_hstu_attention.py): fp32 logs may differ at boundaries.
    with mock.patch.object(hstu_module, "time_buckets", kernel_time_buckets):
        ref = hstu_attention_reference(q, k, v, offsets, n, *bias, num_targets=num_targets)
    scale = ref.float().abs().max().clamp(min=1e-6)
    assert (out.float() - ref.float()).abs().max() / scale <= tol


@settings(max_examples=8 if not CUDA else 20, deadline=None)
@given(case=triton_cases)
def test_triton_targets_match_reference(case):
    prefixes, targets = _case(case)
    if sum(prefixes) + sum(targets) == 0:
        return
    _triton_vs_reference(prefixes, targets, case["extra"], case["heads"], case["dims"], case["seed"],
                         case["with_bias"])


@pytest.mark.skipif(CUDA, reason="interpreter only: GPU tiles come from the tables")
@pytest.mark.parametrize("fwd_config", [(16, 16, 1, 1), (32, 16, 4, 2)])
def test_triton_targets_across_block_boundaries(fwd_config):
    """Prefixes ending inside, at and before block edges; blocks of targets only; a sequence of targets only."""
    _triton_vs_reference([15, 16, 17, 0, 40], [3, 16, 20, 5, 1], 2, 1, (16, 16), 7, True, fwd_config=fwd_config)


def test_triton_targets_forward_only():
    from ops.triton.hstu_attention import triton_hstu_attention

    q, k, v, offsets, n, ts, ts_w, pos_w, num_targets = _attention_inputs([5], [2], 0, 1, 8, 8, 3, device=DEVICE)
    q.requires_grad_(True)
    out = triton_hstu_attention(q, k, v, offsets, n, ts, ts_w, pos_w, num_targets)
    with pytest.raises(NotImplementedError, match="num_targets"):
        out.sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
def test_triton_targets_long_sequences(dtype, tol):
    """Histories of 1,000-4,000 with 1 to 1,024 targets, head dim 64, as in the benchmark."""
    _triton_vs_reference([4000, 1000, 999, 0], [1, 1024, 257, 64], 5, 2, (64, 64), 11, True, dtype, tol=tol)


# ----------------------------------------------------------------------------- model level

ENCODER_BINDINGS = [
    "hstu_encoder.num_blocks = 2", "hstu_encoder.num_heads = 2", "hstu_encoder.dqk = 4", "hstu_encoder.dv = 4",
    "sasrec_encoder.num_blocks = 2", "sasrec_encoder.num_heads = 2", "sasrec_encoder.ffn_hidden_dim = 8",
]
MAX_HISTORY, NUM_CANDIDATES = 6, 5


def _ranking_data(seed: int, num_users: int = 4,
                  max_length: int = 2 * NUM_CANDIDATES + MAX_HISTORY + 4) -> SequenceData:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2 * NUM_CANDIDATES + 1, max_length, num_users)
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gaps = rng.lognormal(8, 2, total).astype(np.int64)
    return SequenceData(
        name="m-falcon-test", item_ids=rng.integers(1, 30, total).astype(np.int32),
        ratings=rng.integers(1, 6, total).astype(np.float32), timestamps=np.cumsum(gaps) + 10**9,
        offsets=offsets, user_ids=np.arange(1, num_users + 1), candidate_ids=np.arange(1, 30, dtype=np.int32))


def _model(encoder: str, max_seq_len: int, seed: int, kernel: str = "torch") -> RankingModel:
    gin.clear_config()
    gin.parse_config(ENCODER_BINDINGS + [f"hstu_encoder.attention_kernel = '{kernel}'"])
    try:
        torch.manual_seed(seed)
        model = RankingModel(encoder, 30, max_seq_len, 8, dropout_rate=0.3, head_hidden_dim=8)
    finally:
        gin.clear_config()
    with torch.no_grad():  # weights far from the small init, so that every term of the attention shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def _one_pass_per_candidate(data: SequenceData, model: RankingModel, test: np.ndarray) -> torch.Tensor:
    """(S, k) liked logits: for each candidate, a data set whose user sequence is history + that candidate."""
    logits = torch.zeros(test.shape[0], NUM_CANDIDATES)
    for t in range(NUM_CANDIDATES):
        keep = np.ones(data.num_interactions, dtype=bool)
        for user, end, count in test:  # drop the other candidates and everything after
            first = data.offsets[user] + end
            keep[first:data.offsets[user + 1]] = False
            keep[first + t] = True
        lengths = np.add.reduceat(keep.astype(np.int64), data.offsets[:-1])
        single = SequenceData(data.name, data.item_ids[keep], data.ratings[keep], data.timestamps[keep],
                              np.concatenate([[0], np.cumsum(lengths)]), data.user_ids, data.candidate_ids)
        samples = test.copy()
        samples[:, 2] = 1
        evaluator = RankingEvaluator(model, RankingSequences(single, torch.device("cpu")), MAX_HISTORY, 64)
        logits[:, t] = torch.logit(evaluator.predictions(samples).liked_prob[:, 0].double()).float()
    return logits


@pytest.mark.parametrize("encoder", ["HSTU", "SASRec"])
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_equal_one_pass_per_candidate(encoder, seed):
    """Held-out candidates scored by the evaluator along each path, and the scorer with and without the history
    cache and several microbatch sizes: all equal one forward pass per candidate."""
    data = _ranking_data(seed)
    test = ranking_splits(data.lengths, NUM_CANDIDATES)["test"]
    model = _model(encoder, padded_length(MAX_HISTORY, NUM_CANDIDATES), seed)
    expected = _one_pass_per_candidate(data, model, test)

    sequences = RankingSequences(data, torch.device("cpu"))
    evaluator = RankingEvaluator(model, sequences, MAX_HISTORY, 3)
    for path in evaluator.paths():
        joint = evaluator.predictions(test, path)
        torch.testing.assert_close(torch.logit(joint.liked_prob.double()).float(), expected, rtol=1e-4, atol=1e-4,
                                   msg=path)

    history_samples = test.copy()
    history_samples[:, 2] = 0
    history = sequences.batch(history_samples, MAX_HISTORY, model.max_seq_len)
    past_end = torch.arange(history.timestamps.shape[1])[None, :] >= history.lengths[:, None]
    history.timestamps[past_end] = 0  # never read: prefixes end on their own timestamp
    rows = data.offsets[test[:, 0]][:, None] + test[:, 1:2] + np.arange(NUM_CANDIDATES)[None, :]
    item_ids = torch.as_tensor(data.item_ids[rows], dtype=torch.long)
    timestamps = torch.as_tensor(data.timestamps[rows])
    caches = [True, False] if encoder == "HSTU" else [False]
    for use_cache in caches:
        for microbatch in (1, 2, NUM_CANDIDATES):
            scores = MFalconScorer(model, microbatch, use_cache)(history, item_ids, timestamps)
            torch.testing.assert_close(scores["liked"], expected, rtol=1e-4, atol=1e-4,
                                       msg=f"cache={use_cache} b_m={microbatch}")
            assert scores["rating"].shape == (test.shape[0], NUM_CANDIDATES, 5)


def test_history_cache_holds_each_layers_keys_and_values():
    """encode_prefix's output equals the plain encoder pass, and its cache holds every layer's keys and values."""
    data = _ranking_data(3)
    samples = ranking_splits(data.lengths, NUM_CANDIDATES)["test"]
    samples[:, 2] = 0
    model = _model("HSTU", padded_length(MAX_HISTORY, NUM_CANDIDATES), 3)
    batch = RankingSequences(data, torch.device("cpu")).batch(samples, MAX_HISTORY, model.max_seq_len)
    pos = torch.arange(batch.item_ids.shape[1])[None, :]
    valid = pos < batch.lengths[:, None]
    x = model.embed(batch.item_ids, batch.action_ids, valid, pos.expand_as(batch.item_ids))
    offsets = complete_cumsum(batch.lengths)
    out, cache = model.encoder.encode_prefix(x, offsets, batch.total, batch.timestamps)
    torch.testing.assert_close(out, model.encoder(x, valid.long(), offsets, batch.total, batch.timestamps))
    assert len(cache.keys) == len(cache.values) == len(model.encoder.layers) == 2
    assert cache.lengths.tolist() == batch.lengths.tolist()
    hidden = dense_to_jagged(x, offsets, batch.total)
    for layer, keys, values in zip(model.encoder.layers, cache.keys, cache.values):
        _, _, k, v = layer.project(hidden)
        torch.testing.assert_close(keys[valid], k)
        torch.testing.assert_close(values[valid], v)
        hidden = layer(hidden, offsets, batch.timestamps)
    with pytest.raises(TypeError, match="HSTU"):
        _model("SASRec", model.max_seq_len, 0).encode_history(batch)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_scorer_with_the_kernel_on_gpu():
    """Histories up to 1,000 tokens, 150 candidates, fp32: the kernel's M-FALCON passes (b_m = 64 and
    one candidate per pass) and the cached path give the same scores."""
    max_history, count = 500, 150
    data = _ranking_data(5, num_users=3, max_length=2 * count + max_history)
    samples = ranking_splits(data.lengths, count)["test"]
    model = _model("HSTU", padded_length(max_history, 64), 5, kernel="triton").to(DEVICE)
    history_samples = samples.copy()
    history_samples[:, 2] = 0
    history = RankingSequences(data, DEVICE).batch(history_samples, max_history, model.max_seq_len)
    rows = data.offsets[samples[:, 0]][:, None] + samples[:, 1:2] + np.arange(count)[None, :]
    item_ids = torch.as_tensor(data.item_ids[rows], dtype=torch.long, device=DEVICE)
    timestamps = torch.as_tensor(data.timestamps[rows], device=DEVICE)
    one_per_pass = MFalconScorer(model, 1, use_cache=False)(history, item_ids, timestamps)["liked"]
    for use_cache in (True, False):
        scores = MFalconScorer(model, 64, use_cache)(history, item_ids, timestamps)["liked"]
        torch.testing.assert_close(scores, one_per_pass, rtol=1e-3, atol=1e-3, msg=f"cache={use_cache}")
