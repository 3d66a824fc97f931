"""Session baselines (evaluation/next_item_baselines): SR, AR and V-SKNN against direct per-event formulas on
hand-made sessions, and their metrics through the evaluator (ties at their expected rank)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch

from generative_recommenders.data.candidates import CandidateIndex
from generative_recommenders.data.samples import DeviceSequences, make_splits
from generative_recommenders.data.sequence_store import SPLIT_TEST, SPLIT_TRAIN, SequenceData
from generative_recommenders.evaluation.next_item_baselines import fit_baselines
from generative_recommenders.evaluation.next_item_baselines.association_rules import association_rule_matrix
from generative_recommenders.evaluation.next_item_baselines.clicks import TrainingClicks, keep_top_per_row
from generative_recommenders.evaluation.next_item_baselines.sequential_rules import sequential_rule_matrix
from generative_recommenders.evaluation.next_item_baselines.vsknn import fit_vsknn
from generative_recommenders.evaluation.retrieval import Evaluator

NUM_ITEMS = 8
TRAIN = [[1, 2, 3], [1, 3], [2, 1, 3, 3], [4, 5], [5, 4, 6, 1], [6, 7, 1, 2], [2, 4]]
TEST = [[1, 3, 2], [4, 6, 3], [7, 7, 5], [2, 8, 1]]
MAX_HISTORY = 5


def _data(train: Sequence[List[int]] = TRAIN, test: Sequence[List[int]] = TEST) -> SequenceData:
    """Train then test sessions; a session's clicks are at its index (so later sessions are more recent)."""
    sessions = [*train, *test]
    lengths = np.array([len(s) for s in sessions])
    times = np.repeat(np.arange(len(sessions)) * 100, lengths) + np.concatenate([np.arange(n) for n in lengths])
    return SequenceData(
        name="hand-made", item_ids=np.concatenate(sessions).astype(np.int32),
        ratings=np.ones(lengths.sum(), np.float32), timestamps=times.astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        user_ids=np.arange(len(sessions), dtype=np.int64),
        candidate_ids=np.arange(1, NUM_ITEMS + 1, dtype=np.int32),
        user_split=np.array([SPLIT_TRAIN] * len(train) + [SPLIT_TEST] * len(test), dtype=np.int8))


def _clicks(train: Sequence[List[int]] = TRAIN) -> TrainingClicks:
    data = _data(train, [[1, 2]])
    return TrainingClicks.of(data, make_splits(data, "sessions")["train"])


# --------------------------------------------------------------------------------------------------
# Direct per-event formulas (session-rec's loops)


