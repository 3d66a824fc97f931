"""Triton kernels for out[l, r] = query[l] . table[columns[l, r]], forward and backward.

Computes `ops.gathered_dot.gathered_dot_reference` without the (L, R, D)
tensor of gathered rows: every program gathers its table rows by index
straight into registers, multiplies them with its queries and reduces over D.
The sampled-softmax loss scores L ~ 6,400 queries against R = 512 negatives of
D = 64 each (Amazon Books): the reference's gathered tensor would be 840 MB in
fp32, written once and read back by the forward, and its backward would
scatter the same amount into the embedding table.

Layout (kernels, then the autograd Function, then the public function):

* `_gathered_dot_fwd_kernel`: grid (L blocks, R blocks). A program loads its
  (BLOCK_L, BLOCK_R) column indices, then walks D in chunks of BLOCK_D: the
  queries' chunk (BLOCK_L, BLOCK_D) and the gathered rows' chunk
  (BLOCK_L, BLOCK_R, BLOCK_D), accumulating their products in fp32.
* `_gathered_dot_bwd_kernel`: grid (L blocks,). A program owns its queries'
  rows, so it walks all of R itself and grad_query needs no atomics (and is
  deterministic): per D chunk, grad_query[l] = sum_r g[l, r] table[c[l, r]].
  In the same walk it adds g[l, r] * query[l] to row c[l, r] of the table's
  gradient with fp32 atomics (relaxed: only the final sums matter), since any
  program may hit any row, and one row may appear several times in a tile.
  The atomics make grad_table non-deterministic in the last bits (the order of
  the additions changes from run to run); the buffer is fp32 whatever the
  table's dtype and is cast to it at the end.
* Any D (1, 50, 64, 256, ...): BLOCK_D is a power of two and the last chunk is
  masked; R needs no multiple of BLOCK_R either (masked).
* Inputs may be fp32 or bf16 (also mixed, as under autocast): every load is
  converted to fp32, so products and sums are fp32 (no tensor cores: each
  query meets each row once, so there is no matrix product to feed them).
  The output is fp32; grad_query has query's dtype, grad_table table's.

Block sizes: the gathered tile (BLOCK_L, BLOCK_R, BLOCK_D) lives in
registers. 8 x 16 x 64 = 8,192 fp32 values is 64 per thread at 4 warps,
which leaves room for the query chunk, the products and the addresses without
spilling, while a chunk of 64 fp32 (256 contiguous bytes, 128 in bf16) per
gathered row keeps each row's load coalesced. They are modest choices, not
tuned (benchmarks/gathered_dot.py times the kernel at the training shapes).

No launch reads a value back to the host and every shape follows the inputs'
shapes, so the op can be captured in a CUDA graph. The module imports without
a GPU; on CPU tensors the kernels run under TRITON_INTERPRET=1 (tests) with
blocks of 4 x 8 x 16, so that small test shapes span several blocks of L, R
and D.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _gathered_dot_fwd_kernel(
    Query, Table, Columns, Out, Norms, L, R, row_offset, eps,
    stride_q, stride_t, stride_c, stride_o,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    offs_l = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_l < L
    pair_ok = row_ok[:, None] & (offs_r < R)[None, :]
    cols = tl.load(Columns + offs_l[:, None] * stride_c + offs_r[None, :], mask=pair_ok, other=0).to(tl.int64)
    cols += row_offset
    acc = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
    for start_d in range(0, D, BLOCK_D):
        d = start_d + offs_d
        d_ok = d < D
        q = tl.load(Query + offs_l[:, None] * stride_q + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        rows = tl.load(Table + cols[:, :, None] * stride_t + d[None, None, :],
                       mask=pair_ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(q[:, None, :] * rows, axis=2)
        if NORMALIZE:
            sumsq += tl.sum(rows * rows, axis=2)
    if NORMALIZE:  # F.normalize: row / max(||row||, eps); the norms are kept for the backward
        norm = tl.maximum(tl.sqrt(sumsq), eps)
        acc = acc / norm
        tl.store(Norms + offs_l[:, None] * stride_o + offs_r[None, :], norm, mask=pair_ok)
    tl.store(Out + offs_l[:, None] * stride_o + offs_r[None, :], acc, mask=pair_ok)


@triton.jit
def _gathered_dot_bwd_kernel(
    Query, Table, Columns, GradOut, Out, Norms, GradQuery, GradTable, L, R, row_offset, eps,
    stride_q, stride_t, stride_c, stride_g, stride_o, stride_gq, stride_gt,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    QUERY_GRAD: tl.constexpr, TABLE_GRAD: tl.constexpr, NORMALIZE: tl.constexpr,
):
    offs_l = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_l < L
    for start_d in range(0, D, BLOCK_D):
        d = start_d + offs_d
        d_ok = d < D
        q = tl.load(Query + offs_l[:, None] * stride_q + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        grad_q = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for start_r in range(0, R, BLOCK_R):
            offs_r = start_r + tl.arange(0, BLOCK_R)
            pair_ok = row_ok[:, None] & (offs_r < R)[None, :]
            cols = tl.load(Columns + offs_l[:, None] * stride_c + offs_r[None, :], mask=pair_ok,
                           other=0).to(tl.int64)
            cols += row_offset
            g = tl.load(GradOut + offs_l[:, None] * stride_g + offs_r[None, :], mask=pair_ok,
                        other=0.0).to(tl.float32)
            tile_ok = pair_ok[:, :, None] & d_ok[None, None, :]
            if NORMALIZE:
                # out = q.w / n with n = max(||w||, eps): d out / d q = w / n, and d out / d w =
                # q / n - out * w / n^2 where ||w|| > eps (n is then ||w||), q / n elsewhere.
                pair = offs_l[:, None] * stride_o + offs_r[None, :]
                norm = tl.load(Norms + pair, mask=pair_ok, other=1.0)
                g_row = g / norm
                g_self = tl.where(norm > eps, g * tl.load(Out + pair, mask=pair_ok, other=0.0) / (norm * norm), 0.0)
            else:
                g_row = g
            if QUERY_GRAD or NORMALIZE:
                rows = tl.load(Table + cols[:, :, None] * stride_t + d[None, None, :], mask=tile_ok,
                               other=0.0).to(tl.float32)
            if QUERY_GRAD:
                grad_q += tl.sum(g_row[:, :, None] * rows, axis=1)
            if TABLE_GRAD:
                grad_rows = g_row[:, :, None] * q[:, None, :]
                if NORMALIZE:
                    grad_rows -= g_self[:, :, None] * rows
                tl.atomic_add(GradTable + cols[:, :, None] * stride_gt + d[None, None, :],
                              grad_rows, mask=tile_ok, sem="relaxed")
        if QUERY_GRAD:
            tl.store(GradQuery + offs_l[:, None] * stride_gq + d[None, :],
                     grad_q.to(GradQuery.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------- #
# Host side: block sizes, launches, autograd
# --------------------------------------------------------------------------- #


def _config(device: torch.device, dim: int) -> Tuple[int, int, int, int]:
    """(BLOCK_L, BLOCK_R, BLOCK_D, num_warps); see the module docstring for the choice.

    BLOCK_D is at least 16 (only tests have a smaller D), which keeps the tile shapes to ones
    Triton's GPU backend compiles routinely, and at most 64 (the register budget above).
    """
    if device.type != "cuda":
        return 4, 8, 16, 1  # interpreter: several blocks at test sizes
    return 8, 16, min(64, max(16, triton.next_power_of_2(dim))), 4


def _forward(query: torch.Tensor, table: torch.Tensor, columns: torch.Tensor, row_offset: int,
             eps: Optional[float]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out, the rows' norms max(||row||, eps) per (l, r) when normalising, else None)."""
    num_rows, num_cols = columns.shape
    out = torch.empty((num_rows, num_cols), dtype=torch.float32, device=query.device)
    norms = torch.empty_like(out) if eps is not None else None
    if out.numel() == 0:
        return out, norms
    block_l, block_r, block_d, num_warps = _config(query.device, query.shape[1])
    grid = (triton.cdiv(num_rows, block_l), triton.cdiv(num_cols, block_r))
    _gathered_dot_fwd_kernel[grid](
        query, table, columns, out, norms if norms is not None else out, num_rows, num_cols, row_offset,
        eps if eps is not None else 0.0, query.stride(0), table.stride(0), columns.stride(0), out.stride(0),
        D=query.shape[1], BLOCK_L=block_l, BLOCK_R=block_r, BLOCK_D=block_d, NORMALIZE=eps is not None,
        num_warps=num_warps,
    )
    return out, norms


