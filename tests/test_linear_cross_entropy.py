"""Full-softmax cross-entropy (ops/linear_cross_entropy.py): the chunked path (its per-row step in
PyTorch or in the kernel of ops/triton/softmax_rows.py) and the fused Triton kernel
(ops/triton/linear_cross_entropy.py) against log_softmax of the dense logits.

Without CUDA the kernel runs under TRITON_INTERPRET=1 on CPU tensors (numpy, slow) with 16 x 16
tiles and 2 splits of the candidates, so tiny shapes span several tiles of queries and items
and both splits, ragged at the end; fp32 only (the interpreter's bf16 tl.dot returns garbage in
Triton 3.9). With CUDA the same properties run on larger shapes, D up to 256, bf16 too.

The ground truth is the dense formula in fp64 on the same inputs. Tolerances, as
max |got - want| / max |want| per tensor:
* fp32: 1e-5 (the issue's bar). Both paths accumulate in fp32 (the kernel's tl.dot with exact
  fp32 products: torch's default matmul precision "highest", which conftest restores); they
  differ from fp64 by fp32 rounding of sums over D and over the candidates. The per-row loss
  lse - z[target] cancels, so it is compared on the scale of the logits (|z| <= ||q|| / T).
* bf16 inputs (GPU): the loss and lse are fp32 but the products are of bf16-rounded values,
  which the fp64 formula sees exactly, so 1e-4; the gradients are rounded to bf16 and dz is
  rounded to bf16 before its matmul (2^-8 relative each): 2e-2.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

triton = pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ops.linear_cross_entropy as lce  # noqa: E402
import ops.triton.linear_cross_entropy as kernel_module  # noqa: E402
from ops.dispatch import notify_once  # noqa: E402
from ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402
from ops.triton.linear_cross_entropy import Blocks, Tiles, triton_linear_cross_entropy  # noqa: E402
from ops.triton.softmax_rows import launch_shape, triton_softmax_rows  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
FP32_TOL, BF16_TOL, BF16_GRAD_TOL = 1e-5, 1e-4, 2e-2
# On the GPU the kernel's exp is the hardware ex2 (about 2 ulp) and its sums run in another order:
# seen 1.3e-5 on an H200 (D = 256, unnormalised, all probabilities ~1e-35), so 5e-5 there.
KERNEL_TOL = 5e-5 if torch.cuda.is_available() else FP32_TOL
if CUDA:
    MAX_L, MAX_C, EXAMPLES, DIMS = 700, 3000, 12, [50, 64, 100, 256]
else:
    MAX_L, MAX_C, EXAMPLES, DIMS = 50, 90, 40, [5, 50, 70]
TEMPERATURES = st.floats(0.05, 1.0)


def _rel_err(got: torch.Tensor, want: torch.Tensor, scale: float = 0.0) -> float:
    if want.numel() == 0:
        return 0.0
    scale = max(scale, want.abs().max().item(), 1e-12)
    return (got.double() - want.double()).abs().max().item() / scale


def _inputs(rows: int, columns: int, dim: int, seed: int, dtype=torch.float32, ignored: float = 0.2,
            normalised: bool = True):
    """Queries and item vectors (L2-normalised, as the trainer's, unless told), targets with about
    `ignored` of the rows at -1 (padding), an upstream gradient per row."""
    gen = torch.Generator().manual_seed(seed)
    query, items = torch.randn(rows, dim, generator=gen), torch.randn(columns, dim, generator=gen)
    if normalised:
        query, items = F.normalize(query, dim=-1), F.normalize(items, dim=-1)
    targets = torch.randint(0, columns, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < ignored] = -1
    grad = torch.randn(rows, generator=gen)
    return (query.to(DEVICE, dtype).requires_grad_(), items.to(DEVICE, dtype).requires_grad_(),
            targets.to(DEVICE), grad.to(DEVICE))


def _dense(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, temperature: float,
           eps: Optional[float] = None):
    """fp64 leaves and the dense formula: (query, items, per-row losses (0 where ignored), lse, logits);
    with eps, of F.normalize(items, eps=eps)."""
    q = query.detach().double().requires_grad_()
    i = items.detach().double().requires_grad_()
    logits = q @ (i if eps is None else F.normalize(i, dim=-1, eps=eps)).T / temperature
    log_p = F.log_softmax(logits, dim=1).gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return q, i, torch.where(targets >= 0, -log_p, 0.0), logits.logsumexp(1), logits


def _check_kernel(query, items, targets, grad, temperature, blocks=None, tol=KERNEL_TOL, grad_tol=KERNEL_TOL,
                  eps=None):
    losses, lse = triton_linear_cross_entropy(query, items, targets, temperature, blocks, eps)
    q, i, want, want_lse, logits = _dense(query, items, targets, temperature, eps)
    assert losses.dtype == lse.dtype == torch.float32 and losses.shape == lse.shape == targets.shape
    logit_scale = logits.abs().max().item() if logits.numel() else 0.0
    assert _rel_err(losses, want, logit_scale) <= tol, ("loss", _rel_err(losses, want, logit_scale))
    assert _rel_err(lse, want_lse) <= tol, ("lse", _rel_err(lse, want_lse))
    assert not losses[targets < 0].any()
    got = torch.autograd.grad(losses, [query, items], grad)
    expected = torch.autograd.grad(want, [q, i], grad.double())
    for name, a, b, x in zip(("grad_query", "grad_items"), got, expected, (query, items)):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        # Measured against the gradient of O(1) logit gradients (the other operand / T, times dL):
        # p - onehot rounded in fp32 errs by ~2^-24 absolutely, which is a large relative error of
        # a gradient whose probabilities are all nearly 0 or 1 (seen 1.4e-5 with p = 0.9987).
        # With eps the scored rows are items / m, m = max(||item||, eps): dQ sees them, dItems is 1 / m larger.
        scored = items if eps is None else F.normalize(items.detach().float(), dim=-1, eps=eps)
        other = scored if name == "grad_query" else query
        unit = other.abs().max().item() * grad.abs().max().item() / temperature if other.numel() else 0.0
        if eps is not None and name == "grad_items":
            unit /= torch.linalg.vector_norm(items.detach().float(), dim=1).clamp_min(eps).min().item()
        assert _rel_err(a, b, unit) <= grad_tol, (name, _rel_err(a, b, unit))
    assert not got[0][targets < 0].any()  # ignored rows get no gradient


# --------------------------------------------------------------------------- #
# The kernel (interpreter on CPU)
# --------------------------------------------------------------------------- #


@settings(max_examples=EXAMPLES, deadline=None)
@given(rows=st.integers(1, MAX_L), columns=st.integers(1, MAX_C), dim=st.sampled_from(DIMS),
       temperature=TEMPERATURES, normalised=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_matches_dense_log_softmax(rows, columns, dim, temperature, normalised, seed):
    """Per-row losses, lse and both gradients (any upstream gradient per row): sizes off the tiles,
    padding rows, temperatures 0.05-1, normalised or raw vectors."""
    _check_kernel(*_inputs(rows, columns, dim, seed, normalised=normalised), temperature)


@settings(max_examples=EXAMPLES, deadline=None)
@given(rows=st.integers(1, MAX_L), columns=st.integers(1, MAX_C), dim=st.sampled_from(DIMS),
       temperature=TEMPERATURES, seed=st.integers(0, 2**16))
def test_kernel_normalises_raw_rows_as_f_normalize(rows, columns, dim, temperature, seed):
    """With eps the kernel scores F.normalize(items, eps=eps) and differentiates the raw rows: row norms
    from 0 to 3 with eps = 0.5, so that some rows sit on the clamp (no gradient through their norm)."""
    query, items, targets, grad = _inputs(rows, columns, dim, seed, normalised=False)
    gen = torch.Generator().manual_seed(seed + 1)
    norms = torch.rand(columns, 1, generator=gen) * 3.0
    norms[torch.rand(columns, generator=gen) < 0.1] = 0.0  # all-zero rows: normalised to 0, gradient x / eps
    raw = (F.normalize(items.detach().cpu(), dim=-1) * norms).to(DEVICE).requires_grad_()
    _check_kernel(query, raw, targets, grad, temperature, eps=0.5)


@settings(max_examples=EXAMPLES, deadline=None)
@given(splits=st.integers(1, 5), block_l=st.sampled_from([16, 32]), block_c=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**16))
def test_kernel_tiles_and_splits_do_not_change_the_result(splits, block_l, block_c, seed):
    """Any tiles and any number of candidate splits (more than there are tiles too): same results."""
    tiles = Tiles(block_l, block_c, 1 if not CUDA else 4, 1 if not CUDA else 2)
    query, items, targets, grad = _inputs(MAX_L // 2 + 3, MAX_C // 2 + 5, DIMS[-1], seed)
    _check_kernel(query, items, targets, grad, 0.05, Blocks(tiles, tiles, splits))


def test_kernel_ignores_padding_rows():
    """Rows with target -1 change neither the other rows' losses nor the items' gradient."""
    query, items, targets, grad = _inputs(29, 41, 50, seed=1, ignored=0.5)
    kept = targets >= 0
    losses, _ = triton_linear_cross_entropy(query, items, targets, 0.1)
    grad_query, grad_items = torch.autograd.grad(losses, [query, items], grad)
    sub_query = query.detach()[kept].requires_grad_()
    sub_losses, _ = triton_linear_cross_entropy(sub_query, items, targets[kept], 0.1)
    sub_grad_query, sub_grad_items = torch.autograd.grad(sub_losses, [sub_query, items], grad[kept])
    assert torch.equal(losses[~kept], torch.zeros_like(losses[~kept]))
    assert _rel_err(losses[kept], sub_losses) <= FP32_TOL
    assert not grad_query[~kept].any() and _rel_err(grad_query[kept], sub_grad_query) <= FP32_TOL
    assert _rel_err(grad_items, sub_grad_items) <= FP32_TOL


def _nan_padded(rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """A (rows, dim) view into a wider tensor whose other columns are NaN: reading past D poisons the result."""
    wide = torch.full((rows, dim + 20), float("nan"))
    wide[:, 3:3 + dim] = F.normalize(torch.randn(rows, dim, generator=gen), dim=-1)
    return wide.to(DEVICE)[:, 3:3 + dim]


def test_kernel_reads_strided_inputs_within_their_rows():
    """query and items are column slices of NaN-padded tensors (row stride != D): loads are masked to D."""
    gen = torch.Generator().manual_seed(2)
    query, items = _nan_padded(19, 50, gen).requires_grad_(), _nan_padded(37, 50, gen).requires_grad_()
    targets = torch.randint(-1, 37, (19,), generator=gen).to(DEVICE)
    _check_kernel(query, items, targets, torch.randn(19, generator=gen).to(DEVICE), 0.05)


@pytest.mark.parametrize("frozen", ["items", "query"])
def test_kernel_computes_only_the_wanted_gradient(frozen):
    query, items, targets, grad = _inputs(17, 33, 50, seed=3)
    inputs = {"query": query, "items": items}
    inputs[frozen] = inputs[frozen].detach()
    wanted = items if frozen == "query" else query
    losses, _ = triton_linear_cross_entropy(inputs["query"], inputs["items"], targets, 0.2)
    (got,) = torch.autograd.grad(losses, [wanted], grad)
    q, i, want, _, _ = _dense(query, items, targets, 0.2)
    (expected,) = torch.autograd.grad(want, [i if frozen == "query" else q], grad.double())
    assert _rel_err(got, expected) <= FP32_TOL


def test_kernel_without_queries():
    """L = 0: empty losses, zero gradients."""
    query, items, targets, _ = _inputs(0, 9, 50, seed=4)
    losses, lse = triton_linear_cross_entropy(query, items, targets, 0.05)
    assert losses.shape == lse.shape == (0,)
    grad_query, grad_items = torch.autograd.grad(losses.sum(), [query, items])
    assert grad_query.shape == (0, 50) and not grad_items.any()


def test_kernel_gradients_are_deterministic():
    query, items, targets, grad = _inputs(45, 67, 50, seed=5)
    runs = [torch.autograd.grad(triton_linear_cross_entropy(query, items, targets, 0.05)[0], [query, items], grad)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# --------------------------------------------------------------------------- #
# The public function and its PyTorch path
# --------------------------------------------------------------------------- #


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 60), columns=st.integers(1, 90), dim=st.sampled_from([5, 50, 64]),
       temperature=TEMPERATURES, chunk=st.sampled_from([1, 7, 1 << 20]), weighted=st.booleans(),
       rows_kernel=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_matches_dense_log_softmax(rows, columns, dim, temperature, chunk, weighted, rows_kernel, seed):
    """The chunked path in fp32, its per-row step in PyTorch or in the kernel of ops/triton/softmax_rows.py:
    weighted mean over the kept rows, both gradients; any chunking."""
    query, items, targets, _ = _inputs(rows, columns, dim, seed)
    weights = torch.rand(rows, generator=torch.Generator().manual_seed(seed)).to(DEVICE) if weighted else None
    rows_step = triton_softmax_rows if rows_kernel else lce.softmax_rows
    saved, lce.CHUNK_ELEMENTS = lce.CHUNK_ELEMENTS, chunk * columns  # forces chunks of `chunk` rows
    try:
        got = linear_cross_entropy_reference(query, items, targets, temperature, weights, rows_step)
        got_grads = torch.autograd.grad(got, [query, items])
    finally:
        lce.CHUNK_ELEMENTS = saved
    q, i, per_row, _, logits = _dense(query, items, targets, temperature)
    w = (targets >= 0).double() * (weights.double() if weighted else 1.0)
    want = (per_row * w).sum() / w.sum().clamp(min=1.0)
    assert got.dtype == torch.float32
    assert _rel_err(got, want, logits.abs().max().item()) <= FP32_TOL
    for a, b in zip(got_grads, torch.autograd.grad(want, [q, i])):
        assert _rel_err(a, b) <= FP32_TOL


@settings(max_examples=EXAMPLES, deadline=None)
@given(rows=st.integers(0, 40), columns=st.integers(1, 120), temperature=TEMPERATURES, need_grad=st.booleans(),
       spread=st.sampled_from([1.0, 30.0]), block=st.sampled_from([None, 16, 128]), seed=st.integers(0, 2**16))
def test_rows_kernel_matches_the_pytorch_rows_step(rows, columns, temperature, need_grad, spread, block, seed):
    """The per-row step alone: loss sum and logit gradient of the kernel against softmax_rows (fp64), on raw
    logits up to +-30 / T, with zero weights (ignored rows) among them; the gradient overwrites the logits.
    Blocks of 16 or 128 columns (one step for the shorter rows) or the device's default."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, columns, generator=gen) * spread).to(DEVICE)
    targets = torch.randint(0, columns, (rows,), generator=gen).to(DEVICE)
    scale = (torch.rand(rows, generator=gen) * (torch.rand(rows, generator=gen) < 0.8)).to(DEVICE)
    want_loss, want_grad = lce.softmax_rows(logits.double(), targets, scale.double(), 1 / temperature, True)
    buffer = logits.clone()
    loss, grad = triton_softmax_rows(buffer, targets, scale, 1 / temperature, need_grad, block)
    # z = logits / T is rounded to fp32 (as on any fp32 path): exp(z - lse) errs by ~|z| ulp relatively.
    z_max = logits.abs().max().item() / temperature if rows else 0.0
    tol = KERNEL_TOL + 4 * 2.0**-24 * z_max
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want_loss.item()) <= tol * max(1.0, scale.sum().item() * z_max)
    if need_grad:
        assert grad is buffer and _rel_err(grad, want_grad, (scale.max().item() if rows else 0) / temperature) <= tol
    else:
        assert grad is None and torch.equal(buffer, logits)


