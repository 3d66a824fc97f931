"""Triton gathered dot products (ops/triton/gathered_dot.py) against the PyTorch formula,
and their use for sampled negatives (losses.negative_logits).

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors (numpy, slow) with
small blocks (4 rows x 8 columns x 16 dims), so tiny shapes still span several blocks of
L, R and D, ragged at the end. Few items (P <= 8) make columns repeat, within a tile and
across programs: the table gradient's atomics must sum every repeat.

Tolerances, as max |kernel - reference| / max |reference| per tensor:
* fp32: 1e-5. Both sides sum exact-ish fp32 products in fp32 and differ only in the order
  of the sums (at most a few hundred terms here).
* bf16 inputs: the output is fp32 and the products of bf16 values are exact in fp32, so
  1e-5 against the formula on the upcast inputs; gradients are rounded to bf16 (8 significant
  bits) at the end: up to 2^-8 relative on a GPU, 2^-7 in the interpreter (its fp32 -> bf16
  conversion truncates), so 1e-2.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

triton = pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ops.triton.gathered_dot as kernel_module  # noqa: E402
from generative_recommenders.objectives import losses  # noqa: E402
from generative_recommenders.modeling.embeddings import ItemTable  # noqa: E402
from generative_recommenders.objectives.losses import NegativesSampler, negative_logits  # noqa: E402
from ops.gathered_dot import gathered_dot, gathered_dot_reference  # noqa: E402
from ops.triton.gathered_dot import triton_gathered_dot  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
MAX_L, MAX_R, EXAMPLES = (300, 700, 30) if CUDA else (13, 21, 50)
DIMS = [1, 50, 64]
FP32_TOL, BF16_GRAD_TOL = 1e-5, 1e-2
# A table row's gradient sums up to L * R = 210,000 products on the GPU, in atomic (arbitrary) order:
# fp32 rounding then reaches ~sqrt(n) * 6e-8 ~ 3e-5 relative (measured 1.3e-5 on an H100).
FP32_GRAD_TOL = 1e-4 if CUDA else FP32_TOL


def _rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-6) -> float:
    if a.numel() == 0:
        return 0.0
    scale = b.float().abs().max().item()
    return (a.float() - b.float()).abs().max().item() / max(scale, floor)


def _inputs(rows: int, cols: int, dim: int, items: int, seed: int, query_dtype=torch.float32,
            table_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, dim, generator=gen).to(DEVICE, query_dtype).requires_grad_()
    table = torch.randn(items, dim, generator=gen).to(DEVICE, table_dtype).requires_grad_()
    columns = torch.randint(0, items, (rows, cols), generator=gen).to(DEVICE)
    grad = torch.randn(rows, cols, generator=gen).to(DEVICE)
    return query, table, columns, grad


def _check(query, table, columns, grad, grad_tol=FP32_GRAD_TOL, row_offset=0, eps=None):
    """Output, grad_query and grad_table of the kernel against the formula on fp32 copies of the inputs."""
    out = triton_gathered_dot(query, table, columns, row_offset, eps)
    ref_query = query.detach().float().requires_grad_()
    ref_table = table.detach().float().requires_grad_()
    ref = gathered_dot_reference(ref_query, ref_table, columns, row_offset, eps)
    assert out.shape == ref.shape == columns.shape and out.dtype == torch.float32
    # Normalised rows: |out| <= ||query||, and (q.w) / n vs q.(w / n) round differently, so a tiny
    # (cancelling) dot is compared on the scale of ||query||.
    floor = query.detach().float().norm(dim=1).max().item() if eps is not None and query.numel() else 1e-6
    assert _rel_err(out, ref, floor) <= FP32_TOL, ("out", _rel_err(out, ref, floor))
    got = torch.autograd.grad(out, [query, table], grad)
    want = torch.autograd.grad(ref, [ref_query, ref_table], grad)
    # A gradient entry sums grad * operand terms that can cancel (seen: 18 terms of ~1 summing to 0.02), and
    # fp32 sums err relative to sum |terms|: the same formula on absolute values gives that scale.
    # (Without eps only: the normalised rows' gradient is compared as before.)
    floors = [1e-6, 1e-6]
    if eps is None:
        abs_query, abs_table = (x.detach().float().abs().requires_grad_() for x in (query, table))
        magnitudes = torch.autograd.grad(gathered_dot_reference(abs_query, abs_table, columns, row_offset),
                                         [abs_query, abs_table], grad.abs())
        floors = [max(m.max().item() if m.numel() else 0.0, 1e-6) for m in magnitudes]
    for name, a, b, x, floor in zip(("grad_query", "grad_table"), got, want, (query, table), floors):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        assert _rel_err(a, b, floor) <= grad_tol, (name, _rel_err(a, b, floor))


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    rows=st.integers(0, MAX_L),
    cols=st.integers(1, MAX_R),
    dim=st.sampled_from(DIMS),
    items=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(rows, cols, dim, items, seed):
    """Forward and both gradients; L = 0 or a few rows, R and D not multiples of the blocks, repeated columns."""
    _check(*_inputs(rows, cols, dim, items, seed))


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    rows=st.integers(0, MAX_L),
    cols=st.integers(1, MAX_R),
    dim=st.sampled_from([2, 50, 64]),  # not 1: a normalised 1-d row is +-1, its gradient exactly 0
    items=st.integers(1, 8),
    offset=st.integers(0, 3),
    tiny_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_normalised_rows_match_reference(rows, cols, dim, items, offset, tiny_row, seed):
    """Rows normalised in the kernel (F.normalize, eps 1e-6) at row_offset + column: forward and both
    gradients, including a row shorter than eps (where the norm is the constant eps)."""
    query, table, columns, grad = _inputs(rows, cols, dim, items + offset, seed)
    if tiny_row:
        with torch.no_grad():
            table[offset] *= 1e-8
    _check(query, table, columns.clamp(max=items - 1), grad, row_offset=offset, eps=1e-6)


def test_repeated_column_gets_every_contribution():
    """Every (l, r) points at row 2: its gradient is sum_l (sum_r g[l, r]) query[l], the other rows stay 0."""
    query, table, _, grad = _inputs(6, 19, 50, 5, seed=1)
    columns = torch.full((6, 19), 2, device=DEVICE)
    out = triton_gathered_dot(query, table, columns)
    grad_query, grad_table = torch.autograd.grad(out, [query, table], grad)
    expected = (grad.sum(1, keepdim=True) * query.detach()).sum(0)
    assert _rel_err(grad_table[2], expected) <= FP32_TOL
    assert not grad_table[[0, 1, 3, 4]].any()
    assert _rel_err(grad_query, grad.sum(1, keepdim=True) * table.detach()[2]) <= FP32_TOL


@pytest.mark.parametrize("query_dtype,table_dtype", [(torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32)])
def test_bf16_inputs_accumulate_in_fp32(query_dtype, table_dtype):
    """bf16 (or mixed, as under autocast) inputs: an fp32 output as exact as for fp32 inputs; gradients in
    the inputs' dtypes."""
    _check(*_inputs(11, 37, 64, 6, seed=2, query_dtype=query_dtype, table_dtype=table_dtype),
           grad_tol=BF16_GRAD_TOL)