def _backward(grad_out: torch.Tensor, query: torch.Tensor, table: torch.Tensor, columns: torch.Tensor,
              out: torch.Tensor, norms: Optional[torch.Tensor], row_offset: int, eps: Optional[float],
              query_grad: bool, table_grad: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    num_rows, num_cols = columns.shape
    grad_query = torch.zeros_like(query) if query_grad else None  # zeros: with R = 0 nothing is written
    grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device) if table_grad else None
    if columns.numel() > 0 and (query_grad or table_grad):
        block_l, block_r, block_d, num_warps = _config(query.device, query.shape[1])
        dummy = query  # pointer argument of a gradient that is not computed
        _gathered_dot_bwd_kernel[(triton.cdiv(num_rows, block_l),)](
            query, table, columns, grad_out, out, norms if norms is not None else out,
            grad_query if query_grad else dummy, grad_table if table_grad else dummy, num_rows, num_cols,
            row_offset, eps if eps is not None else 0.0,
            query.stride(0), table.stride(0), columns.stride(0), grad_out.stride(0), out.stride(0),
            grad_query.stride(0) if query_grad else 0, grad_table.stride(0) if table_grad else 0,
            D=query.shape[1], BLOCK_L=block_l, BLOCK_R=block_r, BLOCK_D=block_d,
            QUERY_GRAD=query_grad, TABLE_GRAD=table_grad, NORMALIZE=eps is not None, num_warps=num_warps,
        )
    if grad_table is not None:
        grad_table = grad_table.to(table.dtype)
    return grad_query, grad_table