def test_rows_kernel_at_the_gpu_launch_of_wide_rows():
    """Rows wider than one step of the GPU launch for ml-20m's 26,744 candidates (the interpreter runs that block;
    the GPU its warps too): the walk over several 8,192-column steps against softmax_rows (fp64)."""
    block, num_warps = launch_shape(26744)
    assert block == 8192
    gen = torch.Generator().manual_seed(21)
    logits = (torch.randn(3, block + 811, generator=gen) * 5.0).to(DEVICE)
    targets = torch.tensor([0, block + 5, block - 1]).to(DEVICE)
    scale = torch.tensor([1.0, 0.5, 0.0]).to(DEVICE)
    want_loss, want_grad = lce.softmax_rows(logits.double(), targets, scale.double(), 20.0, True)
    loss, grad = triton_softmax_rows(logits.clone(), targets, scale, 20.0, True, block, num_warps)
    tol = KERNEL_TOL + 4 * 2.0**-24 * logits.abs().max().item() * 20.0  # as in the test above
    assert abs(loss.item() - want_loss.item()) <= tol * want_loss.abs().item()
    assert _rel_err(grad, want_grad, 20.0) <= tol


@pytest.mark.skipif(CUDA, reason="CPU dispatch")
def test_cpu_takes_the_pytorch_path_even_under_the_interpreter(monkeypatch):
    """Off CUDA linear_cross_entropy never runs the kernel (training tests would crawl in the interpreter)."""
    monkeypatch.setattr(kernel_module, "triton_linear_cross_entropy", lambda *args: pytest.fail("kernel called"))
    query, items, targets, _ = _inputs(7, 11, 5, seed=6)
    got = linear_cross_entropy(query, items, targets, 0.5)
    assert torch.equal(got, linear_cross_entropy_reference(query, items, targets, 0.5))


