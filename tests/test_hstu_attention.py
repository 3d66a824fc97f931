"""ops/hstu_attention.py against a deliberately naive loop written from REFERENCE.md section 5.

For sequence b, query i and key j <= i (N = the padded length, max_seq_len):
    rab(i, j) = pos_w[N - 1 + j - i] + ts_w[bucket(t[min(i + 1, N - 1)] - t[j])]
    a(i, j)   = SiLU(q_i . k_j + rab(i, j)) / N
    out_i     = sum_j a(i, j) v_j
bucket(d) = floor(ln(max(|d|, 1)) / 0.301) clamped to [0, 128].

The naive loop does its arithmetic in float64 with Python's math.log. The code
under test computes buckets in float32 (as the release did); the two agree
exactly for |d| <= 3e5 (checked exhaustively below) and can differ by one
bucket beyond, so random timestamps are drawn from [0, 3e5].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ops import jagged
from ops.hstu_attention import hstu_attention, hstu_attention_reference, relative_bias, time_buckets

BACKENDS = ["torch"] + (["fbgemm"] if jagged.fbgemm_available() else [])
MAX_TS = 300_000


@pytest.fixture(autouse=True)
def _reset_backend():
    jagged.set_backend("auto")
    yield
    jagged.set_backend("auto")


# ----------------------------------------------------------------------------- the naive formula


def naive_bucket(d: int) -> int:
    return min(128, max(0, math.floor(math.log(max(abs(d), 1)) / 0.301)))


def naive_attention(q, k, v, lengths, N, timestamps=None, ts_w=None, pos_w=None, normalization="silu"):
    """Per sequence, per head, per (i, j): scalar arithmetic, float64. Differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    heads, dqk, dv = q.shape[1], q.shape[2], v.shape[2]
    use_bias = timestamps is not None and ts_w is not None and pos_w is not None
    if use_bias:
        ts_w, pos_w = ts_w.double(), pos_w.double()
    rows = []
    start = 0
    for b, n in enumerate(lengths):
        for i in range(n):
            per_head = []
            for h in range(heads):
                logits = []
                for j in range(i + 1):  # causal: keys j <= i only
                    s = (q[start + i, h] * k[start + j, h]).sum()
                    if use_bias:
                        nxt = min(i + 1, N - 1)  # next position; the last timestamp repeated past the end
                        d = int(timestamps[b, nxt]) - int(timestamps[b, j])
                        s = s + pos_w[N - 1 + j - i] + ts_w[naive_bucket(d)]
                    logits.append(s)
                if normalization == "silu":
                    weights = [F.silu(s) / N for s in logits]
                else:
                    scaled = torch.stack(logits) / math.sqrt(dqk)
                    weights = list(torch.softmax(scaled, dim=0))
                acc = torch.zeros(dv, dtype=torch.float64)
                for j, w in enumerate(weights):
                    acc = acc + w * v[start + j, h]
                per_head.append(acc)
            rows.append(torch.stack(per_head))
        start += n
    if not rows:
        return torch.zeros(0, heads, dv, dtype=torch.float64)
    return torch.stack(rows)


def _offsets(lengths):
    return torch.tensor([0] + list(np.cumsum(lengths, dtype=np.int64)), dtype=torch.long)


cases = st.fixed_dictionaries(
    {
        "lengths": st.lists(st.integers(0, 6), min_size=1, max_size=4),
        "extra": st.integers(0, 2),  # N - max(lengths); 0 exercises "t past the end" clamping
        "heads": st.integers(1, 2),
        "dqk": st.integers(1, 4),
        "dv": st.integers(1, 3),
        "sorted_ts": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
        "backend": st.sampled_from(BACKENDS),
    }
)


