"""Cross-entropy of queries against every candidate: a weighted mean over rows l of
lse_c(z[l, c]) - z[l, target[l]], z = query @ items.T / temperature (a full softmax).

`linear_cross_entropy_reference` is the chunked PyTorch path: one chunk of rows'
(rows, C) logits at a time, with the gradients computed in the forward pass
so that no chunk's logits are kept for backward (memory: one chunk, whatever
the catalog). It runs on CPU, for fp64, and on CUDA where the kernel cannot
(one notice says why). `linear_cross_entropy` dispatches on CUDA to the fused
Triton kernel of ops/triton/linear_cross_entropy.py, whose logits never leave
the chip; on CPU it always takes the PyTorch path, even under
TRITON_INTERPRET=1, so that training tests that run beside the interpreted
kernel tests stay fast (the kernel tests call it directly).

Same semantics on both paths: rows with target < 0 are ignored (weight 0);
the mean divides by max(sum of weights, 1); the log-sum-exp and the loss are
in at least fp32 (fp64 stays fp64 on the PyTorch path); 16-bit inputs are
multiplied as given, so bf16 products only when the caller passes bf16.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ops.dispatch import kernel_usable

CHUNK_ELEMENTS = 1 << 26  # logits per chunk of the PyTorch path: 256 MB in fp32
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Widest fp32 rows the fused kernel is used for: measured on one H200 (benchmarks/linear_cross_entropy.py,
# benchmarks/results/linear_cross_entropy_h200.jsonl), fp32 with TF32 at D = 256 (ml-20m) it takes
# 35.9 ms forward+backward against the chunked path's 19.5; at D = 50 and 64 it is the faster one.
FUSED_MAX_FP32_DIM = 128


def _row_weights(targets: torch.Tensor, weights: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-row weights as given (1 when None), 0 where the target is negative (an ignored row)."""
    valid = (targets >= 0).to(dtype)
    return valid if weights is None else weights.to(dtype) * valid


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The reference's forward and backward; `scale` holds weight / max(sum of weights, 1) per row."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                inverse_temperature: float) -> torch.Tensor:
        chunk = max(1, CHUNK_ELEMENTS // max(items.shape[0], 1))
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_query = torch.empty_like(query) if need_grad else None
        grad_items = torch.zeros_like(items) if need_grad else None
        loss = query.new_zeros((), dtype=scale.dtype)
        for start in range(0, query.shape[0], chunk):
            rows = slice(start, start + chunk)
            q, cols, w = query[rows], targets[rows].unsqueeze(1), scale[rows].unsqueeze(1)
            logits = (q @ items.T).to(scale.dtype) * inverse_temperature
            log_norm = logits.logsumexp(dim=1, keepdim=True)
            loss = loss + (w * (log_norm - logits.gather(1, cols))).sum()
            if need_grad:
                # d loss / d logits = w * (softmax - one_hot(target)), times 1/T for the dot products.
                grad_logits = (logits - log_norm).exp_().mul_(w).scatter_add_(1, cols, -w)
                grad_logits = grad_logits.mul_(inverse_temperature).to(query.dtype)
                grad_query[rows] = grad_logits @ items
                grad_items.addmm_(grad_logits.T, q)
        ctx.save_for_backward(grad_query, grad_items)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_query, grad_items = ctx.saved_tensors
        return grad_query * grad_loss, grad_items * grad_loss, None, None, None


def linear_cross_entropy_reference(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                                   temperature: float, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The module docstring's loss, chunked PyTorch: query (L, D), items (C, D), targets (L,), weights (L,)."""
    dtype = torch.promote_types(query.dtype, torch.float32)  # softmax sums in at least fp32
    w = _row_weights(targets, weights, dtype)
    scale = w / w.sum().clamp(min=1.0)
    return _ChunkedCrossEntropy.apply(query, items, targets.clamp(min=0), scale, 1.0 / temperature)


@functools.lru_cache(maxsize=None)
def _import_problem() -> Optional[str]:
    try:
        from ops.triton import linear_cross_entropy as _  # noqa: F401
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
    whose gradients are deterministic; elsewhere, for fp32 rows wider than FUSED_MAX_FP32_DIM (faster
    there), or when the kernel cannot take the inputs, the chunked PyTorch path.
    """
    wide_fp32 = query.dtype == torch.float32 and query.shape[-1] > FUSED_MAX_FP32_DIM  # slower there
    if query.is_cuda and not wide_fp32 and kernel_usable(query.device, triton_problem(query, items),  # no Triton import off CUDA
                                       "the full-softmax cross-entropy runs on the chunked PyTorch path"):
        from ops.triton.linear_cross_entropy import triton_linear_cross_entropy

        losses, _ = triton_linear_cross_entropy(query, items, targets, temperature, eps=eps)
        w = _row_weights(targets, weights, torch.float32)
        return (losses * w).sum() / w.sum().clamp(min=1.0)
    if eps is not None:
        items = torch.nn.functional.normalize(items, dim=-1, eps=eps)
    return linear_cross_entropy_reference(query, items, targets, temperature, weights)
