"""Triton kernels for a fused linear cross-entropy: loss[l] = lse_c(z[l, c]) - z[l, target[l]],
z = query @ items.T * scale, without the (L, C) logits ever leaving the chip.

The full-softmax loss scores L ~ 6,400 queries against C = 695,762 candidates of
D = 64 on Amazon Books: the logits are 17.8 GB in fp32. The chunked PyTorch path
(ops/linear_cross_entropy.py) writes and reads every chunk of them in HBM
several times; here a tile of queries meets a tile of item vectors in
registers, and only per-row numbers are written.

Layout (kernels, then the host side and the autograd Function):

* `_forward_kernel`: grid (L tiles, splits). The C tiles are dealt to `splits`
  programs per query tile (a split-K over candidates), so a few dozen query
  tiles still fill the GPU. Each program walks its C tiles keeping a running
  max and sum of exp (online log-sum-exp, fp32) and the target's logit, and
  writes these three per row and split; the host combines the splits
  (a logsumexp over a (splits, L) array).
* `_grad_query_kernel`: grid (L tiles, splits). Recomputes the logits of its
  tiles, dz = g * (softmax - one_hot(target)) * scale, and accumulates
  dz @ items in registers; each split writes its partial dQ (fp32) and the
  host sums the splits in a fixed order.
* `_grad_items_kernel`: grid (C tiles,). Owns its item rows and walks every
  query tile, recomputing the same logits transposed and accumulating
  dz.T @ query. No atomics anywhere, so both gradients are deterministic;
  the price is that the backward computes the logits twice (5 matmuls of
  L x C x D per step in all instead of 3).
* Any D up to 256: BLOCK_D is the next power of two (at least 16, tl.dot's
  minimum) and the padding is masked to 0, which adds nothing to a dot product.
  C and L need no multiple of the tiles: masked columns get logit -inf.
  Rows with target < 0 are ignored: loss 0 and no gradient.
* L2-normalised items (the trainer's default) come as the raw table rows with
  an eps: the host computes m = max(||item||, eps) per row once (one read of
  the table), the kernels multiply each logit column by 1 / m, dQ takes the
  same factor with dz, and dItems turns its gradient g of the normalised row
  n into the raw row's, (g - n (n . g)) / m (g / m where the clamp holds), on
  the rows it owns. So F.normalize's copy of the table, its backward and
  their five or so passes over 178 MB (Books) disappear from the step.
* dtypes: fp32 or bf16/fp16 inputs (both cast to one dtype on the host).
  Matmuls accumulate in fp32; fp32 inputs follow torch's matmul precision
  (exact products under "highest", TF32 when the trainer enables it), as the
  attention kernel does. lse and the losses are fp32 whatever the inputs;
  with 16-bit inputs dz is rounded to their dtype before its matmul (as the
  attention backward rounds dS), and the gradients are returned in it.

No launch reads a value back to the host and every shape follows the inputs',
so the op can be captured in a CUDA graph. The module imports without a GPU;
on CPU tensors the kernels run under TRITON_INTERPRET=1 (tests) with 16 x 16
tiles and 2 splits, so that small test shapes span several tiles and splits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ops.dispatch import dot_precision

MAX_DIM = 256  # beyond it a 16-bit (64 x D) tile pair no longer fits shared memory with pipelining


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _load_rows(Base, offs, stride, offs_d, rows_ok, d_ok):
    """A (rows, BLOCK_D) tile of a row-major matrix; rows and dims past the end read 0."""
    return tl.load(Base + offs[:, None] * stride + offs_d[None, :], mask=rows_ok[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def _inverse_norms(Norms, offs_c, col_ok, NORMALIZE: tl.constexpr):
    """1 / max(||item||, eps) per column when the items are raw rows normalised here (F.normalize's division,
    folded into the logits), else 1."""
    if NORMALIZE:
        inv = 1.0 / tl.load(Norms + offs_c, mask=col_ok, other=1.0)
    else:
        inv = tl.full((offs_c.shape[0],), 1.0, dtype=tl.float32)
    return inv


@triton.jit
def _forward_kernel(
    Query, Items, Norms, Targets, PartMax, PartSum, PartTarget, L, C, tiles_per_split, scale,
    stride_q, stride_i,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, NORMALIZE: tl.constexpr,
):
    split = tl.program_id(1)
    offs_l = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_l < L
    d_ok = offs_d < D
    q = _load_rows(Query, offs_l, stride_q, offs_d, row_ok, d_ok)
    target = tl.load(Targets + offs_l, mask=row_ok, other=-1)
    run_max = tl.full((BLOCK_L,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_L,), dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(C, BLOCK_C))
    for tile in range(first, last):
        offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = offs_c < C
        items = _load_rows(Items, offs_c.to(tl.int64), stride_i, offs_d, col_ok, d_ok)
        inv = _inverse_norms(Norms, offs_c, col_ok, NORMALIZE)
        z = tl.dot(q, tl.trans(items), input_precision=DOT_PREC) * (inv * scale)[None, :]
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # Every tile has a real column, so new_max is finite and exp(-inf - new_max) = 0 on the first tile.
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        target_logit += tl.sum(tl.where(offs_c[None, :] == target[:, None], z, 0.0), axis=1)
    part = split * L + offs_l
    tl.store(PartMax + part, run_max, mask=row_ok)
    tl.store(PartSum + part, run_sum, mask=row_ok)
    tl.store(PartTarget + part, target_logit, mask=row_ok)


@triton.jit
def _logit_grads(z, offs_c, col_ok, target, lse, g_scale):
    """dz = g * scale * (softmax - one_hot(target)) of one (rows, columns) tile; masked columns 0.

    Works on either orientation: the per-row vectors come shaped to broadcast along the columns.
    """
    p = tl.exp(tl.where(col_ok, z, float("-inf")) - lse)  # masked before exp: a padded column's 0 may overflow
    return (p - tl.where(offs_c == target, 1.0, 0.0)) * g_scale


@triton.jit
def _grad_query_kernel(
    Query, Items, Norms, Targets, Lse, GradRows, PartGradQuery, L, C, tiles_per_split, scale,
    stride_q, stride_i,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, NORMALIZE: tl.constexpr,
):
    split = tl.program_id(1)
    offs_l = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_l < L
    d_ok = offs_d < D
    q = _load_rows(Query, offs_l, stride_q, offs_d, row_ok, d_ok)
    target = tl.load(Targets + offs_l, mask=row_ok, other=-1)
    lse = tl.load(Lse + offs_l, mask=row_ok, other=0.0)
    g_scale = tl.where(target >= 0, tl.load(GradRows + offs_l, mask=row_ok, other=0.0), 0.0) * scale
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(C, BLOCK_C))
    for tile in range(first, last):
        offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = offs_c < C
        items = _load_rows(Items, offs_c.to(tl.int64), stride_i, offs_d, col_ok, d_ok)
        inv = _inverse_norms(Norms, offs_c, col_ok, NORMALIZE)
        z = tl.dot(q, tl.trans(items), input_precision=DOT_PREC) * (inv * scale)[None, :]
        dz = _logit_grads(z, offs_c[None, :], col_ok[None, :], target[:, None], lse[:, None], g_scale[:, None])
        if NORMALIZE:  # d z / d q = item / max(||item||, eps): the norm goes with dz (its 1/T is in g_scale)
            dz = dz * inv[None, :]
        acc += tl.dot(dz.to(items.dtype), items, input_precision=DOT_PREC)
    part = (split * L + offs_l)[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(PartGradQuery + part, acc, mask=row_ok[:, None])


@triton.jit
def _grad_items_kernel(
    Query, Items, Norms, Targets, Lse, GradRows, GradItems, L, C, scale, eps,
    stride_q, stride_i, stride_gi,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, NORMALIZE: tl.constexpr,
):
    offs_c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_c < C
    d_ok = offs_d < D
    items = _load_rows(Items, offs_c, stride_i, offs_d, col_ok, d_ok)
    inv = _inverse_norms(Norms, offs_c, col_ok, NORMALIZE)
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = (start + tl.arange(0, BLOCK_L)).to(tl.int64)
        row_ok = offs_l < L
        q = _load_rows(Query, offs_l, stride_q, offs_d, row_ok, d_ok)
        target = tl.load(Targets + offs_l, mask=row_ok, other=-1)
        lse = tl.load(Lse + offs_l, mask=row_ok, other=0.0)
        g_scale = tl.where(target >= 0, tl.load(GradRows + offs_l, mask=row_ok, other=0.0), 0.0) * scale
        z = tl.dot(items, tl.trans(q), input_precision=DOT_PREC) * (inv * scale)[:, None]  # (columns, rows)
        dz = _logit_grads(z, offs_c[:, None], col_ok[:, None], target[None, :], lse[None, :], g_scale[None, :])
        acc += tl.dot(dz.to(q.dtype), q, input_precision=DOT_PREC)
    if NORMALIZE:
        # acc is the gradient of n = x / m, m = max(||x||, eps): d x = (acc - n (n . acc)) / m where
        # ||x|| > eps (m = ||x||), acc / m where the clamp holds m at eps (no gradient through it).
        norm = tl.load(Norms + offs_c, mask=col_ok, other=1.0)
        n = items.to(tl.float32) * inv[:, None]
        radial = tl.where(norm > eps, tl.sum(n * acc, axis=1), 0.0)
        acc = (acc - n * radial[:, None]) * inv[:, None]
    tl.store(GradItems + offs_c[:, None] * stride_gi + offs_d[None, :], acc.to(GradItems.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------- #
# Host side: tiles, launches, autograd
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's launch: rows of queries and of items per tile, warps, software-pipeline stages."""

    block_l: int
    block_c: int
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The three kernels' tiles, and the C splits of the forward and dQ kernels (None: enough to fill
    the GPU). Every field is a parameter so that benchmarks/linear_cross_entropy.py --blocks can sweep them."""

    forward: Tiles
    grad_query: Tiles
    grad_items: Tiles
    splits: Optional[int] = None


INTERPRETER_BLOCKS = Blocks(Tiles(16, 16, 1, 1), Tiles(16, 16, 1, 1), Tiles(16, 16, 1, 1), splits=2)


# fp32 rows of D <= 64 against a catalog of at least CATALOG_SCALE candidates: the tiles timed fastest at the
# Books shapes on an H200 (benchmarks/linear_cross_entropy.py --blocks, 695,762 candidates, D = 64, at both 6,400
# and 1,952 queries: results/linear_cross_entropy_blocks_books{,_step}_fp32_h200.jsonl), forward + backward
# 9.27 -> 6.87 ms at the trainer's 1,952. Smaller catalogs (ml-1m's 3,706) keep the starting points.
CATALOG_SCALE = 1 << 17
CATALOG_FP32_BLOCKS = Blocks(Tiles(128, 64, 8, 3), Tiles(128, 64, 8, 3), Tiles(32, 128, 4, 3))


def default_blocks(device: torch.device, dtype: torch.dtype, dim: int, columns: int = 0) -> Blocks:
    """Tiles for `columns` candidates of width `dim`: CATALOG_FP32_BLOCKS where they were timed, else
    untuned starting points by bytes per padded row: 64-query x 128-item tiles for short rows, fewer rows
    per tile (and more warps for the (item rows, D) fp32 accumulator of dItems) as rows widen, so that a
    pipelined tile pair stays within shared memory (benchmarks/linear_cross_entropy.py --blocks tunes them)."""
    if device.type != "cuda":
        return INTERPRETER_BLOCKS
    row_bytes = _block_d(dim) * dtype.itemsize
    if dtype == torch.float32 and row_bytes <= 256 and columns >= CATALOG_SCALE:
        return CATALOG_FP32_BLOCKS
    if row_bytes <= 256:  # fp32 D <= 64, bf16 D <= 128
        tiles = Tiles(64, 128, 4, 3)
    elif row_bytes <= 512:  # fp32 D <= 128, bf16 D <= 256
        tiles = Tiles(64, 64, 4, 2)
    else:  # fp32 D <= 256
        tiles = Tiles(32, 64, 8, 2)
    return Blocks(tiles, tiles, tiles)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _split(device: torch.device, rows: int, block_l: int, columns: int, block_c: int,
           splits: Optional[int]) -> Tuple[int, int]:
    """(splits, C tiles per split): C tiles dealt to the programs of each query tile, none left empty."""
    c_tiles = triton.cdiv(columns, block_c)
    if splits is None:  # ~4 programs per SM: enough to hide one program's tail (2 in the interpreter)
        programs = 4 * _sm_count(_device_index(device)) if device.type == "cuda" else 2
        splits = triton.cdiv(programs, triton.cdiv(rows, block_l))
    per_split = triton.cdiv(c_tiles, max(1, min(splits, c_tiles)))
    return triton.cdiv(c_tiles, per_split), per_split


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _forward(query: torch.Tensor, items: torch.Tensor, norms: Optional[torch.Tensor], targets: torch.Tensor,
             scale: float, blocks: Blocks) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses, lse), both (L,) fp32."""
    rows, dim = query.shape
    t = blocks.forward
    splits, per_split = _split(query.device, rows, t.block_l, items.shape[0], t.block_c, blocks.splits)
    part_max, part_sum, part_target = torch.empty((3, splits, rows), dtype=torch.float32, device=query.device)
    _forward_kernel[(triton.cdiv(rows, t.block_l), splits)](
        query, items, _or(norms, items), targets, part_max, part_sum, part_target, rows, items.shape[0], per_split, scale,
        query.stride(0), items.stride(0),
        D=dim, BLOCK_L=t.block_l, BLOCK_C=t.block_c, BLOCK_D=_block_d(dim), DOT_PREC=dot_precision(query.dtype),
        NORMALIZE=norms is not None, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    lse = torch.logsumexp(part_max + part_sum.log(), dim=0)  # every split's sum is >= 1 (its max's term)
    losses = torch.where(targets >= 0, lse - part_target.sum(0), 0.0)
    return losses, lse


def _grad_query(grad_rows: torch.Tensor, query: torch.Tensor, items: torch.Tensor, norms: Optional[torch.Tensor],
                eps: float, targets: torch.Tensor, lse: torch.Tensor, scale: float, blocks: Blocks) -> torch.Tensor:
    rows, dim = query.shape
    t = blocks.grad_query
    splits, per_split = _split(query.device, rows, t.block_l, items.shape[0], t.block_c, blocks.splits)
    block_d = _block_d(dim)
    partial = torch.empty((splits, rows, block_d), dtype=torch.float32, device=query.device)
    _grad_query_kernel[(triton.cdiv(rows, t.block_l), splits)](
        query, items, _or(norms, items), targets, lse, grad_rows, partial, rows, items.shape[0], per_split, scale,
        query.stride(0), items.stride(0),
        D=dim, BLOCK_L=t.block_l, BLOCK_C=t.block_c, BLOCK_D=block_d, DOT_PREC=dot_precision(query.dtype),
        NORMALIZE=norms is not None, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return partial[:, :, :dim].sum(0).to(query.dtype)


def _grad_items(grad_rows: torch.Tensor, query: torch.Tensor, items: torch.Tensor, norms: Optional[torch.Tensor],
                eps: float, targets: torch.Tensor, lse: torch.Tensor, scale: float, blocks: Blocks) -> torch.Tensor:
    rows, dim = query.shape
    t = blocks.grad_items
    grad_items = torch.empty_like(items)
    _grad_items_kernel[(triton.cdiv(items.shape[0], t.block_c),)](
        query, items, _or(norms, items), targets, lse, grad_rows, grad_items, rows, items.shape[0], scale, eps,
        query.stride(0), items.stride(0), grad_items.stride(0),
        D=dim, BLOCK_L=t.block_l, BLOCK_C=t.block_c, BLOCK_D=_block_d(dim), DOT_PREC=dot_precision(query.dtype),
        NORMALIZE=norms is not None, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return grad_items


def _or(x: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    return dummy if x is None else x  # an unused pointer argument (its kernel branch is compiled out)


def _norms(items: torch.Tensor, eps: Optional[float]) -> Optional[torch.Tensor]:
    """max(||item||, eps) per row in fp32, F.normalize's denominator (None: no normalisation)."""
    return None if eps is None else torch.linalg.vector_norm(items.float(), dim=1).clamp_min(eps)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, scale: float,
                blocks: Blocks, eps: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
        norms = _norms(items, eps)
        losses, lse = _forward(query, items, norms, targets, scale, blocks)
        ctx.save_for_backward(query, items, norms, targets, lse)
        ctx.scale, ctx.blocks, ctx.eps = scale, blocks, eps
        ctx.mark_non_differentiable(lse)
        return losses, lse

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, _grad_lse: torch.Tensor):
        query, items, norms, targets, lse = ctx.saved_tensors
        grad_rows = grad_rows.float().contiguous()
        args = (grad_rows, query, items, norms, ctx.eps or 0.0, targets, lse, ctx.scale, ctx.blocks)
        grad_query = _grad_query(*args) if ctx.needs_input_grad[0] else None
        grad_items = _grad_items(*args) if ctx.needs_input_grad[1] else None
        return grad_query, grad_items, None, None, None, None


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One dtype for both matmul operands; the kernels take a row stride but need unit stride along D."""
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_linear_cross_entropy(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, temperature: float,
                                blocks: Optional[Blocks] = None,
                                eps: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses, lse) of logits query (L, D) @ items (C, D).T / temperature; targets (L,) columns.

    With eps, the logits are those of F.normalize(items, dim=1, eps=eps): the kernels divide each column
    by its row's norm and return the gradient of the raw rows, so that no normalised copy of the items
    is written, read or differentiated.

    Both outputs are (L,) fp32; the losses are lse - the target's logit, 0 where target < 0 (ignored rows,
    which get no gradient either), differentiable in query and items (lse is not). Targets must lie
    below C (unchecked: checking would sync with the GPU). D <= 256, C >= 1; fp32 or 16-bit inputs
    (a mixed pair is computed in the wider dtype).
    """
    if query.dim() != 2 or items.dim() != 2 or targets.shape != query.shape[:1] or query.shape[1] != items.shape[1]:
        raise ValueError(f"expected query (L, D), items (C, D), targets (L,); got {tuple(query.shape)}, "
                         f"{tuple(items.shape)}, {tuple(targets.shape)}")
    if items.shape[0] == 0 or not 1 <= query.shape[1] <= MAX_DIM:
        raise ValueError(f"needs C >= 1 candidates and 1 <= D <= {MAX_DIM}; got items {tuple(items.shape)}")
    dtype = torch.promote_types(query.dtype, items.dtype)
    if query.shape[0] == 0:
        empty = query.new_zeros((0,), dtype=torch.float32)
        return (query.sum() + items.sum()).float() * empty, empty  # keeps the graph: zero gradients
    blocks = blocks or default_blocks(query.device, dtype, query.shape[1], items.shape[0])
    return _LinearCrossEntropyFunction.apply(_prepare(query, dtype), _prepare(items, dtype),
                                             targets.contiguous(), 1.0 / temperature, blocks, eps)