def _make(case, dtype=torch.float32):
    lengths = case["lengths"]
    N = max(max(lengths) + case["extra"], 1)
    gen = torch.Generator().manual_seed(case["seed"])
    total = sum(lengths)
    h, dqk, dv = case["heads"], case["dqk"], case["dv"]
    q = torch.randn(total, h, dqk, generator=gen, dtype=dtype)
    k = torch.randn(total, h, dqk, generator=gen, dtype=dtype)
    v = torch.randn(total, h, dv, generator=gen, dtype=dtype)
    ts = torch.randint(0, MAX_TS + 1, (len(lengths), N), generator=gen)
    if case["sorted_ts"]:
        ts = ts.sort(dim=1).values
    ts_w = torch.randn(129, generator=gen, dtype=dtype)  # large weights so that wrong buckets show
    pos_w = torch.randn(2 * N - 1, generator=gen, dtype=dtype)
    return q, k, v, _offsets(lengths), N, ts, ts_w, pos_w


# ----------------------------------------------------------------------------- time buckets


def test_time_buckets_hand_values():
    d = torch.tensor([0, 1, -1, 2, -5, 10, 100, 1_000_000_000, -(10**18), 10**18])
    # ln2/0.301 = 2.30, ln5/0.301 = 5.35, ln10/0.301 = 7.65, ln100/0.301 = 15.30,
    # ln(1e9)/0.301 = 68.85 (not clamped), ln(1e18)/0.301 = 137.7 -> clamped to 128.
    assert time_buckets(d).tolist() == [0, 0, 0, 2, 5, 7, 15, 68, 128, 128]
    assert time_buckets(d).dtype == torch.int64
    assert time_buckets(torch.tensor([10**9, 3]), num_buckets=10).tolist() == [10, 3]
    # Bucket boundaries: exp(0.301 * 3) = 2.466 -> 3 lies in bucket 3, 2 in bucket 2.
    assert time_buckets(torch.tensor([2, 3, 9, 10])).tolist() == [2, 3, 7, 7]


def test_time_buckets_equal_float64_formula_for_small_deltas():
    d = torch.arange(-MAX_TS, MAX_TS + 1)
    expected = np.clip(np.floor(np.log(np.maximum(np.abs(d.numpy()), 1).astype(np.float64)) / 0.301), 0, 128)
    assert np.array_equal(time_buckets(d).numpy(), expected.astype(np.int64))


def test_relative_bias_matches_naive_for_every_pair():
    gen = torch.Generator().manual_seed(0)
    N, n = 6, 4
    ts = torch.randint(0, MAX_TS, (2, N), generator=gen)
    ts_w = torch.randn(129, generator=gen)
    pos_w = torch.randn(2 * N - 1, generator=gen)
    rab = relative_bias(ts, ts_w, pos_w, N, n)
    assert rab.shape == (2, n, n)
    for b in range(2):
        for i in range(n):
            for j in range(n):
                d = int(ts[b, i + 1]) - int(ts[b, j])
                expected = pos_w[N - 1 + j - i] + ts_w[naive_bucket(d)]
                assert torch.allclose(rab[b, i, j], expected), (b, i, j)


def test_relative_bias_repeats_last_timestamp_past_the_end():
    """With n = N, query N - 1 uses t[N - 1] (bucket of t[N-1] - t[j])."""
    N = 3
    ts = torch.tensor([[0, 10, 1000]])
    ts_w = torch.arange(129, dtype=torch.float32)  # ts_w[b] = b: the bias reads back the bucket
    pos_w = torch.zeros(2 * N - 1)
    rab = relative_bias(ts, ts_w, pos_w, N, N)
    # i = 2 (last): next index clamped to 2 -> t = 1000; j = 0, 1, 2: d = 1000, 990, 0.
    assert rab[0, 2].tolist() == [float(naive_bucket(1000)), float(naive_bucket(990)), 0.0]
    # i = 0: next timestamp t[1] = 10; j = 0: d = 10 -> bucket 7.
    assert rab[0, 0, 0].item() == 7.0
    # Position part: pos_w[N - 1 + j - i].
    rab_pos = relative_bias(ts, torch.zeros(129), torch.arange(5.0), N, N)
    assert rab_pos[0].tolist() == [[2.0, 3.0, 4.0], [1.0, 2.0, 3.0], [0.0, 1.0, 2.0]]


# ----------------------------------------------------------------------------- forward vs loop


