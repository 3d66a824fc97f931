"""evaluation/retrieval.py: ranks and metrics on hand-made cases (REFERENCE.md sections 7, 13)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from generative_recommenders.data.candidates import CandidateIndex
from generative_recommenders.data.samples import DeviceSequences
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.evaluation.metrics import RankMetrics, metric_names
from generative_recommenders.evaluation.retrieval import Evaluator, rank_counts

IDS = [2, 4, 6, 8, 10]
SCORES = [0.5, 0.9, 0.1, 0.7, 0.3]  # order by score: 4, 8, 2, 10, 6
INDEX = CandidateIndex(torch.tensor(IDS), 12)


def _counts(target, history=None, scores=SCORES, index=INDEX):
    """(higher, ties, missing) of one target, history removed when given."""
    exclude = None if history is None else index.columns(torch.tensor([history]))
    h, t, m = rank_counts(torch.tensor([scores]), index.columns(torch.tensor([target])), exclude)
    return h.item(), t.item(), m.item()


def _metrics(higher, ties, missing, cap=2500):
    out = RankMetrics(cap, torch.device("cpu"))(torch.tensor(higher), torch.tensor(ties), torch.tensor(missing))
    return {k: v.tolist() for k, v in out.items()}


def test_basic_ranks():
    assert [_counts(t)[0] + 1 for t in (4, 8, 2, 10, 6)] == [1, 2, 3, 4, 5]
    assert all(_counts(t)[1:] == (0, False) for t in (4, 8, 2, 10, 6))


def test_history_items_are_removed_and_target_moves_up():
    assert _counts(10, [0, 0])[0] == 3
    assert _counts(10, [4, 0])[0] == 2
    assert _counts(10, [4, 8, 0])[0] == 1
    assert _counts(10, [6, 0])[0] == 3  # lower-scoring history items do not move the target
    # Padding, non-candidate ids and ids beyond the table are ignored.
    assert _counts(10, [0, 3, 11, 13, 99])[0] == 3
    # A target in its own history cannot be ranked; without the filter (sessions) it can.
    assert _counts(8, [8, 0])[2] is True
    assert _counts(8, None) == (1, 0, False)


def test_targets_outside_the_candidates_are_missing():
    for target in (3, 0, 13):
        assert _counts(target)[2] is True


def test_ties_count_at_their_expected_rank():
    scores = [0.7, 0.9, 0.7, 0.7, 0.1]
    assert [_counts(t, scores=scores) for t in (2, 6, 8)] == [(1, 2, False)] * 3
    m = _metrics([1], [2], [False])  # rank uniform on 2, 3, 4
    assert m["hr@1"] == [0.0]
    assert m["hr@10"] == [1.0]
    assert m["mrr"] == pytest.approx([(1 / 2 + 1 / 3 + 1 / 4) / 3])
    assert m["ndcg@10"] == pytest.approx([sum(1 / math.log2(r + 1) for r in (2, 3, 4)) / 3])
    m = _metrics([0], [3], [False])  # rank uniform on 1..4: HR@2 = 1/2
    assert m["hr@1"] == [0.25]


@settings(max_examples=60, deadline=None)
@given(higher=st.integers(0, 60), ties=st.integers(0, 40), cap=st.integers(5, 80))
def test_expected_metrics_equal_the_average_over_every_tie_order(higher, ties, cap):
    got = _metrics([higher], [ties], [False], cap=cap)
    ranks = [min(r, cap + 1) for r in range(higher + 1, higher + ties + 2)]
    for k in (1, 10, 20, 50):
        kk = min(k, cap)
        assert got[f"hr@{k}"][0] == pytest.approx(np.mean([r <= kk for r in ranks]))
        assert got[f"ndcg@{k}"][0] == pytest.approx(np.mean([(r <= kk) / math.log2(r + 1) for r in ranks]))
    assert got["mrr"][0] == pytest.approx(np.mean([1 / r for r in ranks]))
    assert got["mrr@20"][0] == pytest.approx(np.mean([(r <= min(20, cap)) / r for r in ranks]))


def test_metric_values_for_known_ranks_and_the_cap():
    ranks = [1, 2, 10, 11, 50, 2501, 4000]
    m = _metrics([r - 1 for r in ranks], [0] * 7, [False] * 7)
    assert m["hr@1"] == [1, 0, 0, 0, 0, 0, 0]
    assert m["hr@10"] == [1, 1, 1, 0, 0, 0, 0]
    assert m["hr@50"] == [1, 1, 1, 1, 1, 0, 0]
    assert m["hr@1000"] == [1, 1, 1, 1, 1, 0, 0]
    assert m["ndcg@10"] == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11), 0, 0, 0, 0])
    assert m["ndcg@200"] == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11), 1 / math.log2(12),
                                           1 / math.log2(51), 0, 0])
    # Beyond the cap (2500) the rank counts as 2501, as the release's top-k search gave.
    assert m["mrr"] == pytest.approx([1, 0.5, 0.1, 1 / 11, 0.02, 1 / 2501, 1 / 2501])
    assert m["mrr@20"] == pytest.approx([1, 0.5, 0.1, 1 / 11, 0, 0, 0])
    missing = _metrics([0], [0], [True])
    assert missing["hr@1000"] == [0.0] and missing["mrr"] == pytest.approx([1 / 2501])


def test_small_candidate_sets_never_count_a_missing_target_as_a_hit():
    m = _metrics([0, 4], [0, 0], [True, False], cap=5)
    assert m["hr@10"] == [0.0, 1.0] and m["hr@1000"] == [0.0, 1.0]


def test_metric_names():
    names = metric_names()
    expected = {f"{m}@{k}" for k in (1, 10, 20, 50, 100, 200) for m in ("hr", "ndcg")}
    expected |= {"hr@500", "hr@1000", "mrr", "mrr@20"}
    assert set(names) == expected and len(names) == len(expected)
    assert set(_metrics([3], [0], [False])) == expected


def test_candidate_index_columns():
    index = CandidateIndex(torch.tensor([7, 3, 5]), 9)
    assert index.columns(torch.tensor([7, 3, 5, 0, 4, 9, 10, 1000])).tolist() == [0, 1, 2, -1, -1, -1, -1, -1]


# ------------------------------------------------------------------------------------------------
# The evaluator end to end, with stand-in models


class _FixedModel(torch.nn.Module):
    """Queries from a fixed function of the batch; item vectors from a fixed table."""

    def __init__(self, items: torch.Tensor, max_seq_len: int) -> None:
        super().__init__()
        self.items, self.max_seq_len, self.padded_layout = items, max_seq_len, False

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        return self.items[ids]


def _data(num_users=40, length=6, num_items=30, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.full(num_users, length)
    return SequenceData(
        name="t", item_ids=rng.integers(1, num_items + 1, lengths.sum()).astype(np.int32),
        ratings=np.ones(lengths.sum(), np.float32), timestamps=np.arange(lengths.sum(), dtype=np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        user_ids=np.arange(num_users, dtype=np.int64), candidate_ids=np.arange(1, num_items + 1, dtype=np.int32))


def _evaluate(items, query_fn, filter_history=True, rank_cap=2500):
    data = _data()
    model = _FixedModel(items, 8)
    index = CandidateIndex(torch.as_tensor(data.candidate_ids), data.max_item_id)
    evaluator = Evaluator(model, query_fn, DeviceSequences(data, torch.device("cpu")), index, 5, 16,
                          filter_history=filter_history, rank_cap=rank_cap)
    samples = np.stack([np.arange(40), np.full(40, 6)], axis=1)
    return evaluator(samples)


def test_a_model_that_scores_everything_alike_gets_chance_metrics():
    items = torch.ones(31, 4)
    got = _evaluate(items, lambda model, batch: torch.ones(batch.ids.shape[0], 4), filter_history=False)
    assert got["hr@10"] == pytest.approx(10 / 30)
    assert got["hr@1"] == pytest.approx(1 / 30)
    assert got["mrr"] == pytest.approx(sum(1 / r for r in range(1, 31)) / 30)


def test_nan_scores_stop_the_evaluation():
    items = torch.randn(31, 4)
    with pytest.raises(FloatingPointError, match="non-finite user embeddings"):
        _evaluate(items, lambda model, batch: torch.full((batch.ids.shape[0], 4), float("nan")))
    items[3] = float("nan")
    with pytest.raises(FloatingPointError, match="item embeddings"):
        _evaluate(items, lambda model, batch: torch.ones(batch.ids.shape[0], 4))


def test_evaluator_ranks_equal_a_direct_loop():
    torch.manual_seed(0)
    items = torch.randn(31, 4)
    queries = torch.randn(40, 4)
    query_fn = lambda model, batch: queries[: batch.ids.shape[0]]  # noqa: E731  (one batch of 40)
    data = _data()
    for filter_history in (True, False):
        model = _FixedModel(items, 8)
        index = CandidateIndex(torch.as_tensor(data.candidate_ids), data.max_item_id)
        ev = Evaluator(model, query_fn, DeviceSequences(data, torch.device("cpu")), index, 5, 64,
                       filter_history=filter_history)
        got = ev(np.stack([np.arange(40), np.full(40, 6)], axis=1))
        hits = []
        for u in range(40):
            seq = data.sequence(u)
            history, target = set(seq[:5].tolist()), int(seq[5])
            scores = {i: float(queries[u] @ items[i]) for i in range(1, 31)}
            if filter_history and target in history:
                hits.append(0.0)
                continue
            rivals = [i for i in scores if not (filter_history and i in history) and i != target]
            rank = 1 + sum(scores[i] > scores[target] for i in rivals)
            hits.append(float(rank <= 10))
        assert got["hr@10"] == pytest.approx(np.mean(hits)), filter_history


def test_session_evaluation_counts_repeat_clicks_and_removes_nothing():
    # Session 0 clicks 5, 7, 5: events (5 -> 7) and (5 7 -> 5). The query prefers 5, then 7, then the rest.
    data = SequenceData(
        name="s", item_ids=np.array([5, 7, 5], np.int32), ratings=np.ones(3, np.float32),
        timestamps=np.arange(3, dtype=np.int64), offsets=np.array([0, 3]), user_ids=np.array([1]),
        candidate_ids=np.arange(1, 10, dtype=np.int32), user_split=np.array([2], np.int8))
    items = torch.zeros(10, 2)
    items[:, 1] = 1.0
    items[5] = torch.tensor([3.0, 0.0])
    items[7] = torch.tensor([2.0, 0.0])
    query_fn = lambda model, batch: torch.tensor([[1.0, 0.0]]).expand(batch.ids.shape[0], 2)  # noqa: E731
    index = CandidateIndex(torch.as_tensor(data.candidate_ids), 9)
    sequences = DeviceSequences(data, torch.device("cpu"))
    samples = np.array([[0, 2], [0, 3]])
    sessions = Evaluator(_FixedModel(items, 8), query_fn, sequences, index, 5, 8, filter_history=False,
                         rank_cap=None)
    got = sessions(samples)
    # Event 1: target 7 ranks 2 (5 is above it, though clicked); event 2: the repeat click 5 ranks 1.
    assert got["hr@1"] == pytest.approx(0.5) and got["mrr@20"] == pytest.approx((1 / 2 + 1) / 2)
    # The user protocol would remove 5 from event 1's ranking and could not rank event 2's target at all.
    users = Evaluator(_FixedModel(items, 8), query_fn, sequences, index, 5, 8)(samples)
    assert users["hr@1"] == pytest.approx(0.5) and users["mrr"] == pytest.approx((1 + 1 / 10) / 2)
