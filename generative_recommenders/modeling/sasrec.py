"""SASRec baseline encoder on dense padded sequences (REFERENCE.md section 6)."""

from __future__ import annotations

from typing import Optional

import gin
import torch
import torch.nn.functional as F
from torch import nn

from generative_recommenders.config import ConfigError, check_one_of, check_positive, check_rate
from ops.jagged import dense_to_jagged
from ops.layer_norm import layer_norm
from ops.targets import prefix_lengths, visible_keys

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class PointwiseFeedForward(nn.Module):
    """z + Dropout(Conv1x1(Dropout(act(Conv1x1(z))))); a 1x1 conv is a Linear."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, dropout_rate: float) -> None:
        super().__init__()
        self.inner = nn.Linear(dim, hidden_dim)
        self.outer = nn.Linear(hidden_dim, dim)
        self.activation = _ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.dropout(self.outer(self.dropout(self.activation(self.inner(z)))))


class SASRecBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_hidden_dim: int, activation: str, dropout_rate: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout_rate, batch_first=True)
        self.ffn = PointwiseFeedForward(dim, ffn_hidden_dim, activation, dropout_rate)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor, valid: torch.Tensor, is_causal: bool) -> torch.Tensor:
        """is_causal: `causal_mask` is the plain causal mask, so attention may apply it by position (SDPA's
        is_causal: no mask tensor read, and its flash / memory-efficient kernels' causal path)."""
        query = layer_norm(x, 1e-8)
        attended, _ = self.attention(query, x, x, attn_mask=causal_mask, need_weights=False, is_causal=is_causal)
        x = self.ffn(layer_norm(query + attended, 1e-8))
        return x * valid


@gin.configurable("sasrec_encoder")
class SASRecEncoder(nn.Module):
    """Self-attentive sequential recommendation encoder (Kang & McAuley, 2018)."""

    def __init__(
        self,
        dim: int,
        max_seq_len: int,
        num_blocks: int = gin.REQUIRED,
        num_heads: int = gin.REQUIRED,
        ffn_hidden_dim: int = gin.REQUIRED,
        ffn_activation_fn: str = "relu",
        ffn_dropout_rate: float = 0.2,
    ) -> None:
        super().__init__()
        check_positive("sasrec_encoder", num_blocks=num_blocks, num_heads=num_heads, ffn_hidden_dim=ffn_hidden_dim)
        check_rate("sasrec_encoder", ffn_dropout_rate=ffn_dropout_rate)
        check_one_of("sasrec_encoder.ffn_activation_fn", ffn_activation_fn, _ACTIVATIONS)
        if dim % num_heads:
            raise ConfigError(f"item_embedding_dim {dim} must be divisible by sasrec_encoder.num_heads {num_heads}")
        self.num_heads = num_heads
        self.blocks = nn.ModuleList(
            SASRecBlock(dim, num_heads, ffn_hidden_dim, ffn_activation_fn, ffn_dropout_rate)
            for _ in range(num_blocks)
        )
        for param in self.parameters():
            if param.dim() >= 2:
                nn.init.xavier_normal_(param)

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, seq_offsets: torch.Tensor, total: int,
        timestamps: torch.Tensor, num_targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (B, N, D) padded input; returns the (L, D) jagged outputs of valid positions.

        num_targets (B,): the last num_targets[b] positions only see the prefix
        before them and themselves (M-FALCON's mask, ops/targets.py).
        """
        n = x.shape[1]
        if num_targets is None:
            causal_mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        else:  # one (n, n) mask per sequence and head; True = hidden
            hidden = ~visible_keys(n, prefix_lengths(seq_offsets[1:] - seq_offsets[:-1], num_targets))
            causal_mask = hidden.repeat_interleave(self.num_heads, dim=0)
        valid = (ids != 0).unsqueeze(-1).to(x.dtype)
        for block in self.blocks:
            x = block(x, causal_mask, valid, is_causal=num_targets is None)
        return dense_to_jagged(x, seq_offsets, total)
