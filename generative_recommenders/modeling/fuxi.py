"""FuXi-alpha encoder on jagged sequences (Ye et al., 2025, arXiv 2502.03036).

One block: adaptive multi-channel self-attention (AMS), then a multi-stage
feed-forward network (MFFN). For a layer input x (L, D):

    u, v, q, k = SiLU(RMSNorm(x) W)                  u: 3 h dv wide, v: h dv, q, k: h dqk
    semantic   a(i, j) = SiLU(q_i . k_j) / N          (HSTU's attention without the bias)
    temporal   a(i, j) = SiLU(ts_w[bucket(t[i + 1] - t[j])]) / N
    positional a(i, j) = SiLU(pos_w[N - 1 + j - i]) / N
    o_c,i      = sum_{j <= i} a_c(i, j) v_j           for each channel c (v shared)
    h          = u * concat(RMSNorm(o_sem), RMSNorm(o_time), RMSNorm(o_pos))
    x1         = x + W1 dropout(h)                    (MFFN stage 1)
    out        = x1 + W_down dropout(SiLU(W_gate z) * (W_up z)),  z = RMSNorm(x1)   (stage 2, SwiGLU)

Choices where the paper leaves room (README, "Differences"):
- Every channel goes through `ops.hstu_attention.hstu_attention`, so on CUDA the
  fused Triton kernel runs each of them: the semantic channel without bias; the
  temporal (positional) channel with all-zero q and k (width 1) and the
  positional (temporal) table held at zero, so its scores are the bias alone.
  This makes the two bias channels' weights SiLU(bias) / N, the same pointwise
  normalisation as the semantic channel (the paper writes the weights as the
  learned relative functions; SiLU and 1/N are this implementation's).
- The time buckets and the bias indexing are HSTU's (ops/time_buckets.py,
  ops/hstu_attention.py): the query's timestamp is the next position's, and
  the tables are per layer, initialised N(0, 0.02) as HSTU's.
- The three channels share one value projection; each channel's output is
  RMSNorm-ed on its own before the gate u (h dv wide per channel).
- RMSNorm has no learned scale (as the project's HSTU layer norm has none),
  eps 1e-6. W1 has a bias and Xavier-uniform init (as HSTU's output
  projection); the SwiGLU projections have no bias and PyTorch's default init.
- Dropout (`linear_dropout_rate`) on stage 1's input (HSTU's place) and on the
  SwiGLU hidden activations.
"""

from __future__ import annotations

from typing import List

import gin
import torch
import torch.nn.functional as F
from torch import nn

from generative_recommenders.config import check_one_of, check_positive, check_rate
from ops.hstu_attention import NUM_TIME_BUCKETS, hstu_attention, triton_available
from ops.jagged import dense_to_jagged