def test_kernel_problems_name_what_it_cannot_take():
    """fp64 and D > 256 go to the PyTorch path (with the notice on CUDA); fp32, bf16 and mixed do not."""
    def problem(dtype, dim, items_dtype=None):
        return lce.triton_problem(torch.empty(2, dim, dtype=dtype), torch.empty(3, dim, dtype=items_dtype or dtype))

    assert "float64" in problem(torch.float64, 64)
    assert "D <= 256" in problem(torch.float32, 257)
    assert problem(torch.float32, 256) is None and problem(torch.bfloat16, 50) is None
    assert problem(torch.bfloat16, 64, torch.float32) is None


# --------------------------------------------------------------------------- #
# GPU only: the dispatch, larger shapes, bf16
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_dispatch_takes_the_kernel_and_falls_back_with_one_notice(monkeypatch, capsys):
    query, items, targets, _ = _inputs(300, 1000, 64, seed=7)
    weights = torch.rand(300, device=DEVICE)
    calls = []
    real = kernel_module.triton_linear_cross_entropy
    monkeypatch.setattr(kernel_module, "triton_linear_cross_entropy",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fused = linear_cross_entropy(query, items, targets, 0.05, weights)
    reference = linear_cross_entropy_reference(query, items, targets, 0.05, weights)
    assert calls == [1] and _rel_err(fused, reference) <= FP32_TOL
    notify_once.cache_clear()
    monkeypatch.setattr(lce, "triton_problem", lambda q, i: "Triton is broken here")
    for _ in range(2):
        fallback = linear_cross_entropy(query, items, targets, 0.05, weights)
    assert calls == [1] and torch.equal(fallback, reference)
    assert capsys.readouterr().err.count("Triton is broken here") == 1


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_wide_fp32_rows_take_the_chunked_path_with_the_rows_kernel(monkeypatch):
    """fp32 D = 256 at an ml-20m step's shape (L2-normalised items by eps, several chunks): the chunked path
    with the per-row kernel, against the dense formula; the fused kernel is not called."""
    import ops.triton.softmax_rows as rows_module

    query, items, targets, _ = _inputs(3000, 26_744, 256, seed=11, normalised=False)
    weights = torch.rand(3000, device=DEVICE)
    monkeypatch.setattr(kernel_module, "triton_linear_cross_entropy", lambda *a, **kw: pytest.fail("fused called"))
    calls, real = [], rows_module.triton_softmax_rows
    monkeypatch.setattr(rows_module, "triton_softmax_rows", lambda *a: calls.append(1) or real(*a))
    got = linear_cross_entropy(query, items, targets, 0.05, weights, eps=1e-6)
    got_grads = torch.autograd.grad(got, [query, items])
    assert len(calls) == 2  # 3000 rows in chunks of CHUNK_ELEMENTS // 26,744 = 2,509
    q, i, per_row, _, logits = _dense(query, items, targets, 0.05, eps=1e-6)
    w = weights.double() * (targets >= 0)
    want = (per_row * w).sum() / w.sum()
    assert _rel_err(got, want, logits.abs().max().item()) <= KERNEL_TOL
    for a, b in zip(got_grads, torch.autograd.grad(want, [q, i])):
        assert _rel_err(a, b) <= KERNEL_TOL


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows,columns,dim", [(6400, 69_577, 64), (2000, 26_744, 256), (3000, 3706, 50)])
def test_kernel_at_training_shapes(rows, columns, dim):
    """Books (a tenth of its catalog), ml-20m and ml-1m shapes in fp32, temperature 0.05."""
    _check_kernel(*_inputs(rows, columns, dim, seed=8), 0.05)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_kernel_at_catalog_scale_normalising_raw_rows():
    """A Books-sized step (its catalog halved, still above CATALOG_SCALE: the tuned tiles) with the kernel
    normalising the raw rows, as FullSoftmaxLoss runs it."""
    query, items, targets, grad = _inputs(1952, 350_000, 64, seed=10, normalised=False)
    assert kernel_module.default_blocks(DEVICE, torch.float32, 64, 350_000) == kernel_module.CATALOG_FP32_BLOCKS
    _check_kernel(query, items, targets, grad, 0.05, eps=1e-6)


def test_catalog_blocks_only_where_they_were_timed():
    """fp32 rows of D <= 64 against >= CATALOG_SCALE candidates get the tuned tiles; the rest the defaults."""
    cuda, big = torch.device("cuda"), kernel_module.CATALOG_SCALE
    assert kernel_module.default_blocks(cuda, torch.float32, 64, big) == kernel_module.CATALOG_FP32_BLOCKS
    for dtype, dim, columns in [(torch.float32, 64, big - 1), (torch.float32, 50, 3706),
                                (torch.bfloat16, 64, big), (torch.float32, 100, big)]:
        assert kernel_module.default_blocks(cuda, dtype, dim, columns) != kernel_module.CATALOG_FP32_BLOCKS
    assert kernel_module.default_blocks(torch.device("cpu"), torch.float32, 64, big) == kernel_module.INTERPRETER_BLOCKS


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dim", [50, 64, 256])
def test_kernel_bf16_inputs(dim):
    """bf16 in: fp32 losses and lse as exact as the bf16 values allow, bf16 gradients."""
    _check_kernel(*_inputs(1500, 20_011, dim, seed=9, dtype=torch.bfloat16), 0.05, tol=BF16_TOL,
                  grad_tol=BF16_GRAD_TOL)
