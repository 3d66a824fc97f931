"""Cross-entropy of queries against every candidate: a weighted mean over rows l of
lse_c(z[l, c]) - z[l, target[l]], z = query @ items.T / temperature (a full softmax).

`linear_cross_entropy_reference` is the chunked path: one chunk of rows'
(rows, C) logits at a time, with the gradients computed in the forward pass
so that no chunk's logits are kept for backward (memory: one chunk, whatever
the catalog); its per-row step (log-sum-exp, loss, logit gradient) is
`softmax_rows` in PyTorch or, given as `rows_step`, the kernel of
ops/triton/softmax_rows.py. The PyTorch path runs on CPU, for fp64, and on
CUDA where the kernels cannot (one notice says why). `linear_cross_entropy`
dispatches on CUDA to the fused Triton kernel of
ops/triton/linear_cross_entropy.py, whose logits never leave the chip, or,
for wide fp32 rows, to the chunked path with the per-row kernel; on CPU it
always takes the PyTorch path, even under TRITON_INTERPRET=1, so that
training tests that run beside the interpreted kernel tests stay fast (the
kernel tests call the kernels directly).

Same semantics on both paths: rows with target < 0 are ignored (weight 0);
the mean divides by max(sum of weights, 1); the log-sum-exp and the loss are
in at least fp32 (fp64 stays fp64 on the PyTorch path); 16-bit inputs are
multiplied as given, so bf16 products only when the caller passes bf16.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch

from ops.dispatch import kernel_usable

CHUNK_ELEMENTS = 1 << 26  # logits per chunk of the PyTorch path: 256 MB in fp32
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Widest fp32 rows the fused kernel is used for: measured on one H200 (benchmarks/linear_cross_entropy.py,
# benchmarks/results/linear_cross_entropy_h200.jsonl), fp32 with TF32 at D = 256 (ml-20m) it takes
# 35.9 ms forward+backward against the chunked path's 19.5; at D = 50 and 64 it is the faster one.
# Wider fp32 rows take the chunked path with its per-row step in a kernel.
FUSED_MAX_FP32_DIM = 128


def _row_weights(targets: torch.Tensor, weights: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-row weights as given (1 when None), 0 where the target is negative (an ignored row)."""
    valid = (targets >= 0).to(dtype)
    return valid if weights is None else weights.to(dtype) * valid


def softmax_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, inverse_temperature: float,
                 need_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One chunk's share of the loss from its raw logits q @ items.T (rows, C): sum_r scale[r] * (lse_r -
    z[r, targets[r]]) with z = logits * inverse_temperature, in scale's dtype, and with need_grad
    d/d logits (else None). The PyTorch formula; ops/triton/softmax_rows.py is the same step in one kernel."""
    cols, w = targets.unsqueeze(1), scale.unsqueeze(1)
    z = logits.to(scale.dtype) * inverse_temperature
    log_norm = z.logsumexp(dim=1, keepdim=True)
    loss = (w * (log_norm - z.gather(1, cols))).sum()
    if not need_grad:
        return loss, None
    # d loss / d z = w * (softmax - one_hot(target)), times 1/T for the dot products.
    grad = (z - log_norm).exp_().mul_(w).scatter_add_(1, cols, -w).mul_(inverse_temperature)
    return loss, grad.to(logits.dtype)


RowsStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool],
                    Tuple[torch.Tensor, Optional[torch.Tensor]]]


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The chunked path's forward and backward; `scale` holds weight / max(sum of weights, 1) per row,
    `rows_step` turns a chunk's logits into its loss and logit gradient (softmax_rows or its kernel)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                inverse_temperature: float, rows_step: RowsStep) -> torch.Tensor:
        chunk = max(1, CHUNK_ELEMENTS // max(items.shape[0], 1))
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_query = torch.empty_like(query) if need_grad else None
        grad_items = torch.zeros_like(items) if need_grad else None
        loss = query.new_zeros((), dtype=scale.dtype)
        for start in range(0, query.shape[0], chunk):
            rows = slice(start, start + chunk)
            q = query[rows]
            chunk_loss, grad_logits = rows_step(q @ items.T, targets[rows], scale[rows], inverse_temperature,
                                                need_grad)
            loss = loss + chunk_loss
            if need_grad:
                grad_query[rows] = grad_logits @ items
                grad_items.addmm_(grad_logits.T, q)
        ctx.save_for_backward(grad_query, grad_items)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_query, grad_items = ctx.saved_tensors
        return grad_query * grad_loss, grad_items * grad_loss, None, None, None, None


def linear_cross_entropy_reference(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                                   temperature: float, weights: Optional[torch.Tensor] = None,
                                   rows_step: RowsStep = softmax_rows) -> torch.Tensor:
    """The module docstring's loss, chunked: query (L, D), items (C, D), targets (L,), weights (L,)."""
    dtype = torch.promote_types(query.dtype, torch.float32)  # softmax sums in at least fp32
    w = _row_weights(targets, weights, dtype)
    scale = w / w.sum().clamp(min=1.0)
    return _ChunkedCrossEntropy.apply(query, items, targets.clamp(min=0), scale, 1.0 / temperature, rows_step)


