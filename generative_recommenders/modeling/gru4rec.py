"""GRU4Rec baseline encoder (Hidasi et al.; the setting of REFERENCE.md section 12).

A unidirectional GRU over the dense padded sequence. Sequences are
left-aligned, so the output at position i depends on positions 0..i only:
padding after the valid prefix never reaches a valid output, and no packing
(which needs the lengths on the host) is required.
"""

from __future__ import annotations

from typing import Optional

import gin
import torch
from torch import nn

from generative_recommenders.config import check_positive, check_rate
from ops.jagged import dense_to_jagged


@gin.configurable("gru4rec_encoder")
class GRU4RecEncoder(nn.Module):
    """nn.GRU, plus a Linear back to D when hidden_dim != D (outputs are scored against the item table)."""

    CAUSAL = True  # output i predicts the item at i + 1
    USES_POSITIONS = False  # the recurrence already knows the order

    def __init__(
        self,
        dim: int,
        max_seq_len: int,  # part of the encoder interface; a GRU has no length limit
        num_layers: int = 1,
        hidden_dim: Optional[int] = None,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = dim if hidden_dim is None else hidden_dim
        check_positive("gru4rec_encoder", num_layers=num_layers, hidden_dim=hidden)
        check_rate("gru4rec_encoder", dropout_rate=dropout_rate)
        # nn.GRU applies its dropout between layers only (and warns when there is one layer).
        self.gru = nn.GRU(dim, hidden, num_layers, batch_first=True,
                          dropout=dropout_rate if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout_rate)
        # Outputs are scored against the D-wide item table, so project back when widths differ.
        self.project = nn.Linear(hidden, dim) if hidden != dim else nn.Identity()
        # Weights keep nn.GRU's default uniform(+-1/sqrt(hidden)) init, as the
        # baseline of Klenitskiy & Vasilev (a plain nn.GRU) did.

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, seq_offsets: torch.Tensor, total: int,
        timestamps: torch.Tensor,
    ) -> torch.Tensor:
        """x: (B, N, D) padded input; returns the (total, D) jagged outputs of valid positions."""
        out, _ = self.gru(x)
        # Jagged first: dropout and projection then touch only the valid rows.
        return self.project(self.dropout(dense_to_jagged(out, seq_offsets, total)))
