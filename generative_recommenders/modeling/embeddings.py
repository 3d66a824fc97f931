"""Item table (and its raw view for the losses), input preprocessing, output normalisation: shared by all encoders."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from generative_recommenders.config import ConfigError
from ops.layer_norm import layer_norm


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """In-place normal(0, std) truncated at +/- 2 std."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class ItemEmbedding(nn.Module):
    """(max_item_id + 1) x D table; row 0 is padding and gets no gradient."""

    def __init__(self, max_item_id: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(max_item_id + 1, dim, padding_idx=0)
        truncated_normal_(self.table.weight.data, std=0.02)

    @property
    def dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, ids: Union[torch.Tensor, slice]) -> torch.Tensor:
        """Rows of `ids`; a slice of consecutive ids (a whole catalog) is a view of the table, whose
        backward is a copy into the table's gradient instead of the sort-based scatter of a lookup."""
        return self.table.weight[ids] if isinstance(ids, slice) else self.table(ids)


@dataclasses.dataclass
class ItemTable:
    """The raw embedding table behind item_vectors, and the eps of its L2 normalisation (None: none).

    With it, the sampled-negatives kernel normalises only the rows it gathers,
    and the loss's gradient lands in the raw rows: no normalised copy of the
    whole table (for Books 695,762 x 64) is written, read and differentiated.
    """

    weight: torch.Tensor
    eps: Optional[float]


class InputPreprocessor(nn.Module):
    """x = item_emb * sqrt(D) (+ position_emb), dropout, zeroed where id == 0.

    Recurrent encoders know the order without learned positions (positions=False).
    """

    def __init__(self, max_seq_len: int, dim: int, dropout_rate: float, positions: bool = True) -> None:
        super().__init__()
        self.position = nn.Embedding(max_seq_len, dim) if positions else None
        if self.position is not None:
            truncated_normal_(self.position.weight.data, std=math.sqrt(1.0 / dim))
        self.dropout = nn.Dropout(dropout_rate)
        self.scale = math.sqrt(dim)

    def forward(
        self, ids: torch.Tensor, item_embeddings: torch.Tensor, positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """ids (B, n) (0 = padding); positions (B, n) default 0..n-1 (M-FALCON targets share one)."""
        x = item_embeddings * self.scale
        if self.position is not None:
            n = ids.shape[1]
            x = x + (self.position.weight[:n].unsqueeze(0) if positions is None else self.position(positions))
        return self.dropout(x) * (ids != 0).unsqueeze(-1).to(x.dtype)


def normalize_output(x: torch.Tensor, kind: str, eps: float = 1e-6) -> torch.Tensor:
    """User embedding post-processing: "l2_norm" or parameter-free "layer_norm"."""
    if kind == "l2_norm":
        return F.normalize(x, p=2.0, dim=-1, eps=eps)
    if kind == "layer_norm":
        return layer_norm(x, eps)
    raise ConfigError(f"train_fn.user_embedding_norm must be one of l2_norm, layer_norm; got {kind!r}")
