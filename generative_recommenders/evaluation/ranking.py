"""Ranking evaluation (issue 12): a generative ranking model scored on a split's held-out candidates.

Each sample is a history followed by its k held-out candidates (data/ranking.py),
encoded in one pass with the M-FALCON mask, so every candidate is scored as if
it alone followed the history. Predictions stay on the device until the
metrics (evaluation/metrics.py) are computed over the whole split.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from generative_recommenders.data.ranking import RankingBatch, RankingSequences, sample_lengths
from generative_recommenders.modeling.ranking_model import RankingModel
from generative_recommenders.precision import autocast
from generative_recommenders.evaluation.metrics import RankingPredictions, ranking_metrics


def candidate_predictions(model: RankingModel, batch: RankingBatch, num_slots: int,
                          mixed_precision: str = "none") -> RankingPredictions:
    """(B, num_slots) predictions and labels of a batch's candidates (slots past num_targets invalid).

    The encoder runs under `mixed_precision` (precision.py); the heads and predictions are fp32.
    """
    with autocast(mixed_precision, batch.lengths.device):
        out, offsets = model(batch)
    slots = torch.arange(num_slots, device=out.device)[None, :]
    first = (batch.lengths - batch.num_targets)[:, None]
    valid = slots < batch.num_targets[:, None]
    column = torch.where(valid, first + slots, 0)
    outputs = model.heads(out[offsets[:-1, None] + column])
    return RankingPredictions(
        liked_prob=torch.sigmoid(outputs["liked"]),
        expected_rating=model.heads.expected_rating(outputs),
        rating_class=model.heads.rating_class(outputs),
        ratings=batch.ratings.gather(1, column),
        valid=valid,
    )


class RankingEvaluator:
    """Metrics of `model` over samples with candidates, `batch_size` samples per forward pass."""

    def __init__(self, model: RankingModel, sequences: RankingSequences, max_history: int, batch_size: int,
                 mixed_precision: str = "none") -> None:
        self.model, self.sequences = model, sequences
        self.max_history, self.batch_size = max_history, batch_size
        self.mixed_precision = mixed_precision

    @torch.no_grad()
    def predictions(self, samples: np.ndarray) -> RankingPredictions:
        if samples.shape[0] == 0 or not (samples[:, 2] > 0).all():
            raise ValueError("evaluation samples need at least one candidate each")
        was_training = self.model.training
        self.model.eval()
        on_device = torch.as_tensor(samples, device=self.sequences.offsets.device)  # one upload
        totals = sample_lengths(samples, self.max_history)
        num_slots = int(samples[:, 2].max())
        parts = []
        for start in range(0, samples.shape[0], self.batch_size):
            end = start + self.batch_size
            batch = self.sequences.gather(on_device[start:end], self.max_history, self.model.max_seq_len,
                                          int(totals[start:end].sum()), True)
            parts.append(candidate_predictions(self.model, batch, num_slots, self.mixed_precision))
        self.model.train(was_training)
        return RankingPredictions.concat(parts)

    def __call__(self, samples: np.ndarray) -> Dict[str, float]:
        return ranking_metrics(self.predictions(samples))