@functools.lru_cache(maxsize=None)
def _import_problem() -> Optional[str]:
    try:
        from ops.triton import linear_cross_entropy as _, softmax_rows as _rows  # noqa: F401
    except Exception as exc:
        return f"the fused linear cross-entropy kernel failed to import ({exc})"
    return None


def triton_problem(query: torch.Tensor, items: torch.Tensor) -> Optional[str]:
    """Why the kernel cannot take these inputs (Triton missing or broken, dtype, D), or None."""
    problem = _import_problem()
    if problem is not None:
        return problem
    from ops.triton.linear_cross_entropy import MAX_DIM

    if query.dtype not in KERNEL_DTYPES or items.dtype not in KERNEL_DTYPES:
        return f"the fused linear cross-entropy kernel takes fp32/bf16/fp16, not {query.dtype}/{items.dtype}"
    if query.shape[-1] > MAX_DIM:
        return f"the fused linear cross-entropy kernel takes D <= {MAX_DIM}, not {query.shape[-1]}"
    return None


def linear_cross_entropy(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, temperature: float,
                         weights: Optional[torch.Tensor] = None, eps: Optional[float] = None) -> torch.Tensor:
    """Weighted mean full-softmax cross-entropy (module docstring), differentiable in query and items.

    query (L, D), items (C, D) with C >= 1, targets (L,) columns of items (< 0: ignored), weights (L,) or
    None (1 per row); with eps, the items are scored as F.normalize(items, dim=1, eps=eps) (the fused
    kernel normalises the raw rows itself). Returns a scalar in at least fp32. On CUDA the fused kernel,
    whose gradients are deterministic, or for fp32 rows wider than FUSED_MAX_FP32_DIM (faster there) the
    chunked path with its per-row step in a kernel (ops/triton/softmax_rows.py); elsewhere, or when the
    kernels cannot take the inputs, the chunked PyTorch path.
    """
    wide_fp32 = query.dtype == torch.float32 and query.shape[-1] > FUSED_MAX_FP32_DIM  # slower there
    rows_step: RowsStep = softmax_rows
    if query.is_cuda and kernel_usable(query.device, triton_problem(query, items),  # no Triton import off CUDA
                                       "the full-softmax cross-entropy runs on the chunked PyTorch path"):
        if not wide_fp32:
            from ops.triton.linear_cross_entropy import triton_linear_cross_entropy

            losses, _ = triton_linear_cross_entropy(query, items, targets, temperature, eps=eps)
            w = _row_weights(targets, weights, torch.float32)
            return (losses * w).sum() / w.sum().clamp(min=1.0)
        from ops.triton.softmax_rows import triton_softmax_rows

        rows_step = triton_softmax_rows
    if eps is not None:
        items = torch.nn.functional.normalize(items, dim=-1, eps=eps)
    return linear_cross_entropy_reference(query, items, targets, temperature, weights, rows_step)
