"""Layer normalisation over the last dimension, without affine parameters.

PyTorch's CUDA layer-norm forward has a fast vectorised kernel only when the
normalised size is a multiple of 4; for the frozen configs' sizes (50, and
2 x 25 attention outputs) it falls back to a kernel that spends a whole thread
block on each row (0.15 ms on 27,000 rows of 50 on an H100, where a few
reductions and elementwise ops take 0.05 ms: benchmarks/layer_norm.py). Its
backward kernel has no such problem, while autograd through the composite
forward would launch a dozen kernels. So: the composite forward, saving mean
and 1/std, and PyTorch's own backward kernel. CPU tensors and sizes the fast
kernel handles keep `F.layer_norm`.

Under CUDA autocast (train_fn.mixed_precision = "bf16") the composite does
what autocast does for `F.layer_norm`: it upcasts its input and computes and
returns fp32. (Given bf16 as it is, it would save bf16 statistics, which the
CUDA backward kernel cannot read: it takes them in fp32 for 16-bit inputs.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class CompositeLayerNorm(torch.autograd.Function):
    """(x - mean) / sqrt(biased variance + eps) over the last dim."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        centered = x - mean
        rstd = torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)
        ctx.save_for_backward(x, mean, rstd)
        return centered * rstd

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        x, mean, rstd = ctx.saved_tensors
        dx, _, _ = torch.ops.aten.native_layer_norm_backward(
            grad.contiguous(), x, x.shape[-1:], mean, rstd, None, None, [True, False, False]
        )
        return dx, None


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Same values as `F.layer_norm(x, x.shape[-1:], eps=eps)` up to rounding."""
    if x.is_cuda and x.shape[-1] % 4:
        return CompositeLayerNorm.apply(x, eps)
    return F.layer_norm(x, x.shape[-1:], eps=eps)
