"""HSTU encoder on jagged sequences (REFERENCE.md section 5)."""

from __future__ import annotations

import gin
import torch
import torch.nn.functional as F
from torch import nn

from generative_recommenders.config import check_one_of, check_positive, check_rate
from ops.hstu_attention import NUM_TIME_BUCKETS, hstu_attention, triton_available
from ops.jagged import dense_to_jagged
from ops.layer_norm import layer_norm


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

    def forward(self, x: torch.Tensor, seq_offsets: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """x: (L, D) jagged; timestamps: (B, N). Returns (L, D)."""
        h, dqk, dv = self.num_heads, self.dqk, self.dv
        normed = layer_norm(x, self.eps)
        u, v, q, k = torch.split(F.silu(normed @ self.uvqk), [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        attn = hstu_attention(
            q.reshape(-1, h, dqk),
            k.reshape(-1, h, dqk),
            v.reshape(-1, h, dv),
            seq_offsets,
            self.max_seq_len,
            timestamps if self.ts_w is not None else None,
            self.ts_w,
            self.pos_w,
            normalization=self.normalization,
            kernel=self.attention_kernel,
        ).reshape(-1, h * dv)
        gated = u * layer_norm(attn, self.eps)
        return x + self.output(self.dropout(gated))


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
        timestamps: torch.Tensor,
    ) -> torch.Tensor:
        """x: (B, N, D) padded input; returns the (L, D) jagged outputs of valid positions."""
        x = dense_to_jagged(x, seq_offsets, total)
        for layer in self.layers:
            x = layer(x, seq_offsets, timestamps)
        return x
