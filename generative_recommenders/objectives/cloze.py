"""The cloze objective of BERT4Rec (REFERENCE.md section 12).

Training: the sequence is the history plus its target; each of its items is
replaced by [MASK] (an id outside the item range) with probability
`mask_prob`, at least one per sequence (the last item when the draw masks
none), and the loss is taken on the masked positions only, whose labels are
the original ids. Evaluation: [MASK] takes the target's place after the
history, and its output ranks the candidates.
"""

from __future__ import annotations

import torch

from generative_recommenders.data.samples import Batch
from generative_recommenders.objectives.losses import RetrievalLoss
from ops.jagged import jagged_values


class ClozeObjective:
    def __init__(self, model: torch.nn.Module, loss: RetrievalLoss, mask_prob: float) -> None:
        self.model, self.retrieval_loss, self.mask_prob = model, loss, mask_prob
        self.mask_id = model.mask_id

    def mask(self, batch: Batch) -> torch.Tensor:
        """(B, N) bool: the positions to mask among the lengths + 1 items of each row."""
        positions = torch.arange(batch.ids.shape[1], device=batch.ids.device)
        last = batch.lengths.unsqueeze(1)  # the target's position
        drawn = (torch.rand(batch.ids.shape, device=batch.ids.device) < self.mask_prob) & (positions <= last)
        return drawn | (~drawn.any(1, keepdim=True) & (positions == last))

    def loss(self, train_model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        masked = self.mask(batch)
        inputs = torch.where(masked, self.mask_id, batch.ids)
        total = batch.total + batch.ids.shape[0]  # every row encodes its target's position too
        out, offsets = train_model(inputs, batch.timestamps, batch.lengths + 1, total)
        labels = torch.where(masked, batch.ids, 0)
        positive_ids = jagged_values(labels, offsets, out.shape[0])
        return self.retrieval_loss(out, positive_ids, self.model.item_vectors, item_table=self.model.item_table())

    def query(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        positions = torch.arange(batch.ids.shape[1], device=batch.ids.device)
        inputs = torch.where(positions == batch.lengths.unsqueeze(1), self.mask_id, batch.ids)
        out, offsets = model(inputs, batch.timestamps, batch.lengths + 1, batch.total + batch.ids.shape[0])
        return out[offsets[:-1] + batch.lengths]
