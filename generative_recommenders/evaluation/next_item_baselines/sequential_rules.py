"""Sequential rules (SR; Kamehkhosh et al. 2017, as in Ludewig & Jannach's session-rec `SequentialRules`).

Every training click b at position t of a session adds 1/d to rule (a, b)
for each click a at position t - d, d = 1..steps (steps = 10, session-rec's
default; repeats of an item count as often as they occur, a -> a included).
Each item keeps its `pruning` = 20 strongest rules (ties: lower item id; only
ranks beyond 20 can move, so recall@20 and MRR@20 do not depend on it). A
prefix is scored by the rules of its last click (rules.py).

The weights are stored times lcm(1..steps) (2520 for 10), so that every sum
is an integer and equal weights tie exactly, whatever the order of the sums.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from generative_recommenders.evaluation.next_item_baselines.clicks import TrainingClicks, keep_top_per_row
from generative_recommenders.evaluation.next_item_baselines.rules import PRUNING, ItemRules

STEPS = 10


def sequential_rule_matrix(clicks: TrainingClicks, steps: int = STEPS) -> sp.csr_matrix:
    """(num_ids, num_ids) sum over click pairs (a before b, distance d <= steps) of lcm(1..steps) / d."""
    scale = math.lcm(*range(1, steps + 1))
    before, after, weights = [], [], []
    for d in range(1, steps + 1):  # one vectorised pass per distance
        later = np.flatnonzero(clicks.position >= d)
        before.append(clicks.items[later - d])
        after.append(clicks.items[later])
        weights.append(np.full(later.size, scale // d, dtype=np.float64))
    shape = (clicks.num_ids, clicks.num_ids)
    return sp.csr_matrix((np.concatenate(weights), (np.concatenate(before), np.concatenate(after))), shape=shape)


def fit_sequential_rules(clicks: TrainingClicks, candidate_ids: torch.Tensor, steps: int = STEPS,
                         pruning: int = PRUNING) -> ItemRules:
    return ItemRules(keep_top_per_row(sequential_rule_matrix(clicks, steps), pruning), candidate_ids)
