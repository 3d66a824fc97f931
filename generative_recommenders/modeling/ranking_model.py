"""Generative ranking model (issue 12): an encoder over interleaved item/action tokens, plus task heads.

Inputs are the interleaved tokens of data/ranking.py: item tokens embed with
the item table, action tokens with a table of the five ratings; both get the
absolute position embedding of InputPreprocessor, with every candidate at the
first candidate position (M-FALCON, ops/targets.py). The encoder is HSTU
(relative position and time bias over the interleaved positions) or SASRec.
Heads read the encoder output at candidate positions (modeling/heads.py); the
L2-normalised output at item positions serves the optional next-item loss.

Histories can also be encoded once with their per-layer keys and values kept
(`encode_history`, HSTU only), and candidates then scored against them in
microbatches (`encode_candidates`, inference/m_falcon.py).
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from generative_recommenders.config import ConfigError
from generative_recommenders.data.ranking import NUM_ACTIONS, RankingBatch
from generative_recommenders.modeling.embeddings import ItemTable, normalize_output, truncated_normal_
from generative_recommenders.modeling.heads import TaskHeads
from generative_recommenders.modeling.hstu import HSTUEncoder, PrefixCache
from generative_recommenders.modeling.recommender import build_backbone
from ops.jagged import complete_cumsum
from ops.targets import effective_positions, prefix_lengths


ITEM_L2_NORM_EPS = 1e-6
RANKING_ENCODERS = ("HSTU", "SASRec")  # the encoders that take the M-FALCON candidate mask


def _full_width(timestamps: torch.Tensor, width: int) -> torch.Tensor:
    """(B, >= width) timestamps, the last column repeated: the attention reads up to column max_seq_len - 1."""
    missing = width - timestamps.shape[1]
    if missing <= 0:
        return timestamps
    return torch.cat([timestamps, timestamps[:, -1:].expand(-1, missing)], dim=1)


class RankingModel(nn.Module):
    def __init__(
        self,
        encoder_type: str,
        max_item_id: int,
        max_seq_len: int,
        item_embedding_dim: int,
        dropout_rate: float,
        head_hidden_dim: int = 64,
        rating_head: str = "classification",
    ) -> None:
        super().__init__()
        if encoder_type not in RANKING_ENCODERS:
            raise ConfigError(f"train_fn.main_module must be one of {', '.join(RANKING_ENCODERS)} for ranking; "
                              f"got {encoder_type!r}")
        self.max_seq_len = max_seq_len
        self.item_embedding, self.input_preproc, self.encoder = build_backbone(
            encoder_type, max_item_id, max_seq_len, item_embedding_dim, dropout_rate)
        self.action_embedding = nn.Embedding(NUM_ACTIONS + 1, item_embedding_dim, padding_idx=0)
        truncated_normal_(self.action_embedding.weight.data, std=0.02)
        self.heads = TaskHeads(item_embedding_dim, head_hidden_dim, rating_head)

    def embed(self, item_ids: torch.Tensor, action_ids: torch.Tensor, valid: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        """(B, n, D) encoder input: the action's embedding at action tokens (action id > 0), else the item's."""
        tokens = torch.where((action_ids > 0).unsqueeze(-1), self.action_embedding(action_ids),
                             self.item_embedding(item_ids))
        return self.input_preproc(valid.long(), tokens, positions)

    def forward(self, batch: RankingBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs (L, D) of every token of the batch (jagged) and their offsets (B + 1)."""
        n = batch.item_ids.shape[1]
        valid = torch.arange(n, device=batch.lengths.device)[None, :] < batch.lengths[:, None]
        prefix = batch.lengths if batch.num_targets is None else prefix_lengths(batch.lengths, batch.num_targets)
        x = self.embed(batch.item_ids, batch.action_ids, valid, effective_positions(n, prefix))
        offsets = complete_cumsum(batch.lengths)
        out = self.encoder(x, valid.long(), offsets, batch.total, _full_width(batch.timestamps, self.max_seq_len),
                           batch.num_targets)
        return out, offsets

    def item_vectors(self, ids: Union[torch.Tensor, slice]) -> torch.Tensor:
        """L2-normalised item embeddings: what the next-item loss scores the queries against."""
        return F.normalize(self.item_embedding(ids), dim=-1, eps=ITEM_L2_NORM_EPS)

    def item_table(self) -> ItemTable:
        """The raw table item_vectors reads, and its normalisation eps (for the loss kernels that normalise rows)."""
        return ItemTable(self.item_embedding.table.weight, ITEM_L2_NORM_EPS)

    @staticmethod
    def retrieval_queries(out: torch.Tensor) -> torch.Tensor:
        """L2-normalised outputs: the queries of the next-item (retrieval) loss."""
        return normalize_output(out, "l2_norm")

    def encode_history(self, batch: RankingBatch) -> PrefixCache:
        """Encodes histories (a batch without candidates) once; HSTU's per-layer keys and values."""
        if not isinstance(self.encoder, HSTUEncoder):
            raise TypeError("a history cache needs the HSTU encoder; score SASRec with the plain mask instead")
        if batch.num_targets is not None:
            raise ValueError("encode_history takes histories only (samples without candidates)")
        n = batch.item_ids.shape[1]
        pos = torch.arange(n, device=batch.lengths.device)[None, :]
        valid = pos < batch.lengths[:, None]
        x = self.embed(batch.item_ids, batch.action_ids, valid, pos.expand(batch.lengths.shape[0], -1))
        _, cache = self.encoder.encode_prefix(x, complete_cumsum(batch.lengths), batch.total,
                                              _full_width(batch.timestamps, self.max_seq_len))
        return cache

    def encode_candidates(self, cache: PrefixCache, item_ids: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """(B, T) candidates after the cached histories -> (B, T, D) outputs, each as if it alone followed."""
        positions = cache.lengths[:, None].expand_as(item_ids)
        x = self.embed(item_ids, torch.zeros_like(item_ids), torch.ones_like(item_ids, dtype=torch.bool), positions)
        return self.encoder.encode_targets(x, cache, timestamps)
