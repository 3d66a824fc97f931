"""generative_recommenders/data/samples.py: splits of both protocols and device batches (REFERENCE.md 2-3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generative_recommenders.data.samples import DeviceSequences, make_splits, selection_split
from generative_recommenders.data.sequence_store import SequenceData


def _data(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    # User u's k-th item is 100 * (u + 1) + k + 1; its timestamp 1000 * (u + 1) + 10 * k.
    items, ts = [], []
    for u, n in enumerate(lengths):
        items += [100 * (u + 1) + k + 1 for k in range(n)]
        ts += [1000 * (u + 1) + 10 * k for k in range(n)]
    return SequenceData(
        name="t",
        item_ids=np.array(items, dtype=np.int32),
        ratings=np.ones(total, dtype=np.float32),
        timestamps=np.array(ts, dtype=np.int64),
        offsets=offsets,
        user_ids=np.arange(len(lengths), dtype=np.int64),
        candidate_ids=np.arange(1, 1000, dtype=np.int32),
    )


LENGTHS = np.array([5, 1, 2, 3, 4, 12])


def test_paper_protocol_splits():
    splits = make_splits(_data(LENGTHS), "paper")
    assert set(splits) == {"train", "eval"}
    # train end = n - 1 (needs n >= 3), eval end = n (needs n >= 2).
    assert splits["train"].tolist() == [[0, 4], [3, 2], [4, 3], [5, 11]]
    assert splits["eval"].tolist() == [[0, 5], [2, 2], [3, 3], [4, 4], [5, 12]]
    assert splits["train"].dtype == np.int64
    assert selection_split("paper", splits) == "eval"


def test_leave_one_out_splits():
    splits = make_splits(_data(LENGTHS), "leave_one_out")
    assert set(splits) == {"train", "valid", "test"}
    assert splits["train"].tolist() == [[0, 3], [4, 2], [5, 10]]
    assert splits["valid"].tolist() == [[0, 4], [3, 2], [4, 3], [5, 11]]
    assert splits["test"].tolist() == [[0, 5], [2, 2], [3, 3], [4, 4], [5, 12]]
    assert selection_split("leave_one_out", splits) == "valid"
    with pytest.raises(ValueError):
        make_splits(_data(LENGTHS), "random")
    with pytest.raises(ValueError, match="holds users"):
        make_splits(_data(LENGTHS), "sessions")


def test_session_protocol_trains_on_whole_train_sessions_and_evaluates_every_position():
    data = _data(LENGTHS)
    data.user_split = np.array([0, 0, 2, 1, 2, 0], dtype=np.int8)
    splits = make_splits(data, "sessions")
    # Train: whole sessions of length >= 2 (session 1 has one click).
    assert splits["train"].tolist() == [[0, 5], [5, 12]]
    # Every position but the first is a target: ends 2..n.
    assert splits["valid"].tolist() == [[3, 2], [3, 3]]
    assert splits["test"].tolist() == [[2, 2], [4, 2], [4, 3], [4, 4]]
    assert selection_split("sessions", splits) == "valid"
    data.user_split = np.array([0, 0, 2, 2, 2, 0], dtype=np.int8)
    no_valid = make_splits(data, "sessions")
    assert set(no_valid) == {"train", "test"} and selection_split("sessions", no_valid) == "test"
    with pytest.raises(ValueError, match="protocol = sessions"):
        make_splits(data, "paper")


def test_batch_truncates_to_most_recent_history_and_places_target_at_length():
    seqs = DeviceSequences(_data(LENGTHS), torch.device("cpu"))
    samples = np.array([[5, 12], [5, 4], [0, 5], [2, 2], [5, 11]])
    batch = seqs.batch(samples, max_history=4, padded_len=7)
    assert batch.lengths.tolist() == [4, 3, 4, 1, 4]
    assert batch.total == 16
    assert batch.targets.tolist() == [612, 604, 105, 302, 611]
    assert batch.ids.tolist() == [
        [608, 609, 610, 611, 612, 0, 0],  # user 5, items 8..11 history (most recent 4), 12 target
        [601, 602, 603, 604, 0, 0, 0],  # user 5 truncated at end 4: 3 history + target
        [101, 102, 103, 104, 105, 0, 0],
        [301, 302, 0, 0, 0, 0, 0],
        [607, 608, 609, 610, 611, 0, 0],
    ]
    assert batch.timestamps.tolist() == [
        [6070, 6080, 6090, 6100, 6110, 0, 0],
        [6000, 6010, 6020, 6030, 0, 0, 0],
        [1000, 1010, 1020, 1030, 1040, 0, 0],
        [3000, 3010, 0, 0, 0, 0, 0],
        [6060, 6070, 6080, 6090, 6100, 0, 0],
    ]
    assert batch.ids.dtype == torch.long and batch.timestamps.dtype == torch.long
    rows = torch.arange(5)
    assert torch.equal(batch.ids[rows, batch.lengths], batch.targets)


def test_batch_with_tight_padding_and_validation():
    seqs = DeviceSequences(_data(LENGTHS), torch.device("cpu"))
    batch = seqs.batch(np.array([[5, 12]]), max_history=3, padded_len=4)
    assert batch.ids.tolist() == [[609, 610, 611, 612]]
    assert batch.lengths.tolist() == [3]
    with pytest.raises(ValueError):
        seqs.batch(np.array([[5, 12]]), max_history=4, padded_len=4)


def test_splits_feed_batches_consistently():
    """Every paper-protocol sample: its target is the user's item at end - 1."""
    data = _data(LENGTHS)
    seqs = DeviceSequences(data, torch.device("cpu"))
    for name, samples in make_splits(data, "paper").items():
        batch = seqs.batch(samples, max_history=3, padded_len=5)
        for (user, end), target, length in zip(samples.tolist(), batch.targets.tolist(), batch.lengths.tolist()):
            assert target == data.sequence(user)[end - 1], name
            assert length == min(end - 1, 3)