EPS = 1e-6


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, no learned scale."""
    return F.rms_norm(x, (x.shape[-1],), eps=EPS)


class FuXiLayer(nn.Module):
    """One FuXi-alpha block: AMS (semantic, temporal, positional channels) and the two-stage MFFN."""

    CHANNELS = 3

    def __init__(self, dim: int, num_heads: int, dqk: int, dv: int, ffn_hidden_dim: int, max_seq_len: int,
                 linear_dropout_rate: float, attention_kernel: str = "auto") -> None:
        super().__init__()
        self.num_heads, self.dqk, self.dv = num_heads, dqk, dv
        self.max_seq_len = max_seq_len
        self.attention_kernel = attention_kernel
        width = num_heads * (self.CHANNELS * dv + dv + 2 * dqk)
        self.uvqk = nn.Parameter(torch.empty(dim, width).normal_(0.0, 0.02))
        self.ts_w = nn.Parameter(torch.empty(NUM_TIME_BUCKETS + 1).normal_(0.0, 0.02))
        self.pos_w = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(0.0, 0.02))
        # The table a bias channel does not use, held at zero (see the module docstring).
        self.register_buffer("zero_ts_w", torch.zeros(NUM_TIME_BUCKETS + 1), persistent=False)
        self.register_buffer("zero_pos_w", torch.zeros(2 * max_seq_len - 1), persistent=False)
        self.stage1 = nn.Linear(self.CHANNELS * num_heads * dv, dim)
        nn.init.xavier_uniform_(self.stage1.weight)
        self.gate = nn.Linear(dim, ffn_hidden_dim, bias=False)
        self.up = nn.Linear(dim, ffn_hidden_dim, bias=False)
        self.down = nn.Linear(ffn_hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(linear_dropout_rate)

    def channels(self, x: torch.Tensor, seq_offsets: torch.Tensor, timestamps: torch.Tensor
                 ) -> List[torch.Tensor]:
        """The gate u (L, 3 h dv) and the semantic, temporal and positional outputs (L, h, dv) of x (L, D)."""
        h, dqk, dv = self.num_heads, self.dqk, self.dv
        u, v, q, k = torch.split(F.silu(rms_norm(x) @ self.uvqk), [self.CHANNELS * h * dv, h * dv, h * dqk, h * dqk],
                                 dim=-1)
        v = v.reshape(-1, h, dv)
        zero_qk = v.new_zeros(v.shape[0], h, 1)

        def attend(q_, k_, ts_w, pos_w):
            return hstu_attention(q_, k_, v, seq_offsets, self.max_seq_len, None if ts_w is None else timestamps,
                                  ts_w, pos_w, kernel=self.attention_kernel)

        semantic = attend(q.reshape(-1, h, dqk), k.reshape(-1, h, dqk), None, None)
        temporal = attend(zero_qk, zero_qk, self.ts_w, self.zero_pos_w)
        positional = attend(zero_qk, zero_qk, self.zero_ts_w, self.pos_w)
        return [u, semantic, temporal, positional]

    def forward(self, x: torch.Tensor, seq_offsets: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """x: (L, D) jagged; timestamps: (B, N), position `length` the target's. Returns (L, D)."""
        u, *outputs = self.channels(x, seq_offsets, timestamps)
        h = u * torch.cat([rms_norm(o.flatten(1)) for o in outputs], dim=-1)
        x = x + self.stage1(self.dropout(h))
        z = rms_norm(x)
        return x + self.down(self.dropout(F.silu(self.gate(z)) * self.up(z)))


@gin.configurable("fuxi_encoder")
class FuXiEncoder(nn.Module):
    """A stack of FuXi-alpha blocks; dense padded input in, jagged output out."""

    def __init__(
        self,
        dim: int,
        max_seq_len: int,
        num_blocks: int = gin.REQUIRED,
        num_heads: int = gin.REQUIRED,
        dqk: int = gin.REQUIRED,
        dv: int = gin.REQUIRED,
        ffn_hidden_dim: int = gin.REQUIRED,
        linear_dropout_rate: float = 0.0,
        attention_kernel: str = "auto",
    ) -> None:
        super().__init__()
        check_positive("fuxi_encoder", num_blocks=num_blocks, num_heads=num_heads, dqk=dqk, dv=dv,
                       ffn_hidden_dim=ffn_hidden_dim)
        check_rate("fuxi_encoder", linear_dropout_rate=linear_dropout_rate)
        check_one_of("fuxi_encoder.attention_kernel", attention_kernel, ("auto", "triton", "torch"))
        self.attention_kernel = attention_kernel
        self.layers = nn.ModuleList(
            FuXiLayer(dim, num_heads, dqk, dv, ffn_hidden_dim, max_seq_len, linear_dropout_rate, attention_kernel)
            for _ in range(num_blocks)
        )

    def graph_safe(self, device: torch.device) -> bool:
        """Graph-capturable when every channel runs the fused kernel (the PyTorch path syncs with the host)."""
        return self.attention_kernel == "triton" or (self.attention_kernel == "auto" and triton_available(device))

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, seq_offsets: torch.Tensor, total: int, timestamps: torch.Tensor,
    ) -> torch.Tensor:
        """x: (B, N, D) padded input; returns the (total, D) jagged outputs of valid positions."""
        x = dense_to_jagged(x, seq_offsets, total)
        for layer in self.layers:
            x = layer(x, seq_offsets, timestamps)
        return x
