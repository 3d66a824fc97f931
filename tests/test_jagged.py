"""ops/jagged.py: complete_cumsum and dense <-> jagged, pure PyTorch vs fbgemm_gpu vs a Python loop.

Values and gradients are compared on random ragged batches (hypothesis), including
empty batches, empty sequences and sequences longer than the dense length (truncated).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ops import jagged

BACKENDS = ["torch"] + (["fbgemm"] if jagged.fbgemm_available() else [])
SETTINGS = settings(max_examples=40, deadline=None)


@pytest.fixture(autouse=True)
def _reset_backend():
    jagged.set_backend("auto")
    yield
    jagged.set_backend("auto")


def _offsets(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.long)


def loop_jagged_to_dense(values, lengths, max_len, padding_value=0.0):
    out = torch.full((len(lengths), max_len) + tuple(values.shape[1:]), padding_value, dtype=values.dtype)
    start = 0
    for b, n in enumerate(lengths):
        for p in range(min(n, max_len)):
            out[b, p] = values[start + p]
        start += n
    return out


def loop_dense_to_jagged(dense, lengths):
    rows = []
    for b, n in enumerate(lengths):
        for p in range(n):
            rows.append(dense[b, p])
    if not rows:
        return dense.new_zeros((0,) + tuple(dense.shape[2:]))
    return torch.stack(rows)


ragged = st.fixed_dictionaries(
    {
        "lengths": st.lists(st.integers(0, 7), min_size=0, max_size=6),
        "dim": st.integers(1, 4),
        "max_len": st.integers(1, 8),
        "padding": st.sampled_from([0.0, -1.5]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


# ----------------------------------------------------------------------------- complete_cumsum


@pytest.mark.parametrize("backend", BACKENDS)
def test_complete_cumsum_hand_values(backend):
    jagged.set_backend(backend)
    assert jagged.complete_cumsum(torch.tensor([3, 0, 2, 5])).tolist() == [0, 3, 3, 5, 10]
    assert jagged.complete_cumsum(torch.tensor([0])).tolist() == [0, 0]
    assert jagged.complete_cumsum(torch.tensor([], dtype=torch.long)).tolist() == [0]


@SETTINGS
@given(lengths=st.lists(st.integers(0, 50), min_size=0, max_size=10))
def test_complete_cumsum_matches_loop_on_every_backend(lengths):
    expected = _offsets(lengths).tolist()
    for backend in BACKENDS:
        jagged.set_backend(backend)
        got = jagged.complete_cumsum(torch.tensor(lengths, dtype=torch.long))
        assert got.tolist() == expected, backend
        assert got.numel() == len(lengths) + 1
    jagged.set_backend("auto")


# ----------------------------------------------------------------------------- jagged_to_dense


@SETTINGS
@given(case=ragged)
def test_jagged_to_dense_values_and_gradients_match_loop(case):
    lengths, dim, max_len, pad = case["lengths"], case["dim"], case["max_len"], case["padding"]
    gen = torch.Generator().manual_seed(case["seed"])
    total = sum(lengths)
    base = torch.randn(total, dim, generator=gen)
    upstream = torch.randn(len(lengths), max_len, dim, generator=gen)
    offsets = _offsets(lengths)

    expected = loop_jagged_to_dense(base, lengths, max_len, pad)
    # Gradient by hand: each kept jagged row receives the upstream gradient of its dense slot.
    expected_grad = torch.zeros(total, dim)
    start = 0
    for b, n in enumerate(lengths):
        for p in range(min(n, max_len)):
            expected_grad[start + p] = upstream[b, p]
        start += n

    for backend in BACKENDS:
        try:
            jagged.set_backend(backend)
            values = base.clone().requires_grad_(True)
            dense = jagged.jagged_to_dense(values, offsets, max_len, pad)
            assert dense.shape == (len(lengths), max_len, dim), backend
            torch.testing.assert_close(dense, expected, rtol=0, atol=0, msg=f"values, backend {backend}")
            if total:
                (dense * upstream).sum().backward()
                torch.testing.assert_close(values.grad, expected_grad, rtol=0, atol=0,
                                           msg=f"grad, backend {backend}")
        finally:
            jagged.set_backend("auto")


@SETTINGS
@given(case=ragged)
def test_jagged_to_dense_one_and_three_dim_values(case):
    """(L,) values go through the same path as (L, 1); (L, h, d) keeps its trailing dims."""
    lengths, max_len, pad = case["lengths"], case["max_len"], case["padding"]
    gen = torch.Generator().manual_seed(case["seed"])
    total = sum(lengths)
    offsets = _offsets(lengths)
    flat = torch.randn(total, generator=gen)
    cube = torch.randn(total, 2, 3, generator=gen)
    for backend in BACKENDS:
        try:
            jagged.set_backend(backend)
            one = jagged.jagged_to_dense(flat, offsets, max_len, pad)
            assert one.shape == (len(lengths), max_len)
            torch.testing.assert_close(one, jagged.jagged_to_dense(flat.unsqueeze(-1), offsets, max_len, pad).squeeze(-1))
            torch.testing.assert_close(one, loop_jagged_to_dense(flat, lengths, max_len, pad))
            three = jagged.jagged_to_dense(cube, offsets, max_len, pad)
            torch.testing.assert_close(three, loop_jagged_to_dense(cube, lengths, max_len, pad))
        finally:
            jagged.set_backend("auto")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jagged_to_dense_truncates_long_sequences(backend):
    jagged.set_backend(backend)
    values = torch.arange(1.0, 9.0).view(8, 1)  # sequences [1..5], [], [6, 7, 8]
    dense = jagged.jagged_to_dense(values, torch.tensor([0, 5, 5, 8]), 3, padding_value=-1.0)
    assert dense.squeeze(-1).tolist() == [[1.0, 2.0, 3.0], [-1.0, -1.0, -1.0], [6.0, 7.0, 8.0]]
    dense4 = jagged.jagged_to_dense(values, torch.tensor([0, 5, 5, 8]), 4)
    assert dense4.squeeze(-1).tolist() == [[1.0, 2.0, 3.0, 4.0], [0.0] * 4, [6.0, 7.0, 8.0, 0.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_jagged_to_dense_truncation_gradient_is_zero_for_dropped_rows(backend):
    jagged.set_backend(backend)
    values = torch.ones(6, 2, requires_grad=True)
    dense = jagged.jagged_to_dense(values, torch.tensor([0, 4, 6]), 2)
    (dense * torch.arange(1.0, 9.0).view(2, 2, 2)).sum().backward()
    assert values.grad.tolist() == [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend):
    jagged.set_backend(backend)
    empty = torch.zeros(1, dtype=torch.long)
    assert jagged.jagged_to_dense(torch.zeros(0, 3), empty, 4).shape == (0, 4, 3)
    assert jagged.dense_to_jagged(torch.zeros(0, 4, 3), empty).shape == (0, 3)
    # Two sequences, both empty.
    dense = jagged.jagged_to_dense(torch.zeros(0, 2), torch.zeros(3, dtype=torch.long), 2, padding_value=7.0)
    assert dense.shape == (2, 2, 2) and bool((dense == 7.0).all())
    assert jagged.dense_to_jagged(torch.randn(2, 3, 2), torch.zeros(3, dtype=torch.long)).shape == (0, 2)


# ----------------------------------------------------------------------------- dense_to_jagged


@SETTINGS
@given(case=ragged, give_total=st.booleans())
def test_dense_to_jagged_values_and_gradients_match_loop(case, give_total):
    lengths, dim, seed = case["lengths"], case["dim"], case["seed"]
    max_len = max([case["max_len"]] + lengths)  # dense_to_jagged needs lengths <= N
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(len(lengths), max_len, dim, generator=gen)
    total = sum(lengths)
    upstream = torch.randn(total, dim, generator=gen)
    offsets = _offsets(lengths)

    expected = loop_dense_to_jagged(base, lengths)
    expected_grad = torch.zeros_like(base)
    row = 0
    for b, n in enumerate(lengths):
        for p in range(n):
            expected_grad[b, p] = upstream[row]
            row += 1

    for backend in BACKENDS:
        try:
            jagged.set_backend(backend)
            dense = base.clone().requires_grad_(True)
            out = jagged.dense_to_jagged(dense, offsets, total if give_total else None)
            assert out.shape == (total, dim)
            torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=f"values, backend {backend}")
            if total and len(lengths):
                (out * upstream).sum().backward()
                torch.testing.assert_close(dense.grad, expected_grad, rtol=0, atol=0,
                                           msg=f"grad, backend {backend}")
        finally:
            jagged.set_backend("auto")


@SETTINGS
@given(case=ragged)
def test_round_trip_and_two_dim_dense(case):
    lengths, dim, seed = case["lengths"], case["dim"], case["seed"]
    max_len = max([case["max_len"]] + lengths)
    gen = torch.Generator().manual_seed(seed)
    offsets = _offsets(lengths)
    values = torch.randn(sum(lengths), dim, generator=gen)
    for backend in BACKENDS:
        try:
            jagged.set_backend(backend)
            dense = jagged.jagged_to_dense(values, offsets, max_len)
            torch.testing.assert_close(jagged.dense_to_jagged(dense, offsets), values, rtol=0, atol=0)
            # (B, N) dense (1-D values per position).
            dense2 = torch.randn(len(lengths), max_len, generator=gen)
            out2 = jagged.dense_to_jagged(dense2, offsets)
            torch.testing.assert_close(out2, loop_dense_to_jagged(dense2.unsqueeze(-1), lengths).squeeze(-1))
        finally:
            jagged.set_backend("auto")


def test_dense_to_jagged_hand_values():
    dense = torch.arange(12.0).view(3, 4, 1)  # rows 0-3, 4-7, 8-11
    out = jagged.dense_to_jagged(dense, torch.tensor([0, 2, 2, 5]))
    assert out.squeeze(-1).tolist() == [0.0, 1.0, 8.0, 9.0, 10.0]


# ----------------------------------------------------------------------------- backend switch


def test_set_backend_validates_names_and_backends_agree():
    with pytest.raises(ValueError):
        jagged.set_backend("cuda")
    if not jagged.fbgemm_available():
        with pytest.raises(RuntimeError):
            jagged.set_backend("fbgemm")
    jagged.set_backend("torch")
    assert not jagged._use_fbgemm()
    jagged.set_backend("auto")
    assert jagged._use_fbgemm() == jagged.fbgemm_available()
