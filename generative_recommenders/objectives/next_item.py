"""Next-item prediction (REFERENCE.md section 3): position i of the history predicts the id at i + 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from generative_recommenders.data.samples import Batch
from generative_recommenders.objectives.losses import RetrievalLoss
from ops.jagged import jagged_values


class NextItemObjective:
    """Every history position is supervised by the next id; the last position's label is the target."""

    def __init__(self, model: torch.nn.Module, loss: RetrievalLoss) -> None:
        self.model, self.retrieval_loss = model, loss

    def loss(self, train_model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        out, offsets = train_model(batch.ids, batch.timestamps, batch.lengths, batch.total)
        labels = F.pad(batch.ids[:, 1:], (0, 1))
        positive_ids = jagged_values(labels, offsets, out.shape[0])
        return self.retrieval_loss(out, positive_ids, self.model.item_vectors, item_table=self.model.item_table())

    def query(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # Causal encoders: the output at the last history position never saw the target at `lengths`.
        out, offsets = model(batch.ids, batch.timestamps, batch.lengths, batch.total)
        return out[offsets[:-1] + batch.lengths - 1]
