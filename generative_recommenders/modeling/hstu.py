"""HSTU encoder on jagged sequences (REFERENCE.md section 5).

For M-FALCON ranking (ops/targets.py) the encoder also takes `num_targets`,
and can encode prefixes once (`encode_prefix`, keeping every layer's keys and
values) and then any number of target microbatches against them
(`encode_targets`).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import gin
import torch
import torch.nn.functional as F
from torch import nn

from generative_recommenders.config import check_one_of, check_positive, check_rate
from ops.hstu_attention import (
    NUM_TIME_BUCKETS, TargetBias, hstu_attention, hstu_target_attention, target_bias, triton_available,
)
from ops.jagged import dense_to_jagged, jagged_to_dense
from ops.layer_norm import layer_norm


@dataclasses.dataclass
class PrefixCache:
    """Per-layer keys and values of encoded prefixes, dense (B, n, h, d), the first `lengths[b]` rows valid."""

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    lengths: torch.Tensor  # (B,)
    timestamps: torch.Tensor  # (B, n): the prefixes' own timestamps


class HSTULayer(nn.Module):
    """One HSTU block: pointwise projection, SiLU attention with relative bias, gated output."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dqk: int,
        dv: int,
        max_seq_len: int,
        linear_dropout_rate: float,
        normalization: str = "silu",
        relative_bias: bool = True,
        attention_kernel: str = "auto",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_heads, self.dqk, self.dv = num_heads, dqk, dv
        self.max_seq_len = max_seq_len
        self.normalization = normalization
        self.attention_kernel = attention_kernel
        self.eps = eps
        self.uvqk = nn.Parameter(torch.empty(dim, num_heads * (2 * dv + 2 * dqk)).normal_(0.0, 0.02))
        self.output = nn.Linear(num_heads * dv, dim)
        nn.init.xavier_uniform_(self.output.weight)
        self.dropout = nn.Dropout(linear_dropout_rate)
        if relative_bias:
            self.ts_w = nn.Parameter(torch.empty(NUM_TIME_BUCKETS + 1).normal_(0.0, 0.02))
            self.pos_w = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(0.0, 0.02))
        else:
            self.register_parameter("ts_w", None)
            self.register_parameter("pos_w", None)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., D) -> u (..., h dv), q, k (..., h, dqk), v (..., h, dv)."""
        h, dqk, dv = self.num_heads, self.dqk, self.dv
        normed = layer_norm(x, self.eps)
        u, v, q, k = torch.split(F.silu(normed @ self.uvqk), [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        lead = x.shape[:-1]
        return u, q.reshape(*lead, h, dqk), k.reshape(*lead, h, dqk), v.reshape(*lead, h, dv)

    def combine(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual output x + W2(dropout(u * LayerNorm(attn))); attn (..., h, dv)."""
        attn = attn.reshape(*attn.shape[:-2], self.num_heads * self.dv)
        return x + self.output(self.dropout(u * layer_norm(attn, self.eps)))

    def forward_with_kv(
        self, x: torch.Tensor, seq_offsets: torch.Tensor, timestamps: torch.Tensor,
        num_targets: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's output (L, D) and its keys and values (L, h, .)."""
        u, q, k, v = self.project(x)
        attn = hstu_attention(
            q, k, v, seq_offsets, self.max_seq_len,
            timestamps if self.ts_w is not None else None, self.ts_w, self.pos_w,
            normalization=self.normalization, kernel=self.attention_kernel, num_targets=num_targets,
        )
        return self.combine(x, u, attn), k, v

    def forward(
        self, x: torch.Tensor, seq_offsets: torch.Tensor, timestamps: torch.Tensor,
        num_targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (L, D) jagged; timestamps: (B, N); num_targets (B,) optional (ops/targets.py). Returns (L, D)."""
        return self.forward_with_kv(x, seq_offsets, timestamps, num_targets)[0]

    def forward_targets(
        self, x: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, bias: TargetBias,
    ) -> torch.Tensor:
        """x: (B, T, D) targets after prefixes with this layer's keys/values cached. Returns (B, T, D)."""
        u, q, k, v = self.project(x)
        attn = hstu_target_attention(q, k, v, prefix_k, prefix_v, bias, self.max_seq_len, self.ts_w, self.pos_w,
                                     self.normalization)
        return self.combine(x, u, attn)


@gin.configurable("hstu_encoder")
class HSTUEncoder(nn.Module):
    """A stack of HSTU layers; dense padded input in, jagged output out."""

    def __init__(
        self,
        dim: int,
        max_seq_len: int,
        num_blocks: int = gin.REQUIRED,
        num_heads: int = gin.REQUIRED,
        dqk: int = gin.REQUIRED,
        dv: int = gin.REQUIRED,
        linear_dropout_rate: float = 0.0,
        normalization: str = "silu",
        relative_bias: bool = True,
        attention_kernel: str = "auto",
    ) -> None:
        super().__init__()
        check_positive("hstu_encoder", num_blocks=num_blocks, num_heads=num_heads, dqk=dqk, dv=dv)
        check_rate("hstu_encoder", linear_dropout_rate=linear_dropout_rate)
        check_one_of("hstu_encoder.normalization", normalization, ("silu", "softmax"))
        check_one_of("hstu_encoder.attention_kernel", attention_kernel, ("auto", "triton", "torch"))
        self.max_seq_len = max_seq_len
        self.relative_bias = relative_bias
        self.layers = nn.ModuleList(
            HSTULayer(dim, num_heads, dqk, dv, max_seq_len, linear_dropout_rate, normalization,
                      relative_bias, attention_kernel)
            for _ in range(num_blocks)
        )

    def uses_triton(self, device: torch.device) -> bool:
        """True when the layers run the fused Triton kernel on `device`."""
        layer = self.layers[0] if len(self.layers) else None
        if layer is None or layer.attention_kernel == "torch" or layer.normalization != "silu":
            return False
        return layer.attention_kernel == "triton" or triton_available(device)

    def graph_safe(self, device: torch.device) -> bool:
        """The PyTorch attention path syncs with the host (jagged shapes); the fused kernel does not."""
        return self.uses_triton(device)

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, seq_offsets: torch.Tensor, total: int,
        timestamps: torch.Tensor, num_targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (B, N, D) padded input; returns the (L, D) jagged outputs of valid positions.

        num_targets (B,): the last num_targets[b] positions are M-FALCON targets (ops/targets.py).
        """
        x = dense_to_jagged(x, seq_offsets, total)
        for layer in self.layers:
            x = layer(x, seq_offsets, timestamps, num_targets)
        return x

    def encode_prefix(
        self, x: torch.Tensor, seq_offsets: torch.Tensor, total: int, timestamps: torch.Tensor,
    ) -> Tuple[torch.Tensor, PrefixCache]:
        """`forward` of whole prefixes (no targets), also keeping every layer's keys and values.

        The last position of each prefix reads its own timestamp as the "next"
        one, as prefixes followed by targets do (ops/targets.py).
        """
        n = x.shape[1]
        batch = seq_offsets.numel() - 1
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        last = timestamps.gather(1, (lengths - 1).clamp(min=0)[:, None])
        past_end = torch.arange(timestamps.shape[1], device=timestamps.device)[None, :] >= lengths[:, None]
        timestamps = torch.where(past_end, last, timestamps)
        x = dense_to_jagged(x, seq_offsets, total)
        keys, values = [], []
        for layer in self.layers:
            x, k, v = layer.forward_with_kv(x, seq_offsets, timestamps)
            keys.append(jagged_to_dense(k.reshape(total, -1), seq_offsets, n).view(batch, n, *k.shape[1:]))
            values.append(jagged_to_dense(v.reshape(total, -1), seq_offsets, n).view(batch, n, *v.shape[1:]))
        return x, PrefixCache(keys, values, lengths, timestamps[:, :n])

    def encode_targets(self, x: torch.Tensor, cache: PrefixCache, target_timestamps: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) target inputs (at position cache.lengths); returns (B, T, D), each target
        encoded as if it alone followed its prefix."""
        times = (cache.timestamps, target_timestamps) if self.relative_bias else (None, None)
        bias = target_bias(cache.lengths, cache.timestamps.shape[1], self.max_seq_len, *times, NUM_TIME_BUCKETS)
        for layer, k, v in zip(self.layers, cache.keys, cache.values):
            x = layer.forward_targets(x, k, v, bias)
        return x