def _nan_padded(rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """A (rows, dim) view into a wider tensor whose other columns are NaN: reading past D poisons the result."""
    wide = torch.full((rows, dim + 20), float("nan"))
    wide[:, 3:3 + dim] = torch.randn(rows, dim, generator=gen)
    return wide.to(DEVICE)[:, 3:3 + dim]


@pytest.mark.parametrize("dim", [5, 50])
def test_strided_inputs_are_read_within_their_rows(dim):
    """query and table are column slices of NaN-padded tensors (row stride != D): every load is masked to D."""
    gen = torch.Generator().manual_seed(3)
    query, table = _nan_padded(9, dim, gen), _nan_padded(7, dim, gen)
    columns = torch.randint(0, 7, (9, 12), generator=gen).to(DEVICE)
    grad = torch.randn(9, 12, generator=gen).to(DEVICE)
    _check(query.requires_grad_(), table.requires_grad_(), columns, grad)


@pytest.mark.parametrize("frozen", ["table", "query"])
def test_one_gradient(frozen):
    """Only one input requires grad: the kernel computes only that gradient."""
    query, table, columns, grad = _inputs(9, 12, 50, 7, seed=3)
    inputs = {"query": query, "table": table}
    inputs[frozen] = inputs[frozen].detach()
    wanted = table if frozen == "query" else query
    out = triton_gathered_dot(inputs["query"], inputs["table"], columns)
    ref = gathered_dot_reference(inputs["query"], inputs["table"], columns)
    (got,) = torch.autograd.grad(out, [wanted], grad)
    (want,) = torch.autograd.grad(ref, [wanted], grad)
    assert _rel_err(got, want) <= FP32_TOL


def test_empty_negatives():
    """R = 0: an empty output, zero gradients."""
    query, table, _, _ = _inputs(4, 0, 8, 3, seed=4)
    columns = torch.zeros((4, 0), dtype=torch.int64, device=DEVICE)
    out = triton_gathered_dot(query, table, columns)
    assert out.shape == (4, 0)
    grad_query, grad_table = torch.autograd.grad(out.sum(), [query, table])
    assert not grad_query.any() and not grad_table.any()


@pytest.mark.skipif(CUDA, reason="CPU dispatch")
def test_cpu_dispatch_follows_the_interpreter_switch(monkeypatch):
    """On CPU, gathered_dot runs the kernel only under TRITON_INTERPRET=1, the formula otherwise."""
    calls = []
    monkeypatch.setattr(kernel_module, "triton_gathered_dot",
                        lambda *args: calls.append(1) or gathered_dot_reference(*args))
    query, table, columns, _ = _inputs(3, 4, 8, 5, seed=5)
    gathered_dot(query, table, columns)
    assert calls == [1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gathered_dot(query, table, columns)
    assert calls == [1]


def _vectors(table: torch.nn.Module):
    """The model's item_vectors: normalised (eps 1e-6) embeddings, as SequentialRecommender gives them."""
    # ids, or a slice of consecutive ids (a whole catalog), as ItemEmbedding takes them
    return lambda ids: F.normalize(table.weight[ids] if isinstance(ids, slice) else table(ids), dim=-1, eps=1e-6)


def _negatives(kernel: bool, monkeypatch, rows: int, num: int, num_candidates: int, raw_table: bool = False):
    """negative_logits with the kernel path allowed or not: ids, logits, d(sum w * logits) / d(query, table)."""
    monkeypatch.setattr(losses, "gathered_dot_kernel_available", lambda device: kernel)
    gen = torch.Generator().manual_seed(6)
    table = torch.nn.Embedding(600, 50).to(DEVICE)
    with torch.no_grad():
        table.weight.copy_(torch.randn(600, 50, generator=gen))
    query = torch.randn(rows, 50, generator=gen).to(DEVICE).requires_grad_()
    pos_ids = torch.randint(1, 600, (rows,), generator=gen).to(DEVICE)
    sampler = NegativesSampler("local", torch.arange(100, 100 + num_candidates, device=DEVICE))
    ids, logits = negative_logits(query, pos_ids, _vectors(table), sampler, num,
                                  torch.Generator(DEVICE).manual_seed(9),
                                  ItemTable(table.weight, 1e-6) if raw_table else None)
    weights = torch.randn(logits.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((logits * weights).sum(), [query, table.weight])
    # The per-id formula on the same inputs and draws: einsum(query, normalize(table[ids])).
    expected = torch.einsum("ld,lrd->lr", query, _vectors(table)(ids))
    expected_grads = torch.autograd.grad((expected * weights).sum(), [query, table.weight])
    return ids, logits, grads, expected, expected_grads


@pytest.mark.parametrize("raw_table", [False, True])
def test_negative_logits_kernel_path_equals_per_id_formula(monkeypatch, raw_table):
    """450 candidates <= 7 x 70 draws: the kernel path is taken, with the same ids as without it and the
    per-id formula's logits and gradients (query and embedding table, through the normalisation); with
    the raw table (ItemTable) the kernel normalises the gathered rows itself."""
    calls = []
    real = kernel_module.triton_gathered_dot
    monkeypatch.setattr(kernel_module, "triton_gathered_dot", lambda *args: calls.append(args[3:]) or real(*args))
    ids, logits, grads, expected, expected_grads = _negatives(True, monkeypatch, rows=7, num=70,
                                                              num_candidates=450, raw_table=raw_table)
    assert calls == [(100, 1e-6) if raw_table else (0, None)]
    assert _rel_err(logits, expected) <= FP32_TOL
    for got, want in zip(grads, expected_grads):
        assert _rel_err(got, want) <= FP32_TOL
    other_ids, other_logits, *_ = _negatives(False, monkeypatch, rows=7, num=70, num_candidates=450)
    assert len(calls) == 1  # the small-pool matmul path this time
    assert torch.equal(ids, other_ids)
    assert _rel_err(logits, other_logits) <= FP32_TOL


def test_negative_logits_keeps_per_id_path_when_draws_are_fewer_than_the_pool(monkeypatch):
    """L x num < pool: normalising the whole pool would cost more than the drawn rows; no kernel."""
    calls = []
    monkeypatch.setattr(kernel_module, "triton_gathered_dot", lambda *args: calls.append(1))
    ids, logits, _, expected, _ = _negatives(True, monkeypatch, rows=3, num=40, num_candidates=500)
    assert calls == [] and ids.shape == logits.shape == (3, 40)
    assert _rel_err(logits, expected) <= FP32_TOL
