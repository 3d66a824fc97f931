"""Choosing between a Triton kernel and its PyTorch formula, saying once why when the kernel cannot run."""

from __future__ import annotations

import functools
import sys
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def notify_once(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def kernel_usable(device: torch.device, problem: Optional[str], fallback: str) -> bool:
    """True on CUDA when the kernel has no `problem`; on CUDA with one, prints once
    "notice: <fallback> (slower): <problem>". Always False off CUDA."""
    if device.type != "cuda":
        return False
    if problem is not None:
        notify_once(f"notice: {fallback} (slower): {problem}")
    return problem is None


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for a kernel's inputs: fp32 follows torch's matmul precision
    setting (default "highest": exact fp32 products, "ieee"); TF32 otherwise."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"