def _sr_direct(train: Sequence[List[int]], steps: int = 10) -> Dict[int, Dict[int, float]]:
    rules: Dict[int, Dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for session in train:
        for t, item in enumerate(session):
            for d in range(1, min(steps, t) + 1):
                rules[session[t - d]][item] += 1 / d
    return rules


def _ar_direct(train: Sequence[List[int]]) -> Dict[int, Dict[int, float]]:
    rules: Dict[int, Dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for session in train:
        for t, item in enumerate(session):
            for earlier in session[:t]:
                rules[item][earlier] += 1
                rules[earlier][item] += 1
    return rules


def _vsknn_direct(train: Sequence[List[int]], prefix: List[int], k: int, sample_size: int,
                  idf_weight: float) -> np.ndarray:
    sets = [set(s) for s in train]
    clicks = Counter(i for s in train for i in s)
    idf = {i: math.log(len(train) / c) for i, c in clicks.items()}
    weight = {item: (j + 1) / len(prefix) for j, item in enumerate(prefix)}  # later clicks overwrite
    recency = lambda s: -s  # noqa: E731 - sessions are in time order, later ones more recent
    relevant = sorted((s for s in range(len(train)) if sets[s] & set(prefix)), key=recency)[:sample_size]
    similar = [(s, sum(weight[i] for i in sets[s] & set(prefix)) / len(weight)) for s in relevant]
    scores = np.zeros(NUM_ITEMS + 1)
    for s, sim in sorted(similar, key=lambda pair: (-pair[1], recency(pair[0])))[:k]:
        step = next(step for step, item in enumerate(reversed(prefix), 1) if item in sets[s])
        for item in sets[s]:
            scores[item] += sim / step * (1 + idf_weight * idf[item])
    return scores


def _dense(rules: Dict[int, Dict[int, float]]) -> np.ndarray:
    out = np.zeros((NUM_ITEMS + 1, NUM_ITEMS + 1))
    for a, row in rules.items():
        for b, value in row.items():
            out[a, b] = value
    return out


# --------------------------------------------------------------------------------------------------
# The fitted rules and neighbours


def test_sequential_rules_weigh_each_earlier_click_by_one_over_its_distance():
    got = sequential_rule_matrix(_clicks()).toarray() / 2520  # stored times lcm(1..10)
    np.testing.assert_allclose(got, _dense(_sr_direct(TRAIN)))
    # 1 -> 3: distance 2 in [1, 2, 3], 1 in [1, 3], 1 and 2 in [2, 1, 3, 3]
    assert got[1, 3] == pytest.approx(1 / 2 + 1 + 1 + 1 / 2)
    assert got[3, 3] == pytest.approx(1.0) and got[3, 1] == 0.0  # a repeat counts; rules have a direction
    steps2 = sequential_rule_matrix(_clicks(), steps=2).toarray() / 2
    assert steps2[5, 1] == 0.0 and steps2[4, 1] == pytest.approx(1 / 2)  # [5, 4, 6, 1]: 5 is 3 clicks before 1


def test_association_rules_count_every_pair_of_positions_both_ways():
    got = association_rule_matrix(_clicks()).toarray()
    np.testing.assert_array_equal(got, _dense(_ar_direct(TRAIN)))
    assert got[1, 3] == got[3, 1] == 1 + 1 + 2  # [1, 2, 3], [1, 3], and [2, 1, 3, 3] with 3 clicked twice
    assert got[3, 3] == 2  # [2, 1, 3, 3]: one pair of positions, counted in both orders as in session-rec


def test_pruning_keeps_the_strongest_rules_and_the_lower_item_on_ties():
    rules = association_rule_matrix(_clicks())
    pruned = keep_top_per_row(rules, 2).toarray()
    full = rules.toarray()
    # item 1: with 3 four times, 2 three times, 6 twice, 4, 5 and 7 once: keeps 3 and 2
    assert (full[1, 3], full[1, 2], full[1, 6]) == (4, 3, 2)
    assert np.flatnonzero(pruned[1]).tolist() == [2, 3] and (pruned[1, 2], pruned[1, 3]) == (3, 4)
    # item 7's rules (6, 1, 2) all weigh 1: the two lowest items stay
    assert np.flatnonzero(pruned[7]).tolist() == [1, 2]


@pytest.mark.parametrize("k,sample_size", [(100, 500), (2, 3), (1, 1)])
def test_vsknn_scores_are_the_direct_formula(k, sample_size):
    model = fit_vsknn(_clicks(), torch.arange(1, NUM_ITEMS + 1), k=k, sample_size=sample_size, idf_weight=10.0)
    data = _data()
    sequences = DeviceSequences(data, torch.device("cpu"))
    samples = make_splits(data, "sessions")["test"]
    batch = sequences.batch(samples, MAX_HISTORY, MAX_HISTORY + 1)
    got = model(batch).numpy()
    for row, (session, end) in enumerate(samples):
        prefix = data.item_ids[data.offsets[session]:data.offsets[session] + end - 1].tolist()
        want = _vsknn_direct(TRAIN, prefix, k, sample_size, 10.0)[1:]
        np.testing.assert_allclose(got[row], want, err_msg=f"prefix {prefix}")


def test_vsknn_neighbour_weights_by_hand():
    """Prefix [1, 3]: weights 1/2 and 1 over 2 distinct items; idf weight 0 leaves sim / step."""
    train = [[1, 2], [3, 4], [1, 3, 5]]
    model = fit_vsknn(_clicks(train), torch.arange(1, NUM_ITEMS + 1), idf_weight=0.0)
    data = _data(train, [[1, 3, 6]])
    batch = DeviceSequences(data, torch.device("cpu")).batch(np.array([[3, 3]]), MAX_HISTORY, MAX_HISTORY + 1)
    scores = model(batch).numpy()[0]
    # [1, 2]: sim 1/4, last shared click 1 is one before the end: step 2; [3, 4]: sim 1/2, step 1;
    # [1, 3, 5]: sim 3/4, step 1.
    assert scores[2 - 1] == pytest.approx(1 / 8)
    assert scores[4 - 1] == pytest.approx(1 / 2)
    assert scores[5 - 1] == pytest.approx(3 / 4)
    assert scores[1 - 1] == pytest.approx(1 / 8 + 3 / 4) and scores[3 - 1] == pytest.approx(1 / 2 + 3 / 4)
    assert scores[6 - 1] == 0.0


# --------------------------------------------------------------------------------------------------
# Through the evaluator


class _NoModel(torch.nn.Module):
    def __init__(self, max_seq_len: int) -> None:
        super().__init__()
        self.max_seq_len, self.padded_layout = max_seq_len, False


def _expected_metrics(scores: np.ndarray, targets: np.ndarray) -> Dict[str, float]:
    """hr@1, ndcg@10 and mrr@20 averaged over the ranks h + 1 .. h + t + 1 a target's ties could take."""
    out = defaultdict(float)
    for row, target in zip(scores, targets):
        higher = int((row > row[target - 1]).sum())
        ranks = np.arange(higher + 1, higher + int((row == row[target - 1]).sum()) + 1)
        out["hr@1"] += np.mean(ranks <= 1)
        out["ndcg@10"] += np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0))
        out["mrr@20"] += np.mean(np.where(ranks <= 20, 1 / ranks, 0))
    return {name: value / len(targets) for name, value in out.items()}


