"""Association rules (AR; session-rec's `AssociationRules`): co-occurrence counts within sessions.

Every pair of clicks (a, b) of one training session, at two different
positions, in either order, adds 1 to rule (a, b): with c[s, i] the clicks of
item i in session s, rules = C^T C minus the diagonal sum_s c[s, i] (a click
paired with itself), so a repeated item gets c (c - 1) on a -> a as in
session-rec. Each item keeps its `pruning` = 20 strongest rules (ties: lower
item id); a prefix is scored by the rules of its last click (rules.py).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from generative_recommenders.evaluation.next_item_baselines.clicks import TrainingClicks, keep_top_per_row
from generative_recommenders.evaluation.next_item_baselines.rules import PRUNING, ItemRules


def association_rule_matrix(clicks: TrainingClicks) -> sp.csr_matrix:
    """(num_ids, num_ids) number of ordered pairs of distinct click positions of a session holding (a, b)."""
    counts = clicks.session_items()
    pairs = (counts.T @ counts - sp.diags(np.asarray(counts.sum(axis=0)).ravel())).tocsr()
    pairs.eliminate_zeros()
    return pairs


def fit_association_rules(clicks: TrainingClicks, candidate_ids: torch.Tensor, pruning: int = PRUNING) -> ItemRules:
    return ItemRules(keep_top_per_row(association_rule_matrix(clicks), pruning), candidate_ids)
