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

M-FALCON: with `num_targets` (B,) the last num_targets positions of each
sequence are candidates laid out as in ops/targets.py (each sees the prefix
and itself, biased as if it alone followed the prefix).
`hstu_target_attention` computes the same target rows from the prefix's
cached keys and values, without the prefix rows (`target_bias` holds what its
layers share).

Mixed precision (train_fn.mixed_precision = "bf16"): the PyTorch paths run
with autocast off, so they compute in fp32 as written (autocast would turn
their einsums back to bf16) and return q/v's dtype, bf16 under autocast; the
fused kernel takes bf16 q, k, v as they come, with fp32 accumulation. The
relative-bias weights stay fp32 in both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Optional

import torch
import torch.nn.functional as F

from ops.dispatch import kernel_usable
from ops.jagged import dense_to_jagged, jagged_to_dense
from ops.targets import effective_positions, prefix_lengths, query_timestamp_index, visible_keys
from ops.time_buckets import BUCKET_INCREMENT, NUM_TIME_BUCKETS, time_buckets  # noqa: F401 (re-exported)


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
    lengths: Optional[torch.Tensor] = None,
    num_targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B, n, n) bias rab(i, j) for the first n positions of each sequence.

    With `num_targets` (and the sequences' `lengths`), positions and query
    timestamps follow the target layout of ops/targets.py.
    """
    if num_targets is None:
        pos = torch.arange(n, device=timestamps.device)[None, :]
        query_index = (pos + 1).clamp(max=max_seq_len - 1)
    else:
        prefix = prefix_lengths(lengths, num_targets)
        pos = effective_positions(n, prefix)
        query_index = query_timestamp_index(n, max_seq_len, prefix, num_targets)
    pos_bias = pos_w[max_seq_len - 1 + pos[:, None, :] - pos[:, :, None]]
    query_ts = timestamps.gather(1, query_index.expand(timestamps.shape[0], -1))
    key_ts = timestamps[:, :n]
    buckets = time_buckets(query_ts[:, :, None] - key_ts[:, None, :], ts_w.numel() - 1)
    return pos_bias + _LookupWithHistogramGrad.apply(ts_w, buckets)


def _normalize_scores(scores: torch.Tensor, visible: torch.Tensor, normalization: str, max_seq_len: int,
                      dqk: int) -> torch.Tensor:
    """Attention weights from scores (q.k + rab) where `visible`: SiLU / N, or the softmax ablation."""
    if normalization == "silu":
        return torch.where(visible, F.silu(scores) / max_seq_len, 0.0)
    if normalization == "softmax":
        return torch.softmax((scores / math.sqrt(dqk)).masked_fill(~visible, float("-inf")), dim=-1)
    raise ValueError(f"unknown attention normalization {normalization!r}: use silu or softmax")


def _without_autocast(fn):
    """fn with autocast off (for PyTorch paths that pick their compute dtype themselves)."""

    @functools.wraps(fn)
    def wrapped(q: torch.Tensor, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)

    return wrapped


@_without_autocast
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
    num_targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Jagged HSTU attention: q, k (L, h, dqk), v (L, h, dv) -> (L, h, dv).

    Without timestamps/ts_w/pos_w the relative bias is dropped.
    normalization "silu" is HSTU's pointwise attention; "softmax" is the
    ablation softmax((q.k + rab) / sqrt(dqk)) over the causal keys.
    num_targets (B,): the last num_targets[b] positions are M-FALCON targets (ops/targets.py).
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
        rab = relative_bias(timestamps, ts_w.to(compute_dtype), pos_w.to(compute_dtype), max_seq_len, n,
                            lengths, num_targets)
        scores = scores + rab[:, None]
    if num_targets is None:
        pos = torch.arange(n, device=q.device)
        visible = pos[None, :] <= pos[:, None]
    else:
        visible = visible_keys(n, prefix_lengths(lengths, num_targets))[:, None]
    attn = _normalize_scores(scores, visible, normalization, max_seq_len, dqk)
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
    return kernel_usable(device, triton_problem(), "HSTU attention uses the PyTorch path")


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
    num_targets: Optional[torch.Tensor] = None,
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

        return triton_hstu_attention(q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w, num_targets)
    return hstu_attention_reference(
        q, k, v, seq_offsets, max_seq_len, timestamps, ts_w, pos_w, normalization, num_targets
    )


@dataclasses.dataclass
class TargetBias:
    """What every layer's target attention shares within one microbatch (computed once, not per layer)."""

    visible: torch.Tensor  # (B, 1, 1, n + 1): the valid prefix keys, then the target itself
    pos_index: torch.Tensor  # (B, 1, 1, n): pos_w index of each prefix key seen from position prefix_len
    buckets: Optional[torch.Tensor]  # (B, 1, T, n): time buckets of target - prefix timestamps


def target_bias(prefix_len: torch.Tensor, n: int, max_seq_len: int, prefix_timestamps: Optional[torch.Tensor] = None,
                target_timestamps: Optional[torch.Tensor] = None, num_buckets: int = NUM_TIME_BUCKETS) -> TargetBias:
    """TargetBias of targets after prefixes of prefix_len (< max_seq_len) tokens, dense width n (<= max_seq_len)."""
    key_pos = torch.arange(n, device=prefix_len.device)
    visible = key_pos[None, :] < prefix_len[:, None]
    visible = torch.cat([visible, visible.new_ones(visible.shape[0], 1)], dim=1)
    buckets = None
    if prefix_timestamps is not None and target_timestamps is not None:
        buckets = time_buckets(target_timestamps[:, :, None] - prefix_timestamps[:, None, :n], num_buckets)[:, None]
    pos_index = max_seq_len - 1 + key_pos[None, :] - prefix_len[:, None]
    return TargetBias(visible[:, None, None, :], pos_index[:, None, None, :], buckets)


@_without_autocast
def hstu_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    bias: TargetBias,
    max_seq_len: int,
    ts_w: Optional[torch.Tensor] = None,
    pos_w: Optional[torch.Tensor] = None,
    normalization: str = "silu",
) -> torch.Tensor:
    """Target rows of M-FALCON attention from the prefix's cached keys and values.

    q, k: (B, T, h, dqk) and v: (B, T, h, dv) of T targets per sequence;
    prefix_k, prefix_v: (B, n, h, .) dense, zero padded; `bias` from
    `target_bias`. Returns (B, T, h, dv): each target's row of
    `hstu_attention_reference(..., num_targets=...)` on [prefix, targets],
    i.e. attention over the prefix and itself at position prefix_len with its
    own timestamp, for O(T n) work instead of O((n + T)^2).
    """
    dqk = q.shape[-1]
    n = prefix_k.shape[1]
    f32 = torch.float32
    prefix_scores = torch.einsum("bthd,bjhd->bhtj", q.to(f32), prefix_k.to(f32))
    self_scores = (q.to(f32) * k.to(f32)).sum(-1).transpose(1, 2).unsqueeze(-1)  # (B, h, T, 1)
    if ts_w is not None and pos_w is not None and bias.buckets is not None:
        prefix_scores = prefix_scores + (pos_w.to(f32)[bias.pos_index] + ts_w.to(f32)[bias.buckets])
        # Its own key: relative position 0, time difference 0 (bucket 0).
        self_scores = self_scores + (pos_w[max_seq_len - 1] + ts_w[0]).to(f32)
    attn = _normalize_scores(torch.cat([prefix_scores, self_scores], dim=-1), bias.visible, normalization,
                             max_seq_len, dqk)
    out = torch.einsum("bhtj,bjhd->bthd", attn[..., :n], prefix_v.to(f32))
    out = out + attn[..., n:].transpose(1, 2) * v.to(f32)
    return out.to(v.dtype)