def test_every_baseline_is_evaluated_at_every_position_with_ties_at_their_expected_rank():
    data = _data()
    splits = make_splits(data, "sessions")
    candidates = torch.as_tensor(data.candidate_ids)
    sequences = DeviceSequences(data, torch.device("cpu"))
    index = CandidateIndex(candidates, data.max_item_id)
    samples = splits["test"]
    assert samples.shape[0] == sum(len(s) - 1 for s in TEST)  # every position but the first
    batch = sequences.batch(samples, MAX_HISTORY, MAX_HISTORY + 1)
    lasts = batch.ids[torch.arange(samples.shape[0]), batch.lengths - 1].numpy()
    direct = {"sequential-rules": _dense(_sr_direct(TRAIN))[lasts, 1:],
              "association-rules": _dense(_ar_direct(TRAIN))[lasts, 1:]}
    fitted = fit_baselines(data, splits["train"], candidates, sessions=True)
    assert list(fitted) == ["most-popular", "sequential-rules", "association-rules", "v-sknn"]
    for name, baseline in fitted.items():
        evaluator = Evaluator(_NoModel(MAX_HISTORY + 1), None, sequences, index, MAX_HISTORY, 3,
                              filter_history=False, rank_cap=None, baseline=baseline)
        got = evaluator(samples)
        scores = baseline(batch).numpy()
        if name in direct:
            np.testing.assert_allclose(scores / scores.max(axis=1, keepdims=True).clip(min=1e-12),
                                       direct[name] / direct[name].max(axis=1, keepdims=True).clip(min=1e-12))
        for metric, value in _expected_metrics(scores, batch.targets.numpy()).items():
            assert got[metric] == pytest.approx(value), (name, metric)
    # [2, 8, 1] after [2, 8]: item 8 never occurs in training, so every candidate ties at score 0 for SR:
    sr = fitted["sequential-rules"](batch).numpy()
    row = int(np.flatnonzero(lasts == 8)[0])
    assert (sr[row] == 0).all()
    ties = _expected_metrics(sr[row:row + 1], batch.targets.numpy()[row:row + 1])
    assert ties["mrr@20"] == pytest.approx(np.mean(1 / np.arange(1, NUM_ITEMS + 1)))