@settings(max_examples=40, deadline=None)
@given(case=cases)
def test_silu_attention_matches_naive_loop(case):
    q, k, v, offsets, N, ts, ts_w, pos_w = _make(case)
    try:
        jagged.set_backend(case["backend"])
        got = hstu_attention_reference(q, k, v, offsets, N, ts, ts_w, pos_w)
    finally:
        jagged.set_backend("auto")
    expected = naive_attention(q, k, v, case["lengths"], N, ts, ts_w, pos_w)
    assert got.shape == (sum(case["lengths"]), case["heads"], case["dv"])
    assert got.dtype == q.dtype
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(case=cases)
def test_softmax_ablation_matches_naive_loop(case):
    q, k, v, offsets, N, ts, ts_w, pos_w = _make(case)
    got = hstu_attention_reference(q, k, v, offsets, N, ts, ts_w, pos_w, normalization="softmax")
    expected = naive_attention(q, k, v, case["lengths"], N, ts, ts_w, pos_w, normalization="softmax")
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(case=cases)
def test_without_bias_equals_zero_bias_weights(case):
    q, k, v, offsets, N, ts, ts_w, pos_w = _make(case)
    zero_ts, zero_pos = torch.zeros_like(ts_w), torch.zeros_like(pos_w)
    for norm in ("silu", "softmax"):
        with_zero = hstu_attention_reference(q, k, v, offsets, N, ts, zero_ts, zero_pos, normalization=norm)
        no_ts_w = hstu_attention_reference(q, k, v, offsets, N, ts, None, pos_w, normalization=norm)
        no_bias = hstu_attention_reference(q, k, v, offsets, N, normalization=norm)
        torch.testing.assert_close(no_ts_w, with_zero, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(no_bias, with_zero, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            no_bias.double(), naive_attention(q, k, v, case["lengths"], N, normalization=norm),
            rtol=1e-4, atol=1e-5,
        )


def test_scale_is_padded_length_not_sequence_length():
    """Without bias, SiLU attention is linear in 1/N: N = 10 gives half of N = 5 for the same sequences."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, 1, 2, generator=gen) for _ in range(3))
    offsets = torch.tensor([0, 2, 5])
    out5 = hstu_attention_reference(q, k, v, offsets, 5)
    out10 = hstu_attention_reference(q, k, v, offsets, 10)
    torch.testing.assert_close(out10 * 2, out5)
    # First position of the first sequence, by hand: silu(q0.k0) / N * v0.
    expected = F.silu((q[0, 0] * k[0, 0]).sum()) / 5 * v[0, 0]
    torch.testing.assert_close(out5[0, 0], expected)


def test_causal_and_sequences_independent():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(7, 2, 3, generator=gen) for _ in range(3))
    offsets = torch.tensor([0, 4, 7])
    N = 5
    ts = torch.randint(0, 1000, (2, N), generator=gen)
    ts_w, pos_w = torch.randn(129, generator=gen), torch.randn(2 * N - 1, generator=gen)
    base = hstu_attention_reference(q, k, v, offsets, N, ts, ts_w, pos_w)
    k2, v2 = k.clone(), v.clone()
    k2[2] += 5.0  # third item of sequence 0
    v2[2] -= 3.0
    k2[5] += 1.0  # second item of sequence 1
    out = hstu_attention_reference(q, k2, v2, offsets, N, ts, ts_w, pos_w)
    torch.testing.assert_close(out[:2], base[:2])  # earlier positions of sequence 0
    assert not torch.allclose(out[2], base[2])
    torch.testing.assert_close(out[4], base[4])  # first position of sequence 1
    assert not torch.allclose(out[5], base[5])


def test_empty_and_length_one_sequences():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 2, generator=gen) for _ in range(3))
    offsets = torch.tensor([0, 0, 1, 1])
    N = 4
    ts = torch.tensor([[0, 0, 0, 0], [100, 103, 0, 0], [0, 0, 0, 0]])
    ts_w = torch.randn(129, generator=gen)
    pos_w = torch.randn(2 * N - 1, generator=gen)
    out = hstu_attention_reference(q, k, v, offsets, N, ts, ts_w, pos_w)
    s = (q[0, 0] * k[0, 0]).sum() + pos_w[N - 1] + ts_w[naive_bucket(3)]
    torch.testing.assert_close(out[0, 0], F.silu(s) / N * v[0, 0])
    # All sequences empty.
    empty = torch.zeros(0, 1, 2)
    assert hstu_attention_reference(empty, empty, empty, torch.zeros(3, dtype=torch.long), N).shape == (0, 1, 2)


# ----------------------------------------------------------------------------- gradients vs loop


@settings(max_examples=15, deadline=None)
@given(case=cases, normalization=st.sampled_from(["silu", "softmax"]))
def test_gradients_match_naive_loop(case, normalization):
    """float32 code (it computes in float32 internally) vs the float64 loop; tolerance 1e-3 rel, 1e-4 abs."""
    q, k, v, offsets, N, ts, ts_w, pos_w = _make(case)
    total = sum(case["lengths"])
    if total == 0:
        return
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, ts_w, pos_w)]
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    upstream = torch.randn(total, case["heads"], case["dv"], generator=gen)
    try:
        jagged.set_backend(case["backend"])
        out = hstu_attention_reference(leaves[0], leaves[1], leaves[2], offsets, N, ts, leaves[3], leaves[4],
                                       normalization=normalization)
        got = torch.autograd.grad((out * upstream).sum(), leaves)
    finally:
        jagged.set_backend("auto")
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v, ts_w, pos_w)]
    ref = naive_attention(leaves64[0], leaves64[1], leaves64[2], case["lengths"], N, ts, leaves64[3], leaves64[4],
                          normalization=normalization)
    expected = torch.autograd.grad((ref * upstream.double()).sum(), leaves64, allow_unused=True)
    for name, g, e in zip(("q", "k", "v", "ts_w", "pos_w"), got, expected):
        e = torch.zeros_like(leaves64[["q", "k", "v", "ts_w", "pos_w"].index(name)]) if e is None else e
        torch.testing.assert_close(g.double(), e, rtol=1e-3, atol=1e-4, msg=f"gradient of {name}")


# ----------------------------------------------------------------------------- dispatcher


def test_dispatcher_on_cpu_uses_reference_and_validates_arguments():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(5, 2, 3, generator=gen) for _ in range(3))
    offsets = torch.tensor([0, 2, 5])
    N = 4
    ts = torch.randint(0, 1000, (2, N), generator=gen)
    ts_w, pos_w = torch.randn(129, generator=gen), torch.randn(2 * N - 1, generator=gen)
    ref = hstu_attention_reference(q, k, v, offsets, N, ts, ts_w, pos_w)
    for kernel in ("auto", "torch"):
        torch.testing.assert_close(hstu_attention(q, k, v, offsets, N, ts, ts_w, pos_w, kernel=kernel), ref)
    soft = hstu_attention(q, k, v, offsets, N, ts, ts_w, pos_w, normalization="softmax", kernel="torch")
    torch.testing.assert_close(
        soft, hstu_attention_reference(q, k, v, offsets, N, ts, ts_w, pos_w, normalization="softmax"))
    assert not torch.allclose(soft, ref)
    with pytest.raises(ValueError):
        hstu_attention(q, k, v, offsets, N, kernel="cuda")
    with pytest.raises(ValueError):
        hstu_attention_reference(q, k, v, offsets, N, normalization="relu")


def test_an_old_triton_falls_back_to_pytorch_with_a_notice(monkeypatch, capsys):
    import triton

    import ops.hstu_attention as attention
    from ops.dispatch import notify_once

    for cached in (attention.triton_problem, notify_once):
        cached.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    try:
        assert "older than 3.3" in attention.triton_problem()
        cuda = torch.device("cuda")  # the check runs before anything touches the device
        assert attention.triton_available(cuda) is False
        assert attention.triton_available(cuda) is False
        notices = capsys.readouterr().err.splitlines()
        assert len(notices) == 1 and notices[0].startswith("notice: HSTU attention uses the PyTorch path")
        q = torch.randn(3, 1, 4)
        with pytest.raises(RuntimeError, match="older than 3.3"):
            attention.hstu_attention(q, q, q, torch.tensor([0, 3]), 4, kernel="triton")
    finally:
        for cached in (attention.triton_problem, notify_once):
            cached.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    assert attention.triton_problem() is None
    attention.triton_problem.cache_clear()
