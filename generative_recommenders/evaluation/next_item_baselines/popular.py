"""Most-popular: every prefix gets the same ranking, by the candidates' click counts in training."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from generative_recommenders.data.samples import Batch
from generative_recommenders.evaluation.next_item_baselines.clicks import TrainingClicks


@dataclasses.dataclass
class MostPopular:
    popularity: torch.Tensor  # (C,) float32 count of each candidate among the training clicks

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.popularity.expand(batch.targets.numel(), -1)


def fit_most_popular(clicks: TrainingClicks, candidate_ids: torch.Tensor) -> MostPopular:
    counts = np.bincount(clicks.items, minlength=clicks.num_ids)
    return MostPopular(torch.as_tensor(counts, dtype=torch.float32, device=candidate_ids.device)[candidate_ids])
