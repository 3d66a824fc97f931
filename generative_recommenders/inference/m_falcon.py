"""M-FALCON candidate scoring (paper section 3.4, issue 12).

The m candidates of each user are scored in ceil(m / b_m) microbatches of b_m.
Every candidate is encoded as if it alone followed the user's history
(ops/targets.py), so its scores depend neither on b_m nor on the other
candidates: they equal those of one forward pass per candidate.

- cached (HSTU): the history is encoded once, keeping every layer's keys and
  values (history tokens never attend to candidates, so these are the same
  for every microbatch); a microbatch then costs O(b_m n d) attention per
  layer (`RankingModel.encode_candidates`).
- plain mask (any encoder; SASRec's path): each microbatch is one forward
  pass over [history, b_m candidates] with num_targets = b_m, O((n + b_m)^2 d).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from generative_recommenders.data.ranking import RankingBatch
from generative_recommenders.modeling.hstu import HSTUEncoder, PrefixCache
from generative_recommenders.modeling.ranking_model import RankingModel


def append_candidates(history: RankingBatch, item_ids: torch.Tensor, timestamps: torch.Tensor) -> RankingBatch:
    """[history, T candidates] per row as one batch with num_targets = T; no labels (inference)."""
    batch, num = item_ids.shape
    columns = history.lengths[:, None] + torch.arange(num, device=item_ids.device)[None, :]

    def place(dense: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(dense, (0, num)).scatter(1, columns, values)

    item = place(history.item_ids, item_ids)
    return RankingBatch(
        item_ids=item,
        action_ids=torch.nn.functional.pad(history.action_ids, (0, num)),
        timestamps=place(history.timestamps, timestamps),
        lengths=history.lengths + num,
        num_targets=torch.full_like(history.lengths, num),
        ratings=torch.zeros(item.shape, device=item.device),
        next_item=torch.zeros_like(item),
        total=history.total + batch * num,
    )


class MFalconScorer:
    """Head outputs for (B, m) candidates after B histories, b_m candidates per pass."""

    def __init__(self, model: RankingModel, microbatch_size: int, use_cache: Optional[bool] = None) -> None:
        if microbatch_size < 1:
            raise ValueError(f"microbatch_size must be >= 1, got {microbatch_size}")
        hstu = isinstance(model.encoder, HSTUEncoder)
        if use_cache and not hstu:
            raise ValueError("the history key/value cache needs the HSTU encoder")
        self.model = model
        self.microbatch_size = microbatch_size
        self.use_cache = hstu if use_cache is None else use_cache

    def _microbatch(self, history: RankingBatch, cache: Optional[PrefixCache], item_ids: torch.Tensor,
                    timestamps: torch.Tensor) -> Dict[str, torch.Tensor]:
        if cache is not None:
            out = self.model.encode_candidates(cache, item_ids, timestamps)
        else:
            flat, offsets = self.model(append_candidates(history, item_ids, timestamps))
            slots = torch.arange(item_ids.shape[1], device=item_ids.device)
            out = flat[offsets[:-1, None] + history.lengths[:, None] + slots[None, :]]
        return self.model.heads(out)

    @torch.no_grad()
    def __call__(self, history: RankingBatch, item_ids: torch.Tensor,
                 timestamps: torch.Tensor) -> Dict[str, torch.Tensor]:
        """history: a batch of histories (samples without candidates); item_ids, timestamps: (B, m)
        candidates. Returns {"liked": (B, m), "rating": (B, m[, 5])}."""
        was_training = self.model.training
        self.model.eval()
        cache = self.model.encode_history(history) if self.use_cache else None
        parts = [
            self._microbatch(history, cache, item_ids[:, s:s + self.microbatch_size],
                             timestamps[:, s:s + self.microbatch_size])
            for s in range(0, item_ids.shape[1], self.microbatch_size)
        ]
        self.model.train(was_training)
        return {name: torch.cat([p[name] for p in parts], dim=1) for name in parts[0]}
