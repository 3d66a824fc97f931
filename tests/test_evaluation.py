"""generative_recommenders/evaluation.py: ranks and metrics on hand-made cases (REFERENCE.md section 7)."""

from __future__ import annotations

import math

import pytest
import torch

from generative_recommenders.evaluation import CandidateIndex, metric_names, metrics_from_ranks, target_ranks


def _setup(scores, candidate_ids, max_item_id):
    """Candidate embeddings (C, 2) whose dot with query (1, 0) is `scores`."""
    scores = torch.tensor(scores, dtype=torch.float32)
    emb = torch.stack([scores, torch.zeros_like(scores)], dim=1)
    index = CandidateIndex(torch.tensor(candidate_ids), max_item_id)
    return emb, index


QUERY = torch.tensor([[1.0, 0.0]])
IDS = [2, 4, 6, 8, 10]
SCORES = [0.5, 0.9, 0.1, 0.7, 0.3]  # order by score: 4, 8, 2, 10, 6


def _rank(target, history, scores=SCORES, ids=IDS, max_item_id=12):
    emb, index = _setup(scores, ids, max_item_id)
    return target_ranks(QUERY, emb, index, torch.tensor([target]), torch.tensor([history])).item()


def test_basic_ranks():
    assert [_rank(t, [0, 0]) for t in (4, 8, 2, 10, 6)] == [1, 2, 3, 4, 5]


def test_history_items_are_removed_and_target_moves_up():
    assert _rank(10, [0, 0]) == 4
    assert _rank(10, [4, 0]) == 3
    assert _rank(10, [4, 8, 0]) == 2
    # Lower-scoring history items do not move the target.
    assert _rank(10, [6, 0]) == 4
    # Padding, non-candidate ids and ids beyond the table are ignored.
    assert _rank(10, [0, 3, 11, 13, 99]) == 4


def test_ties_are_broken_in_the_targets_favour():
    scores = [0.7, 0.9, 0.7, 0.7, 0.1]
    assert [_rank(t, [0], scores=scores) for t in (2, 6, 8)] == [2, 2, 2]
    assert _rank(10, [0], scores=scores) == 5


def test_small_candidate_set_caps_at_its_size():
    emb, index = _setup(SCORES, IDS, 12)
    assert index.top_k == 5
    # Target not a candidate (3), padding id (0), beyond the table (13), in the history: k + 1 = 6.
    assert _rank(3, [0]) == 6
    assert _rank(0, [0]) == 6
    assert _rank(13, [0]) == 6
    assert _rank(8, [8, 0]) == 6
    assert _rank(6, [0]) == 5  # the last candidate is still inside k


def test_large_candidate_set_caps_at_2500():
    c = 3000
    ids = list(range(1, c + 1))
    scores = [float(c - i) for i in range(c)]  # id i has rank i
    emb, index = _setup(scores, ids, c)
    assert index.top_k == 2500
    targets = torch.tensor([1, 2500, 2501, 2502, 3000])
    history = torch.zeros(5, 3, dtype=torch.long)
    ranks = target_ranks(QUERY.expand(5, 2), emb, index, targets, history)
    assert ranks.tolist() == [1, 2500, 2501, 2501, 2501]
    # History filtering happens before the cap: removing 3 better items brings 2502 to 2499.
    history2 = torch.tensor([[10, 20, 30]] * 5)
    ranks2 = target_ranks(QUERY.expand(5, 2), emb, index, targets, history2)
    assert ranks2.tolist() == [1, 2497, 2498, 2499, 2501]


def test_batch_of_users_with_different_histories():
    emb, index = _setup(SCORES, IDS, 12)
    queries = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    targets = torch.tensor([10, 10, 4])
    history = torch.tensor([[4, 8], [6, 0], [0, 0]])
    # User 1 has reversed scores: order 6, 10, 2, 8, 4; 6 removed -> 10 first.
    assert target_ranks(queries, emb, index, targets, history).tolist() == [2, 1, 1]


def test_candidate_index_columns():
    index = CandidateIndex(torch.tensor([7, 3, 5]), 9)
    assert index.columns(torch.tensor([7, 3, 5, 0, 4, 9, 10, 1000])).tolist() == [0, 1, 2, -1, -1, -1, -1, -1]


def test_metric_values_for_known_ranks():
    ranks = torch.tensor([1, 2, 10, 11, 50, 2501])
    m = metrics_from_ranks(ranks)
    assert m["hr@1"].tolist() == [1, 0, 0, 0, 0, 0]
    assert m["hr@10"].tolist() == [1, 1, 1, 0, 0, 0]
    assert m["hr@50"].tolist() == [1, 1, 1, 1, 1, 0]
    assert m["hr@1000"].tolist() == [1, 1, 1, 1, 1, 0]
    assert m["ndcg@1"].tolist() == [1, 0, 0, 0, 0, 0]
    expected_ndcg10 = [1.0, 1 / math.log2(3), 1 / math.log2(11), 0, 0, 0]
    assert m["ndcg@10"].tolist() == pytest.approx(expected_ndcg10)
    expected_ndcg200 = [1.0, 1 / math.log2(3), 1 / math.log2(11), 1 / math.log2(12), 1 / math.log2(51), 0]
    assert m["ndcg@200"].tolist() == pytest.approx(expected_ndcg200)
    assert m["mrr"].tolist() == pytest.approx([1, 0.5, 0.1, 1 / 11, 0.02, 1 / 2501])
    assert m["hr@500"].tolist() == [1, 1, 1, 1, 1, 0]


def test_metric_names():
    names = metric_names()
    expected = {f"{m}@{k}" for k in (1, 10, 50, 100, 200) for m in ("hr", "ndcg")}
    expected |= {"hr@500", "hr@1000", "mrr"}
    assert set(names) == expected and len(names) == len(expected)
    assert set(metrics_from_ranks(torch.tensor([3])).keys()) == expected
