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
  max and sum of exp over the columns but the target (online log-sum-exp,
  fp32), the target's logit, and, when the queries need a gradient, the query
  gradient's direction the way flash attention accumulates its output: the
  exp-weighted sum of the item rows of the same columns, rescaled at each new
  max. The host combines the splits (weights exp(split max - row max)), adds
  the target's term, and forms lse and d loss / d query = g * scale *
  (sum_{c != t} e_c item_c - (sum_{c != t} e_c) item_t) / sum_c e_c, which
  needs no lse in advance and no second walk over the candidates; the target
  enters as the others' share, so p_t - 1 never cancels near p_t = 1.
  The walk is the step's cost, so each logit gets as few operations as
  possible: a max, a subtraction and a multiply (the scale and log2(e) in one
  constant) before exp2, one int32 compare against the target, two sums; only
  the last, partial tile masks its columns.
* `_grad_items_kernel`: grid (C tiles,). Owns its item rows and walks every
  query tile, recomputing the logits transposed, dz = g * (softmax -
  one_hot(target)) * scale, and accumulating dz.T @ query (no column mask:
  a padded column only reaches its own row of the accumulator). No atomics
  anywhere, so both gradients are deterministic; 4 matmuls of L x C x D per
  step in all (the logits twice, one per gradient).
* Any D up to 256: BLOCK_D is the next power of two (at least 16, tl.dot's
  minimum) and the padding is masked to 0, which adds nothing to a dot product.
  C and L need no multiple of the tiles: masked columns get logit -inf.
  Logits are subtracted from the max (or lse) before they are scaled: near
  the max the difference is exact, so large logits keep their probabilities'
  bits; the host's per-row combine runs in fp64 (L numbers) for the same reason.
  Rows with target < 0 are ignored: loss 0 and no gradient.
