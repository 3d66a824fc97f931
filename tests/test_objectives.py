"""generative_recommenders/objectives: which positions are supervised, with which labels, and the
evaluation query (next-item for causal encoders, cloze for BERT4Rec)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from generative_recommenders.data.samples import Batch
from generative_recommenders.objectives import ClozeObjective, NextItemObjective, make_objective

MASK = 99


class _Recorder(torch.nn.Module):
    """Stands in for the recommender: records what it is fed, returns position-coded outputs."""

    mask_id = MASK

    def forward(self, ids, timestamps, lengths, total=None):
        self.seen = (ids.clone(), lengths.clone(), total)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        rows = [torch.stack([ids[b, :n].float(), torch.arange(n, dtype=torch.float32)], 1)
                for b, n in enumerate(lengths.tolist())]
        return torch.cat(rows), offsets

    def item_table(self):
        return None  # no raw table: the loss scores item_vectors

    def item_vectors(self, ids):
        ids = torch.arange(ids.start, ids.stop) if isinstance(ids, slice) else ids
        return torch.stack([ids.float(), torch.zeros_like(ids, dtype=torch.float32)], 1)


class _RecordLoss:
    def __call__(self, query, positive_ids, item_vectors, generator=None, item_table=None):
        self.query, self.positive_ids = query, positive_ids
        return query.sum() * 0


def _batch(lengths, n=8):
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        ids[b, : length + 1] = torch.arange(1, length + 2) + 10 * b  # history then the target at `length`
    lengths = torch.tensor(lengths)
    return Batch(ids, torch.zeros_like(ids), lengths, ids[torch.arange(len(lengths)), lengths], int(lengths.sum()))


def test_make_objective_follows_the_encoder():
    causal = _Recorder()
    causal.mask_id = None
    assert isinstance(make_objective(causal, _RecordLoss(), 0.2), NextItemObjective)
    assert isinstance(make_objective(_Recorder(), _RecordLoss(), 0.2), ClozeObjective)


def test_next_item_labels_are_the_following_ids_and_the_query_never_sees_the_target():
    model, loss = _Recorder(), _RecordLoss()
    objective = NextItemObjective(model, loss)
    batch = _batch([3, 1])
    objective.loss(model, batch)
    assert loss.positive_ids.tolist() == [2, 3, 4, 12]  # row 0: 1 2 3 -> 2 3 4(target); row 1: 11 -> 12
    query = objective.query(model, batch)
    assert query[:, 0].tolist() == [3.0, 11.0]  # the last history position's output
    assert model.seen[1].tolist() == [3, 1]  # lengths exclude the target


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5), prob=st.floats(0.05, 0.9), seed=st.integers(0, 99))
def test_cloze_masks_only_sequence_items_at_least_one_each_and_supervises_exactly_those(lengths, prob, seed):
    torch.manual_seed(seed)
    model, loss = _Recorder(), _RecordLoss()
    objective = ClozeObjective(model, loss, prob)
    batch = _batch(lengths)
    objective.loss(model, batch)
    fed, fed_lengths, total = model.seen
    assert fed_lengths.tolist() == [n + 1 for n in lengths]  # the target is part of the training sequence
    assert total == sum(lengths) + len(lengths)
    masked = fed == MASK
    for b, n in enumerate(lengths):
        assert masked[b, : n + 1].any() and not masked[b, n + 1 :].any()
    # Labels: the original id where masked, 0 (unsupervised) elsewhere, in jagged order.
    expected = torch.cat([torch.where(masked[b, : n + 1], batch.ids[b, : n + 1], 0) for b, n in enumerate(lengths)])
    assert loss.positive_ids.tolist() == expected.tolist()
    assert not (fed[~masked] == MASK).any() and torch.equal(fed[~masked], batch.ids[~masked])


def test_cloze_mask_rate_matches_the_probability():
    torch.manual_seed(0)
    objective = ClozeObjective(_Recorder(), _RecordLoss(), 0.2)
    batch = _batch([6] * 2000)
    rate = objective.mask(batch)[:, :7].float().mean().item()
    assert rate == pytest.approx(0.2 + 0.8**7 / 7, abs=0.01)  # plus the forced mask of all-unmasked rows


def test_cloze_query_puts_mask_in_the_targets_place():
    model = _Recorder()
    objective = ClozeObjective(model, _RecordLoss(), 0.2)
    batch = _batch([3, 1])
    query = objective.query(model, batch)
    fed, fed_lengths, _ = model.seen
    assert fed_lengths.tolist() == [4, 2]
    assert fed[0, :4].tolist() == [1, 2, 3, MASK] and fed[1, :2].tolist() == [11, MASK]
    assert not (fed == batch.targets[:, None]).any()  # the target is never visible
    assert query[:, 0].tolist() == [MASK, MASK] and query[:, 1].tolist() == [3.0, 1.0]
