"""HSTU attention on jagged sequences (REFERENCE.md section 5, steps 3-5).

For sequence b, query position i and key position j <= i:

    rab(i, j) = pos_w[N - 1 + j - i] + ts_w[bucket(t[i + 1] - t[j])]
    a(i, j)   = SiLU(q_i . k_j + rab(i, j)) / N
    out_i     = sum_j a(i, j) v_j

with N the padded length (not the sequence's own), t the sequence's timestamps
in a (B, N) tensor whose position `length` holds the target's timestamp, the
index i + 1 clamped to N - 1 ("the final timestamp repeated past the end"),
and bucket(d) = floor(ln(max(|d|, 1)) / 0.301) clamped to [0, num_buckets].

`hstu_attention_reference` is the plain PyTorch formula: it pads the batch to
its longest sequence and materialises the (B, h, n, n) scores, so it is the
ground truth for tests and the CPU path. `hstu_attention` dispatches to the
fused Triton kernel (ops/triton) on CUDA when it is available.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from ops.jagged import dense_to_jagged, jagged_to_dense

BUCKET_INCREMENT = 0.301
NUM_TIME_BUCKETS = 128


def time_buckets(delta: torch.Tensor, num_buckets: int = NUM_TIME_BUCKETS) -> torch.Tensor:
    """floor(ln(max(|delta|, 1)) / 0.301) clamped to [0, num_buckets], as int64."""
    scaled = torch.log(delta.abs().clamp(min=1).to(torch.float32)) / BUCKET_INCREMENT
    return scaled.long().clamp(0, num_buckets)


class _LookupWithHistogramGrad(torch.autograd.Function):
    """table[index] whose backward is a weighted histogram of the index.

    Autograd's scatter-add of millions of gradients into a 129-entry table
    serialises on atomics (hundreds of ms per layer on an H100); bincount
    reduces per block in shared memory first.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size = table.numel()
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        hist = torch.bincount(index.reshape(-1), weights=grad.reshape(-1).float(), minlength=ctx.size)
        return hist.to(grad.dtype), None


def relative_bias(
    timestamps: torch.Tensor,
    ts_w: torch.Tensor,
    pos_w: torch.Tensor,
    max_seq_len: int,
    n: int,
) -> torch.Tensor:
    """(B, n, n) bias rab(i, j) for the first n positions of each sequence."""
    device = timestamps.device
    pos = torch.arange(n, device=device)
    pos_bias = pos_w[max_seq_len - 1 + pos[None, :] - pos[:, None]]
    next_index = (pos + 1).clamp(max=max_seq_len - 1)
    query_ts = timestamps[:, next_index]
    key_ts = timestamps[:, :n]
    buckets = time_buckets(query_ts[:, :, None] - key_ts[:, None, :], ts_w.numel() - 1)
    return pos_bias[None] + _LookupWithHistogramGrad.apply(ts_w, buckets)


def hstu_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    timestamps: Optional[torch.Tensor] = None,
    ts_w: Optional[torch.Tensor] = None,
    pos_w: Optional[torch.Tensor] = None,
    normalization: str = "silu",
) -> torch.Tensor:
    """Jagged HSTU attention: q, k (L, h, dqk), v (L, h, dv) -> (L, h, dv).

    Without timestamps/ts_w/pos_w the relative bias is dropped.
    normalization "silu" is HSTU's pointwise attention; "softmax" is the
    ablation softmax((q.k + rab) / sqrt(dqk)) over the causal keys.
    """
    total, heads, dqk = q.shape
    dv = v.shape[-1]
    batch = seq_offsets.numel() - 1
    if batch == 0 or total == 0:
        return v.new_zeros(total, heads, dv)
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    n = max(int(lengths.max().item()), 1)
    compute_dtype = torch.float32
    dense = [
        jagged_to_dense(x.reshape(total, -1), seq_offsets, n).view(batch, n, heads, -1).to(compute_dtype)
        for x in (q, k, v)
    ]
    scores = torch.einsum("bihd,bjhd->bhij", dense[0], dense[1])
    if ts_w is not None and pos_w is not None and timestamps is not None:
        rab = relative_bias(timestamps, ts_w.to(compute_dtype), pos_w.to(compute_dtype), max_seq_len, n)
        scores = scores + rab[:, None]
    pos = torch.arange(n, device=q.device)
    causal = pos[None, :] <= pos[:, None]
    if normalization == "silu":
        attn = torch.where(causal, F.silu(scores) / max_seq_len, 0.0)
    elif normalization == "softmax":
        attn = torch.softmax((scores / math.sqrt(dqk)).masked_fill(~causal, float("-inf")), dim=-1)
    else:
        raise ValueError(f"unknown attention normalization {normalization!r}: use silu or softmax")
    out = torch.einsum("bhij,bjhd->bihd", attn, dense[2]).reshape(batch, n, heads * dv)
    return dense_to_jagged(out, seq_offsets, total).view(total, heads, dv).to(v.dtype)


MIN_TRITON = (3, 3)  # the kernel's backward uses tl.gather, first released in Triton 3.3


@functools.lru_cache(maxsize=None)
def triton_problem() -> Optional[str]:
    """Why the fused kernel cannot be used here (Triton missing, too old or broken), or None."""
    try:
        import triton
    except Exception as exc:
        return f"Triton is not importable ({exc})"
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < MIN_TRITON:
        return (f"Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, "
                "which the fused kernel needs (tl.gather)")
    try:
        from ops.triton import hstu_attention as _  # noqa: F401
    except Exception as exc:
        return f"the fused kernel failed to import ({exc})"
    return None


def triton_available(device: torch.device) -> bool:
    """True when the fused kernel can run on `device`; on CUDA without it, says once why PyTorch is used."""
    if device.type != "cuda":
        return False
    problem = triton_problem()
    if problem is not None:
        _notify_fallback(problem)
    return problem is None


@functools.lru_cache(maxsize=None)
def _notify_fallback(problem: str) -> None:
    print(f"notice: HSTU attention uses the PyTorch path (slower): {problem}", file=sys.stderr, flush=True)


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    timestamps: Optional[torch.Tensor] = None,
    ts_w: Optional[torch.Tensor] = None,
    pos_w: Optional[torch.Tensor] = None,
    normalization: str = "silu",
    kernel: str = "auto",
) -> torch.Tensor:
    """Same contract as `hstu_attention_reference`; kernel is auto, triton or torch."""
    if kernel not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown attention kernel {kernel!r}: use auto, triton or torch")
    use_triton = kernel == "triton" or (
        kernel == "auto" and normalization == "silu" and triton_available(q.device)
    )
    if use_triton:
        if normalization != "silu":
            raise ValueError("the Triton kernel implements the silu normalization only")
        if triton_problem() is not None:
            raise RuntimeError(f"attention kernel 'triton' requested, but {triton_problem()}")
        from ops.triton.hstu_attention import triton_hstu_attention

        return triton_hstu_attention(q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w)
    return hstu_attention_reference(
        q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w, normalization
    )