class _GatheredDotFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: torch.Tensor, table: torch.Tensor, columns: torch.Tensor, row_offset: int,
                eps: Optional[float]) -> torch.Tensor:
        out, norms = _forward(query, table, columns, row_offset, eps)
        ctx.save_for_backward(query, table, columns, out, norms)
        ctx.row_offset, ctx.eps = row_offset, eps
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        query, table, columns, out, norms = ctx.saved_tensors
        grad_query, grad_table = _backward(_prepare(grad_out), query, table, columns, out, norms,
                                           ctx.row_offset, ctx.eps, query_grad=ctx.needs_input_grad[0],
                                           table_grad=ctx.needs_input_grad[1])
        return grad_query, grad_table, None, None, None


def _prepare(x: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride but need unit stride along the last dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_gathered_dot(query: torch.Tensor, table: torch.Tensor, columns: torch.Tensor, row_offset: int = 0,
                        eps: Optional[float] = None) -> torch.Tensor:
    """Same contract as `ops.gathered_dot.gathered_dot_reference`: query (L, D), table (P, D), columns (L, R).

    Differentiable in query and table; returns (L, R) fp32. Every row_offset + column must
    lie in [0, P) (unchecked: checking would sync with the GPU).
    """
    if query.dim() != 2 or table.dim() != 2 or columns.dim() != 2:
        raise ValueError(f"expected query (L, D), table (P, D), columns (L, R); got {tuple(query.shape)}, "
                         f"{tuple(table.shape)}, {tuple(columns.shape)}")
    if query.shape[1] != table.shape[1] or columns.shape[0] != query.shape[0]:
        raise ValueError(f"shapes do not match: query {tuple(query.shape)}, table {tuple(table.shape)}, "
                         f"columns {tuple(columns.shape)}")
    return _GatheredDotFunction.apply(_prepare(query), _prepare(table), _prepare(columns), int(row_offset), eps)
