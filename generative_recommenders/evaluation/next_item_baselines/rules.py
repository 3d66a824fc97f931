"""Rule baselines' shared scoring: a rule matrix read at the prefix's last click (SR and AR).

rules[a, b] is the weight of "after a, b"; a prefix scores every item b by
rules[last click, b], as session-rec's predict_next does (its division by the
row's maximum changes no ranking and is left out). Items without a rule score
0 and tie; the evaluation ranks ties at their expected rank.
"""

from __future__ import annotations

import dataclasses

import scipy.sparse as sp
import torch

from generative_recommenders.data.samples import Batch
from generative_recommenders.evaluation.next_item_baselines.clicks import Prefixes, candidate_scores

PRUNING = 20  # session-rec's default for SR and AR: each item keeps its 20 strongest rules


@dataclasses.dataclass
class ItemRules:
    rules: sp.csr_matrix  # (num_ids, num_ids)
    candidate_ids: torch.Tensor

    def __call__(self, batch: Batch) -> torch.Tensor:
        """(B, C) scores of the candidates after each row's history."""
        return candidate_scores(self.rules[Prefixes.of(batch).last].toarray(), self.candidate_ids)
