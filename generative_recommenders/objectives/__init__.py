"""Training objectives: which positions of a batch are supervised, with which labels, and the query each
evaluation ranks with. The encoder decides: causal encoders learn next-item prediction, bidirectional ones
(BERT4Rec) the cloze task."""

from __future__ import annotations

from typing import Protocol

import torch

from generative_recommenders.data.samples import Batch
from generative_recommenders.objectives.cloze import ClozeObjective
from generative_recommenders.objectives.losses import RetrievalLoss
from generative_recommenders.objectives.next_item import NextItemObjective


class Objective(Protocol):
    def loss(self, train_model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Forward pass through train_model (the model or its DDP wrapper) and the batch's loss."""

    def query(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, D) user embeddings that rank the candidates for each row's target (never reading it)."""


def make_objective(model: torch.nn.Module, loss: RetrievalLoss, mask_prob: float) -> Objective:
    if model.mask_id is None:
        return NextItemObjective(model, loss)
    return ClozeObjective(model, loss, mask_prob)


__all__ = ["Objective", "make_objective", "ClozeObjective", "NextItemObjective", "RetrievalLoss"]
