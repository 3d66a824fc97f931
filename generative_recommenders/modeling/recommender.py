"""The full sequential recommender: item table -> input -> encoder -> normalised user embeddings."""

from __future__ import annotations

from typing import Optional, Tuple

import gin
import torch
from torch import nn

from generative_recommenders.modeling.embeddings import InputPreprocessor, ItemEmbedding, normalize_output
from generative_recommenders.modeling.hstu import HSTUEncoder
from generative_recommenders.modeling.sasrec import SASRecEncoder
from ops.jagged import complete_cumsum

ENCODERS = {"HSTU": HSTUEncoder, "SASRec": SASRecEncoder}


class SequentialRecommender(nn.Module):
    """Encodes padded histories into one L2-normalised query per valid position."""

    def __init__(
        self,
        encoder_type: str,
        max_item_id: int,
        max_seq_len: int,
        item_embedding_dim: int,
        dropout_rate: float,
        user_embedding_norm: str = "l2_norm",
        padded_layout: bool = False,
    ) -> None:
        super().__init__()
        self.padded_layout = padded_layout
        if encoder_type not in ENCODERS:
            raise ValueError(f"train_fn.main_module must be one of {sorted(ENCODERS)}, got {encoder_type!r}")
        self.max_seq_len = max_seq_len
        self.user_embedding_norm = user_embedding_norm
        normalize_output(torch.zeros(1, 2), user_embedding_norm)  # fail early on a bad name
        self.item_embedding = ItemEmbedding(max_item_id, item_embedding_dim)
        self.input_preproc = InputPreprocessor(max_seq_len, item_embedding_dim, dropout_rate)
        self.encoder = ENCODERS[encoder_type](dim=item_embedding_dim, max_seq_len=max_seq_len)
        if encoder_type == "HSTU":
            # The release re-initialises everything outside the HSTU stack and the
            # item table (i.e. the position table) with Xavier normal.
            nn.init.xavier_normal_(self.input_preproc.position.weight)

    def graph_safe(self, device: torch.device) -> bool:
        """Whether a training step can be captured in a CUDA graph (no host syncs inside)."""
        return not isinstance(self.encoder, HSTUEncoder) or self.encoder.uses_triton(device)

    def forward(
        self, ids: torch.Tensor, timestamps: torch.Tensor, lengths: torch.Tensor, total: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids, timestamps: (B, N); lengths: (B,) history lengths.

        Returns the (L, D) user embeddings of positions 0..length-1 of every
        sequence (position i predicts the id at i + 1) and their offsets (B + 1).
        `total` = sum(lengths) saves a device-to-host sync when the caller knows it.

        With `padded_layout` every sequence is encoded at its full padded
        length N (L = B * N, static shapes for CUDA graphs). Causal attention
        keeps the padding invisible to valid positions, so their outputs are the
        same; the extra positions carry label 0 and get no loss weight.
        """
        if self.padded_layout:
            lengths = torch.full_like(lengths, ids.shape[1])
            total = lengths.numel() * ids.shape[1]
        offsets = complete_cumsum(lengths)
        if total is None:
            total = int(offsets[-1].item())
        x = self.input_preproc(ids, self.item_embedding(ids))
        out = self.encoder(x, ids, offsets, total, timestamps)
        return normalize_output(out, self.user_embedding_norm), offsets