* L2-normalised items (the trainer's default) come as the raw table rows with
  an eps: the forward normalises them once (a read and a write of the table,
  keeping the fp32 norms m = max(||item||, eps)), and dItems turns the
  gradient g of each normalised row n into the raw row's, (g - n (n . g)) / m
  (g / m where the clamp holds), on the rows it owns: F.normalize's autograd
  backward, several more passes over the table (178 MB on Books), is gone.
  (Folding 1 / m into the logits instead, with no normalised copy, was slower:
  the per-tile load of the norms is not software-pipelined like the items'.)
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


LOG2E = tl.constexpr(1.4426950408889634)  # the kernels exponentiate with exp2, log2(e) folded into the scale


@triton.jit
def _load_rows(Base, offs, stride, offs_d, rows_ok, d_ok, MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile of a row-major matrix; dims past D (and rows past the end, with MASK_ROWS)
    read 0."""
    mask = (rows_ok[:, None] & d_ok[None, :]) if MASK_ROWS else d_ok[None, :]
    return tl.load(Base + offs[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _forward_tile(q, Items, stride_i, tile, target, offs_d, d_ok, run_max, other_sum, target_logit, acc, C, scale_log2,
                  BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr, GRAD_QUERY: tl.constexpr, TAIL: tl.constexpr):
    """One C tile of the forward walk: the running max of the raw dot products, the sum of exp over the
    columns but the target's, the target's dot product, and (GRAD_QUERY) the other columns' exp-weighted
    item rows, rescaled at every new max. Only the TAIL tile (the last, partial one) masks columns."""
    offs = tl.arange(0, BLOCK_C)
    first_col = tile * BLOCK_C
    col_ok = first_col + offs < C
    items = _load_rows(Items, (first_col + offs).to(tl.int64), stride_i, offs_d, col_ok, d_ok, TAIL)
    z = tl.dot(q, tl.trans(items), input_precision=DOT_PREC)  # unscaled: scale > 0 keeps the max's place
    if TAIL:
        z = tl.where(col_ok[None, :], z, float("-inf"))
    # Every tile has a real column, so new_max is finite and alpha = exp2(-inf) = 0 on the first tile.
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    # Subtracted before scaling: near the max the difference is exact, so large logits lose no bits.
    alpha = tl.exp2((run_max - new_max) * scale_log2)
    e = tl.exp2((z - new_max[:, None]) * scale_log2)
    # The target's term is added on the host from its logit, taken from these products so that lse and
    # the loss agree to the last bit with the probabilities dItems recomputes (TF32 included).
    is_target = offs[None, :] == (target - first_col)[:, None]
    target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
    e = tl.where(is_target, 0.0, e)
    other_sum = other_sum * alpha + tl.sum(e, axis=1)
    if GRAD_QUERY:  # online, as attention accumulates its output
        acc = acc * alpha[:, None] + tl.dot(e.to(items.dtype), items, input_precision=DOT_PREC)
    return new_max, other_sum, target_logit, acc


@triton.jit
def _forward_kernel(
    Query, Items, Targets, PartMax, PartOther, PartTarget, PartAcc, L, C, tiles_per_split, scale_log2,
    stride_q, stride_i,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, GRAD_QUERY: tl.constexpr,
):
    split = tl.program_id(1)
    offs_l = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_l < L
    d_ok = offs_d < D
    q = _load_rows(Query, offs_l, stride_q, offs_d, row_ok, d_ok, True)
    target = tl.load(Targets + offs_l, mask=row_ok, other=-1).to(tl.int32)  # C < 2^31
    run_max = tl.full((BLOCK_L,), float("-inf"), dtype=tl.float32)
    other_sum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_L,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    first = split * tiles_per_split
    stop = tl.minimum(first + tiles_per_split, tl.cdiv(C, BLOCK_C))
    full = C // BLOCK_C
    for tile in range(first, tl.minimum(stop, full)):
        run_max, other_sum, target_logit, acc = _forward_tile(
            q, Items, stride_i, tile, target, offs_d, d_ok, run_max, other_sum, target_logit, acc, C, scale_log2,
            BLOCK_C, DOT_PREC, GRAD_QUERY, False)
    if stop > full:  # this split holds the partial last tile
        run_max, other_sum, target_logit, acc = _forward_tile(
            q, Items, stride_i, full, target, offs_d, d_ok, run_max, other_sum, target_logit, acc, C, scale_log2,
            BLOCK_C, DOT_PREC, GRAD_QUERY, True)
    part = split * L + offs_l
    tl.store(PartMax + part, run_max, mask=row_ok)
    tl.store(PartOther + part, other_sum, mask=row_ok)
    tl.store(PartTarget + part, target_logit, mask=row_ok)
    if GRAD_QUERY:
        tl.store(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _grad_items_kernel(
    Query, Items, Norms, Targets, LseRaw, GradRows, GradItems, L, C, scale, eps,
    stride_q, stride_i, stride_gi,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, NORMALIZE: tl.constexpr,
):
    first_col = tl.program_id(0) * BLOCK_C
    offs = tl.arange(0, BLOCK_C)
    offs_c = (first_col + offs).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_c < C
    d_ok = offs_d < D
    items = _load_rows(Items, offs_c, stride_i, offs_d, col_ok, d_ok, True)
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    scale_log2 = scale * LOG2E
    for start in range(0, L, BLOCK_L):
        offs_l = (start + tl.arange(0, BLOCK_L)).to(tl.int64)
        row_ok = offs_l < L
        q = _load_rows(Query, offs_l, stride_q, offs_d, row_ok, d_ok, True)
        target = tl.load(Targets + offs_l, mask=row_ok, other=-1).to(tl.int32)
        g_scale = tl.where(target >= 0, tl.load(GradRows + offs_l, mask=row_ok, other=0.0), 0.0) * scale
        target -= first_col  # its place in this tile
        lse_raw = tl.load(LseRaw + offs_l, mask=row_ok, other=0.0)
        z = tl.dot(items, tl.trans(q), input_precision=DOT_PREC)  # (columns, rows), unscaled
        # No column mask: a column past C only ever reaches its own row of acc, which is never stored
        # (and a padded row of queries has g_scale 0).
        p = tl.exp2((z - lse_raw[None, :]) * scale_log2)  # lse in the products' units: see _forward_tile
        dz = tl.where(offs[:, None] == target[None, :], p - 1.0, p) * g_scale[None, :]
        acc += tl.dot(dz.to(q.dtype), q, input_precision=DOT_PREC)
    if NORMALIZE:
        # The items are n = x / m, m = max(||x||, eps), and acc is d n: the raw rows' gradient is
        # d x = (acc - n (n . acc)) / m where ||x|| > eps (m = ||x||), acc / m where the clamp holds m at
        # eps (no gradient through it).
        norm = tl.load(Norms + offs_c, mask=col_ok, other=1.0)
        n = items.to(tl.float32)
        radial = tl.where(norm > eps, tl.sum(n * acc, axis=1), 0.0)
        acc = (acc - n * radial[:, None]) / norm[:, None]
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
    """The two kernels' tiles, and the C splits of the forward (None: enough to fill the GPU). Every field
    is a parameter so that benchmarks/linear_cross_entropy.py --blocks can sweep them."""

    forward: Tiles
    grad_items: Tiles
    splits: Optional[int] = None


INTERPRETER_BLOCKS = Blocks(Tiles(16, 16, 1, 1), Tiles(16, 16, 1, 1), splits=2)


# fp32 rows of D <= 64 against a catalog of at least CATALOG_SCALE candidates: the tiles timed fastest at the
# Books step (benchmarks/linear_cross_entropy.py --blocks, 695,762 candidates, D = 64), re-swept on an H100 after
# dQ moved into the forward (results/linear_cross_entropy_blocks_books_step_fp32_h100.jsonl): forward 3.78 ->
# 3.21 ms with 4 warps instead of 8, dItems 2.81 -> 2.36 ms with 64 x 256 tiles. Smaller catalogs (ml-1m's
# 3,706) keep the starting points.
CATALOG_SCALE = 1 << 17
CATALOG_FP32_BLOCKS = Blocks(Tiles(128, 64, 4, 3), Tiles(64, 256, 8, 2))


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
    return Blocks(tiles, tiles)


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


def _forward(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, scale: float, blocks: Blocks,
             grad_query: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(per-row losses, lse, lse / scale (dItems' units), and with grad_query d loss_l / d query_l / scale,
    (L, D)), all fp32."""
    rows, dim = query.shape
    t = blocks.forward
    splits, per_split = _split(query.device, rows, t.block_l, items.shape[0], t.block_c, blocks.splits)
    block_d = _block_d(dim)
    f32 = dict(dtype=torch.float32, device=query.device)
    part_max, part_other, part_target = torch.empty((3, splits, rows), **f32)
    part_acc = torch.empty((splits, rows, block_d) if grad_query else (1,), **f32)
    _forward_kernel[(triton.cdiv(rows, t.block_l), splits)](
        query, items, targets, part_max, part_other, part_target, part_acc, rows, items.shape[0], per_split,
        scale * LOG2E.value, query.stride(0), items.stride(0),
        D=dim, BLOCK_L=t.block_l, BLOCK_C=t.block_c, BLOCK_D=block_d, DOT_PREC=dot_precision(query.dtype),
        GRAD_QUERY=grad_query, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    # Combine the splits, each one's sum relative to its own max (finite: every split has a column), and add
    # the target's term. The row numbers are few: fp64 keeps lse to one rounding, also in the raw products'
    # units that dItems subtracts it in.
    kept = targets >= 0
    target_raw = part_target.sum(0)
    row_max = part_max.max(0).values
    weight = torch.exp2((part_max - row_max) * (scale * LOG2E.value))
    other_total = (weight * part_other).sum(0)
    total = other_total + torch.where(kept, torch.exp((target_raw - row_max) * scale), 0.0)
    lse_raw = row_max.double() + total.double().log() / scale
    losses = torch.where(kept, (lse_raw - target_raw) * scale, 0.0).float()
    lse = (lse_raw * scale).float()
    direction = None
    if grad_query:
        # sum_c (softmax_c - onehot_c) item_c = (sum_{c != t} e_c item_c - (sum_{c != t} e_c) item_t) / sum_c e_c:
        # the target's 1 - p_t as the others' share, without the cancellation of p_t - 1 near p_t = 1.
        others = (weight[:, :, None] * part_acc).sum(0)[:, :dim]
        target_items = items[targets.clamp(min=0)].float()
        direction = (others - other_total[:, None] * target_items) / total[:, None]
        direction = torch.where(kept[:, None], direction, 0.0)
    return losses, lse, lse_raw.float(), direction


def _grad_items(grad_rows: torch.Tensor, query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                lse_raw: torch.Tensor, scale: float, blocks: Blocks, norms: Optional[torch.Tensor] = None,
                eps: float = 0.0) -> torch.Tensor:
    """d loss / d items; with norms (items then the normalised rows x / m, norms m = max(||x||, eps)),
    d loss / d x of the raw rows."""
    rows, dim = query.shape
    t = blocks.grad_items
    grad_items = torch.empty_like(items)
    _grad_items_kernel[(triton.cdiv(items.shape[0], t.block_c),)](
        query, items, _or(norms, items), targets, lse_raw, grad_rows, grad_items, rows, items.shape[0], scale, eps,
        query.stride(0), items.stride(0), grad_items.stride(0),
        D=dim, BLOCK_L=t.block_l, BLOCK_C=t.block_c, BLOCK_D=_block_d(dim), DOT_PREC=dot_precision(query.dtype),
        NORMALIZE=norms is not None, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return grad_items


def _or(x: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    return dummy if x is None else x  # an unused pointer argument (its kernel branch is compiled out)


def _normalize(items: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """F.normalize(items, dim=1, eps=eps) in items' dtype, and its fp32 denominators max(||item||, eps)."""
    norms = torch.linalg.vector_norm(items.float(), dim=1).clamp_min(eps)
    return (items.float() / norms[:, None]).to(items.dtype), norms


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, scale: float,
                blocks: Blocks, eps: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
        norms = None
        if eps is not None:  # scored: the normalised rows; the backward turns their gradient into the raw rows'
            items, norms = _normalize(items, eps)
        losses, lse, lse_raw, direction = _forward(query, items, targets, scale, blocks,
                                                    grad_query=ctx.needs_input_grad[0])
        ctx.save_for_backward(query, items, norms, targets, lse_raw, direction)
        ctx.scale, ctx.blocks, ctx.eps = scale, blocks, eps
        ctx.mark_non_differentiable(lse)
        return losses, lse

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, _grad_lse: torch.Tensor):
        query, items, norms, targets, lse_raw, direction = ctx.saved_tensors
        grad_rows = grad_rows.float().contiguous()
        grad_query = None
        if ctx.needs_input_grad[0]:  # computed in the forward, up to the upstream gradient of each row
            grad_query = ((grad_rows * ctx.scale)[:, None] * direction).to(query.dtype)
        grad_items = None
        if ctx.needs_input_grad[1]:
            grad_items = _grad_items(grad_rows, query, items, targets, lse_raw, ctx.scale, ctx.blocks, norms,
                                     ctx.eps or 0.0)
        return grad_query, grad_items, None, None, None, None


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One dtype for both matmul operands; the kernels take a row stride but need unit stride along D."""
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_linear_cross_entropy(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, temperature: float,
                                blocks: Optional[Blocks] = None,
                                eps: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses, lse) of logits query (L, D) @ items (C, D).T / temperature; targets (L,) columns.

    With eps, the logits are those of F.normalize(items, dim=1, eps=eps): the rows are normalised once
    here and the dItems kernel returns the gradient of the raw rows, so that autograd never differentiates
    the normalisation (several more passes over the items).

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
