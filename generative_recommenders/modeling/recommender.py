"""The sequential recommender: item table -> input -> encoder -> normalised user embeddings.

Every encoder (one module each under modeling/) shares the item table, the
input module and the output normalisation here; adding one means one file
and one entry in ENCODERS. An encoder declares CAUSAL (bidirectional
encoders get a [MASK] row in the item table and the cloze objective) and
USES_POSITIONS (whether the input adds learned absolute positions).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from generative_recommenders.config import ConfigError
from generative_recommenders.modeling.bert4rec import BERT4RecEncoder
from generative_recommenders.modeling.embeddings import InputPreprocessor, ItemEmbedding, ItemTable, normalize_output
from generative_recommenders.modeling.fuxi import FuXiEncoder
from generative_recommenders.modeling.gru4rec import GRU4RecEncoder
from generative_recommenders.modeling.hstu import HSTUEncoder
from generative_recommenders.modeling.sasrec import SASRecEncoder
from ops.jagged import complete_cumsum

ENCODERS = {"HSTU": HSTUEncoder, "SASRec": SASRecEncoder, "GRU4Rec": GRU4RecEncoder, "BERT4Rec": BERT4RecEncoder,
            "FuXi": FuXiEncoder}


def _build_encoder(encoder_type: str, encoder_class, dim: int, max_seq_len: int) -> nn.Module:
    try:
        return encoder_class(dim=dim, max_seq_len=max_seq_len)
    except RuntimeError as exc:
        if "Required bindings" not in str(exc):
            raise
        # gin names the encoder's missing hyperparameters; say where a complete set is.
        example = f"configs/synthetic/{encoder_type.lower()}-default.gin"
        raise ConfigError(f"train_fn.main_module = {encoder_type!r} needs its encoder's settings: {exc}; "
                          f"copy them from {example}") from None


def build_backbone(encoder_type: str, max_item_id: int, max_seq_len: int, dim: int, dropout_rate: float,
                   mask_token: bool = False) -> Tuple[ItemEmbedding, InputPreprocessor, nn.Module]:
    """The item table (plus a [MASK] row if asked), the input module and the encoder, initialised as the release."""
    if encoder_type not in ENCODERS:
        raise ConfigError(f"train_fn.main_module must be one of {', '.join(ENCODERS)}; got {encoder_type!r}")
    encoder_class = ENCODERS[encoder_type]
    item_embedding = ItemEmbedding(max_item_id + mask_token, dim)
    input_preproc = InputPreprocessor(max_seq_len, dim, dropout_rate,
                                      positions=getattr(encoder_class, "USES_POSITIONS", True))
    encoder = _build_encoder(encoder_type, encoder_class, dim, max_seq_len)
    if encoder_type in ("HSTU", "FuXi"):
        # The release re-initialises everything outside the HSTU stack and the
        # item table (i.e. the position table) with Xavier normal; FuXi-alpha follows HSTU here.
        nn.init.xavier_normal_(input_preproc.position.weight)
    return item_embedding, input_preproc, encoder


def pad_lengths(lengths: torch.Tensor, capacity: int, total: int) -> torch.Tensor:
    """Lengths grown to sum to `total` (<= B * capacity), filling sequences in order; no host sync."""
    room = capacity - lengths
    room_before = torch.cumsum(room, 0) - room
    extra = (total - lengths.sum() - room_before).clamp(min=0).minimum(room)
    return lengths + extra


class SequentialRecommender(nn.Module):
    """Encodes padded histories into one normalised query per valid position."""

    def __init__(
        self,
        encoder_type: str,
        max_item_id: int,
        max_seq_len: int,
        item_embedding_dim: int,
        dropout_rate: float,
        user_embedding_norm: str = "l2_norm",
        item_l2_norm: bool = True,
        l2_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.user_embedding_norm = user_embedding_norm
        self.item_l2_norm, self.l2_norm_eps = item_l2_norm, l2_norm_eps
        self.padded_layout = False  # see use_padded_layout
        normalize_output(torch.zeros(1, 2), user_embedding_norm)  # fail early on a bad name
        # Bidirectional encoders read a [MASK] token: one more row, never a candidate.
        causal = getattr(ENCODERS.get(encoder_type), "CAUSAL", True)
        self.mask_id: Optional[int] = None if causal else max_item_id + 1
        self.item_embedding, self.input_preproc, self.encoder = build_backbone(
            encoder_type, max_item_id, max_seq_len, item_embedding_dim, dropout_rate, mask_token=not causal)

    def item_vectors(self, ids: Union[torch.Tensor, slice]) -> torch.Tensor:
        """The item embeddings queries are scored against, in training and evaluation alike."""
        embeddings = self.item_embedding(ids)
        return F.normalize(embeddings, dim=-1, eps=self.l2_norm_eps) if self.item_l2_norm else embeddings

    def item_table(self) -> ItemTable:
        """The raw table item_vectors reads, and its normalisation eps (for the loss kernels that normalise rows)."""
        return ItemTable(self.item_embedding.table.weight, self.l2_norm_eps if self.item_l2_norm else None)

    def use_padded_layout(self, device: torch.device) -> bool:
        """Switches to the padded layout when the model can run as a CUDA graph on `device`; returns whether.

        A captured step reuses the shapes of its capture, so graphs need a
        batch's token count to be one of a few static values: under the padded
        layout the sequences are padded up to the `total` the caller gives.
        """
        graph_safe = getattr(self.encoder, "graph_safe", lambda _: True)(device)
        self.padded_layout = device.type == "cuda" and graph_safe
        return self.padded_layout

    def forward(
        self, ids: torch.Tensor, timestamps: torch.Tensor, lengths: torch.Tensor, total: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids, timestamps: (B, N); lengths: (B,) valid prefix lengths.

        Returns the (L, D) user embeddings of positions 0..length-1 of every
        sequence and their offsets (B + 1). `total` = sum(lengths) saves a
        device-to-host sync when the caller knows it.

        With `padded_layout`, `total` (at least sum(lengths); capped at, and by
        default, B * N) is a static token count: sequences are lengthened
        with padding positions until they hold `total` together (see
        pad_lengths). Causal attention keeps the padding invisible to valid
        positions, and bidirectional encoders mask padded keys by id, so
        valid outputs are the same; the extra positions carry label 0 and get
        no loss weight.
        """
        if self.padded_layout:
            full = lengths.numel() * ids.shape[1]
            total = full if total is None else min(total, full)
            lengths = pad_lengths(lengths, ids.shape[1], total)
        offsets = complete_cumsum(lengths)
        if total is None:
            total = int(offsets[-1].item())
        x = self.input_preproc(ids, self.item_embedding(ids))
        out = self.encoder(x, ids, offsets, total, timestamps)
        return normalize_output(out, self.user_embedding_norm), offsets
