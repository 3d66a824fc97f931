"""A Triton kernel for the chunked full-softmax loss's per-row step: from one chunk of raw logits
q @ items.T (rows, C), each row's weighted loss and, in place, d loss / d (q @ items.T).

Where the fused kernel (ops/triton/linear_cross_entropy.py) is slower than materialising the logits
(fp32 rows of D = 256, ml-20m), the chunked path of ops/linear_cross_entropy.py writes a chunk of logits
with one cuBLAS matmul and reads the gradient back with two more. Between them its PyTorch formula
(scale, log-sum-exp, gather, exp, multiply, scatter, multiply) makes about six passes over the chunk
in HBM; this kernel makes one read and one read-write: one program per row walks its columns once
with a running max and sum of exp per lane (online log-sum-exp, fp32), then walks them again (mostly
from L2: one row is C * 4 bytes, 107 KB on ml-20m) writing

    g = scale * inv_t * (exp(z - lse) - one_hot(target)),   z = raw * inv_t,

over the raw logits in their dtype, and stores scale * (lse - z[target]) for the row. The arithmetic
is the PyTorch formula's (ops/linear_cross_entropy.softmax_rows) in another order: fp32 whatever the
input, the row's terms summed per lane and then across lanes.

`triton_softmax_rows` has softmax_rows's signature so the chunk loop takes either. On CPU tensors the
kernel runs under TRITON_INTERPRET=1 (tests) with 16-column blocks, so short rows span several.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_rows_kernel(logits_ptr, targets_ptr, scale_ptr, loss_ptr, C, stride, inv_t,
                         BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    offs = tl.arange(0, BLOCK)
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + offs
        z = tl.load(base + cols, mask=cols < C, other=float("-inf")).to(tl.float32) * inv_t
        new_max = tl.maximum(lane_max, z)
        # A lane that has seen only padding keeps max -inf and sum 0 (exp(-inf - -inf) would be nan).
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - ref) + tl.exp(z - ref)
        lane_max = new_max
    row_max = tl.max(lane_max, 0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), 0))
    target = tl.load(targets_ptr + row)
    weight = tl.load(scale_ptr + row).to(tl.float32)
    target_logit = tl.load(base + target).to(tl.float32) * inv_t
    tl.store(loss_ptr + row, weight * (lse - target_logit))
    if WRITE_GRAD:
        coef = weight * inv_t
        for start in range(0, C, BLOCK):
            cols = start + offs
            mask = cols < C
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            g = tl.exp(z - lse) * coef
            g = tl.where(cols == target, g - coef, g)
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def launch_shape(columns: int) -> Tuple[int, int]:
    """(BLOCK, num_warps) on the GPU: the fastest of the H100 sweep at ml-20m's rows, 8,192 columns over 16 warps
    (0.25 against 0.40 ms a chunk for 4,096 over 8; benchmarks/linear_cross_entropy.md)."""
    block = min(8192, triton.next_power_of_2(columns))
    return block, 16 if block >= 8192 else (8 if block >= 2048 else 4)


def triton_softmax_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, inverse_temperature: float,
                        need_grad: bool, block: Optional[int] = None,
                        num_warps: int = 4) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """sum_r scale[r] * (lse_r - z[r, targets[r]]) with z = logits * inverse_temperature, and, with need_grad,
    `logits` overwritten with d/d logits and returned (else None).

    logits (rows, C) raw products with unit column stride; targets (rows,) in [0, C) (unchecked); scale (rows,)
    fp32 per-row weights. The sum is fp32. `block` (columns per step of a row's walk) and `num_warps`
    override launch_shape (the interpreter's default: 16 columns, 1 warp) for benchmarks/linear_cross_entropy.py's
    sweep and the tests.
    """
    rows, columns = logits.shape
    losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        if block is None:
            block, num_warps = launch_shape(columns) if logits.is_cuda else (16, 1)
        _softmax_rows_kernel[(rows,)](logits, targets.contiguous(), scale.contiguous(), losses, columns,
                                      logits.stride(0), inverse_temperature, BLOCK=block, WRITE_GRAD=need_grad,
                                      num_warps=num_warps)
    return losses.sum(), logits if need_grad else None
