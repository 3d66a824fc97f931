"""Non-neural next-item baselines, fit on the training samples' clicks and scored on the same batches, by the
same evaluator (evaluation/retrieval.py), as the models: every position, all candidates, nothing removed
for sessions, ties at their expected rank.

- most-popular (popular.py): every protocol.
- Session protocol only, after Ludewig & Jannach's session-rec framework: sequential rules
  (sequential_rules.py), association rules (association_rules.py) and V-SKNN (vsknn.py).

A baseline is a callable: Batch -> (B, C) scores of the candidates. Each fits in seconds on rsc15-100k.
"""

from __future__ import annotations

from typing import Callable, Dict

import numpy as np
import torch

from generative_recommenders.data.samples import Batch
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.evaluation.next_item_baselines.association_rules import fit_association_rules
from generative_recommenders.evaluation.next_item_baselines.clicks import TrainingClicks
from generative_recommenders.evaluation.next_item_baselines.popular import fit_most_popular
from generative_recommenders.evaluation.next_item_baselines.sequential_rules import fit_sequential_rules
from generative_recommenders.evaluation.next_item_baselines.vsknn import fit_vsknn

Baseline = Callable[[Batch], torch.Tensor]

SESSION_BASELINES = {
    "sequential-rules": fit_sequential_rules,
    "association-rules": fit_association_rules,
    "v-sknn": fit_vsknn,
}


def fit_baselines(data: SequenceData, train_samples: np.ndarray, candidate_ids: torch.Tensor,
                  sessions: bool) -> Dict[str, Baseline]:
    """Name -> fitted baseline: most-popular, and the session baselines on session data."""
    clicks = TrainingClicks.of(data, train_samples)
    fitted: Dict[str, Baseline] = {"most-popular": fit_most_popular(clicks, candidate_ids)}
    if sessions:
        fitted.update({name: fit(clicks, candidate_ids) for name, fit in SESSION_BASELINES.items()})
    return fitted
