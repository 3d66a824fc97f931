"""Session data (REFERENCE.md 13): prepared split files and raw YOOCHOOSE clicks -> one sequence per session."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from generative_recommenders.data.public_datasets import (
    PreprocessingError,
    ensure_preprocessed,
    preprocess_sessions,
    preprocess_yoochoose,
)
from generative_recommenders.data.sequence_store import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, load_sequences
from generative_recommenders.data.sources import sessions

REPO = Path(__file__).resolve().parents[1]
SHARED_RSC15 = Path(__file__).resolve().parents[2] / "shared/data/rsc15-100k"

Row = Tuple[int, int, float]  # session id, item id, Unix seconds


def quiet(message: str) -> None:
    pass


def prepared_file(path: Path, rows: Sequence[Row]) -> Path:
    path.write_text("SessionId\tItemId\tTime\n" + "".join(f"{s}\t{i}\t{t!r}\n" for s, i, t in rows))
    return path


def iso(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def clicks_file(path: Path, rows: Sequence[Row]) -> Path:
    path.write_text("".join(f"{s},{iso(t)},{i},0\n" for s, i, t in rows))
    return path


def events(rows: Sequence[Row], source: str = "rows") -> sessions.Events:
    columns = list(zip(*rows)) or [(), (), ()]
    return sessions.Events(source, np.array(columns[0], dtype=np.int64), np.array(columns[1], dtype=np.int64),
                           np.array(columns[2], dtype=np.float64))


def as_rows(part: sessions.Events) -> List[Row]:
    return list(zip(part.sessions.tolist(), part.items.tolist(), part.times.tolist()))


def sequences_by_split(data) -> List[Tuple[int, int, List[int]]]:
    return [(int(data.user_split[u]), int(data.user_ids[u]), data.sequence(u).tolist()) for u in range(data.num_users)]


# --------------------------------------------------------------------------------------------------
# Prepared files


# Item 300 < 500 < 700 become 1, 2, 3. Train session 5 is written after session 10 and has a time
# tie (file order kept) and a row out of time order.
TRAIN = [(10, 500, 100.5), (10, 300, 101.25), (5, 700, 60.0), (5, 300, 50.75), (5, 500, 50.75)]
VALID = [(20, 300, 200.0), (20, 999, 201.0), (20, 500, 202.0),  # 999 never in train: dropped, 2 left
         (21, 999, 210.0), (21, 300, 211.0)]  # 1 left: session dropped
TEST = [(30, 700, 300.9), (30, 500, 301.0), (30, 700, 302.0),  # repeat clicks are kept
        (31, 888, 310.0), (31, 888, 311.0)]  # all unseen: session dropped


def test_prepared_files_to_sequences(tmp_path):
    lines: List[str] = []
    path = preprocess_sessions("tiny", prepared_file(tmp_path / "train.txt", TRAIN),
                               prepared_file(tmp_path / "test.txt", TEST), prepared_file(tmp_path / "valid.txt", VALID),
                               tmp_path / "data", log=lines.append)
    assert ensure_preprocessed("tiny", tmp_path / "data") == path
    data = load_sequences(path)
    assert sequences_by_split(data) == [
        (SPLIT_TRAIN, 5, [1, 2, 3]),  # 300 and 500 tie at 50.75: file order (300 first) is kept
        (SPLIT_TRAIN, 10, [2, 1]),
        (SPLIT_VALID, 20, [1, 2]),
        (SPLIT_TEST, 30, [3, 2, 3]),
    ]
    assert data.timestamps.tolist() == [50, 50, 60, 100, 101, 200, 202, 300, 301, 302]  # floor of the seconds
    assert data.item_keys.tolist() == ["", "300", "500", "700"]
    assert data.candidate_ids.tolist() == [1, 2, 3] and data.item_titles is None
    text = "\n".join(lines)
    assert "valid.txt: dropped 2 events of items absent from training, then 1 events of sessions left shorter " \
           "than 2: 1 of 2 sessions dropped" in text
    assert "test.txt: dropped 2 events of items absent from training, then 0 events of sessions left shorter " \
           "than 2: 1 of 2 sessions dropped" in text
    assert "sessions 2 train, 1 valid, 1 test; items (candidates) 3, events 10" in text
    assert sorted(p.name for p in (tmp_path / "data/tiny").iterdir()) == ["sequences.npz"]


def test_without_validation_file(tmp_path):
    data = load_sequences(preprocess_sessions("tv", prepared_file(tmp_path / "train.txt", TRAIN),
                                              prepared_file(tmp_path / "test.txt", TEST), data_dir=tmp_path,
                                              log=quiet))
    assert data.user_split.tolist() == [SPLIT_TRAIN, SPLIT_TRAIN, SPLIT_TEST]


def naive_build(train: List[Row], valid: Optional[List[Row]], test: List[Row]):
    """Reference of the rules: dense ids over train items, unseen items then short sessions dropped."""
    dense = {item: n + 1 for n, item in enumerate(sorted({r[1] for r in train}))}
    result = []
    for split, rows in ((SPLIT_TRAIN, train), (SPLIT_VALID, valid), (SPLIT_TEST, test)):
        if rows is None:
            continue
        if split != SPLIT_TRAIN:
            rows = [r for r in rows if r[1] in dense]
            lengths = Counter(r[0] for r in rows)
            rows = [r for r in rows if lengths[r[0]] >= 2]
        for session in sorted({r[0] for r in rows}):
            mine = sorted((r for r in rows if r[0] == session), key=lambda r: r[2])  # stable
            result.append((split, session, [dense[r[1]] for r in mine], [math.floor(r[2]) for r in mine]))
    return sorted(dense), result


def split_rows(max_size: int):
    row = st.tuples(st.integers(0, 6), st.integers(0, 9), st.integers(0, 40).map(lambda t: t / 4))
    return st.lists(row, max_size=max_size)


@settings(max_examples=60, deadline=None)
@given(split_rows(25).filter(bool), st.one_of(st.none(), split_rows(15)), split_rows(15))
def test_build_matches_naive_reference(train, valid, test):
    keys, expected = naive_build(train, valid, test)
    valid_events = None if valid is None else events(valid)
    emptied = [split for split, part in ((SPLIT_VALID, valid), (SPLIT_TEST, test))
               if part is not None and not any(r[0] == split for r in expected)]
    if emptied:
        with pytest.raises(PreprocessingError, match="no session is left"):
            sessions.build_sessions("p", events(train), events(test), valid_events, log=quiet)
        return
    data = sessions.build_sessions("p", events(train), events(test), valid_events, log=quiet)
    got = [(int(data.user_split[u]), int(data.user_ids[u]), data.sequence(u).tolist(),
            data.timestamps[data.offsets[u]:data.offsets[u + 1]].tolist()) for u in range(data.num_users)]
    assert got == expected
    assert data.item_keys.tolist() == [""] + [str(k) for k in keys]
    assert data.candidate_ids.tolist() == list(range(1, len(keys) + 1))


@settings(max_examples=30, deadline=None)
@given(split_rows(30).filter(bool))
def test_prepared_file_round_trip(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("rt") / "f.txt"
    sessions.write_prepared(events(rows), path)
    assert as_rows(sessions.read_prepared(path)) == rows


# --------------------------------------------------------------------------------------------------
# Raw clicks: GRU4Rec's preparation on a hand-made log

T0, H, DAY = 1396310400.25, 3600, 86400  # 2014-04-01T00:00:00.250Z
A, B, C, D, E, F = 10, 20, 30, 40, 50, 60
# The last click is at 4 days 12 h: test = sessions whose last click is at >= 3 days 12 h. train_full's
# last click is at 3 days 10 h: validation = its sessions ending at >= 2 days 10 h. E occurs only in
# validation sessions (8, 9), F only in test sessions.
CLICKS = [(s, i, T0 + t) for s, i, t in [
    (1, A, H),  # length 1: dropped first, so A keeps only 4 clicks and is dropped as rare
    (2, A, 2 * H), (2, B, 2 * H + 60),  # left with one click once A is gone: dropped
    (3, A, 3 * H), (3, B, 3 * H + 60), (3, C, 3 * H + 120),
    (5, A, DAY), (5, B, DAY + 60), (5, D, DAY + 120),  # written before session 4
    (4, A, 4 * H), (4, C, 4 * H + 60), (4, D, 4 * H + 120),
    (6, D, DAY + H + 120), (6, B, DAY + H), (6, C, DAY + H + 60),  # out of time order in the file
    (7, D, DAY + 5 * H), (7, B, DAY + 5 * H),  # a time tie: file order kept
    (8, B, 2 * DAY + 8 * H), (8, E, 2 * DAY + 9 * H), (8, C, 2 * DAY + 10 * H),  # ends on the boundary: validation
    (9, E, 3 * DAY + 7 * H), (9, E, 3 * DAY + 8 * H), (9, E, 3 * DAY + 9 * H), (9, E, 3 * DAY + 10 * H),
    (20, B, 3 * DAY + 11 * H), (20, C, 3 * DAY + 12 * H),  # starts before the test day, ends on its start: test
    (21, F, 4 * DAY), (21, F, 4 * DAY + 60),  # F (5 clicks) occurs only in test: dropped from it
    (22, F, 4 * DAY + H), (22, C, 4 * DAY + H + 60),  # one click left: dropped
    (23, D, 4 * DAY + 2 * H), (23, F, 4 * DAY + 2 * H + 60), (23, F, 4 * DAY + 2 * H + 120),
    (23, B, 4 * DAY + 2 * H + 180),
    (24, D, 4 * DAY + 11 * H), (24, C, 4 * DAY + 12 * H),
]]


def expected_part(spec: Dict[int, List[int]]) -> List[Tuple[int, int]]:
    return [(session, item) for session, items in spec.items() for item in items]


EXPECTED_PARTS = {
    "train_full": {3: [B, C], 4: [C, D], 5: [B, D], 6: [B, C, D], 7: [D, B], 8: [B, E, C], 9: [E, E, E, E]},
    "test": {20: [B, C], 23: [D, B], 24: [D, C]},
    "train_tr": {3: [B, C], 4: [C, D], 5: [B, D], 6: [B, C, D], 7: [D, B]},
    "train_valid": {8: [B, C]},
}


def test_clicks_are_parsed_with_utc_times(tmp_path):
    parsed = sessions.parse_clicks(clicks_file(tmp_path / "clicks.dat", CLICKS))
    assert as_rows(parsed) == CLICKS
    assert iso(T0) == "2014-04-01T00:00:00.250Z"


def test_gru4rec_preparation_rules_by_hand():
    parts = sessions.prepare_clicks(events(CLICKS), log=quiet)
    assert list(parts) == ["train_full", "test", "train_tr", "train_valid"]
    for name, expected in EXPECTED_PARTS.items():
        assert [(s, i) for s, i, _ in as_rows(parts[name])] == expected_part(expected), name
    times = dict(((s, i), t) for s, i, t in CLICKS)
    assert all(t == times[s, i] for s, i, t in as_rows(parts["test"]))


def naive_prepare(rows: List[Row]) -> Optional[Dict[str, List[Row]]]:
    """Reference of GRU4Rec's rules, row by row; None when a part comes out empty."""
    def keep(rs: List[Row], key: int, least: int) -> List[Row]:
        counts = Counter(r[key] for r in rs)
        return [r for r in rs if counts[r[key]] >= least]

    def split(rs: List[Row]) -> Tuple[List[Row], List[Row]]:
        last: Dict[int, float] = {}
        for session, _, t in rs:
            last[session] = max(last.get(session, t), t)
        boundary = max(t for _, _, t in rs) - DAY
        before = [r for r in rs if last[r[0]] < boundary]
        seen = {r[1] for r in before}
        return before, keep([r for r in rs if last[r[0]] >= boundary and r[1] in seen], 0, 2)

    rows = keep(keep(keep(rows, 0, 2), 1, 5), 0, 2)
    if not rows:
        return None
    train_full, test = split(rows)
    if not train_full or not test:
        return None
    train_tr, valid = split(train_full)
    parts = {"train_full": train_full, "test": test, "train_tr": train_tr, "train_valid": valid}
    if not all(parts.values()):
        return None
    return {name: sorted(part, key=lambda r: (r[0], r[2])) for name, part in parts.items()}  # stable


def click_log(session_specs: List[Tuple[int, List[int]]]) -> List[Row]:
    """Sessions (start hour, items) -> rows, 10 minutes apart; session ids not in file order."""
    return [((7 * n) % 101, item, T0 + start * H + 600 * k)
            for n, (start, items) in enumerate(session_specs) for k, item in enumerate(items)]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 72), st.lists(st.integers(0, 3), min_size=1, max_size=5)), min_size=8,
                max_size=25).map(click_log))
def test_preparation_matches_naive_reference(rows):
    expected = naive_prepare(rows)
    if expected is None:
        with pytest.raises(PreprocessingError, match="no clicks left|is empty"):
            sessions.prepare_clicks(events(rows), log=quiet)
        return
    parts = sessions.prepare_clicks(events(rows), log=quiet)
    assert {name: as_rows(part) for name, part in parts.items()} == expected


def test_yoochoose_cache_and_prepared_files(tmp_path):
    data_dir = tmp_path / "data"
    path = preprocess_yoochoose(clicks_file(tmp_path / "clicks.dat", CLICKS), "rsc-tiny", data_dir, log=quiet)
    data = load_sequences(path)
    dense = {B: 1, C: 2, D: 3}  # the items of train_tr
    expected = [(SPLIT_TRAIN, s, [dense[i] for i in items]) for s, items in EXPECTED_PARTS["train_tr"].items()]
    expected += [(SPLIT_VALID, s, [dense[i] for i in items]) for s, items in EXPECTED_PARTS["train_valid"].items()]
    expected += [(SPLIT_TEST, s, [dense[i] for i in items]) for s, items in EXPECTED_PARTS["test"].items()]
    assert sequences_by_split(data) == expected
    assert data.item_keys.tolist() == ["", "20", "30", "40"] and data.candidate_ids.tolist() == [1, 2, 3]
    out = data_dir / "rsc-tiny"
    for name, part in EXPECTED_PARTS.items():
        written = sessions.read_prepared(out / f"rsc-tiny_{name}.txt")
        assert [(s, i) for s, i, _ in as_rows(written)] == expected_part(part)
    # The same cache as building from the prepared files that were written.
    again = load_sequences(preprocess_sessions("again", out / "rsc-tiny_train_tr.txt", out / "rsc-tiny_test.txt",
                                               out / "rsc-tiny_train_valid.txt", tmp_path / "b", log=quiet))
    for field in ("item_ids", "timestamps", "offsets", "user_ids", "user_split", "item_keys", "candidate_ids"):
        np.testing.assert_array_equal(getattr(again, field), getattr(data, field))


def test_a_split_left_empty_is_an_error(tmp_path):
    one_day = [(s, i, T0 + 60 * s + t) for s in range(1, 6) for i, t in ((B, 0), (C, 30))]  # all in the last day
    with pytest.raises(PreprocessingError, match="clicks.dat: train_full is empty"):
        sessions.prepare_clicks(events(one_day, "clicks.dat"), log=quiet)


def test_failure_while_writing_leaves_no_files(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sessions, "write_prepared", fail)
    with pytest.raises(OSError):
        preprocess_yoochoose(clicks_file(tmp_path / "clicks.dat", CLICKS), "x", tmp_path / "data", log=quiet)
    assert list((tmp_path / "data/x").iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Malformed input: one error naming the file and line


def _prepared_error(tmp_path: Path, text: Optional[str], *fragments: str) -> None:
    path = tmp_path / "train.txt"
    if text is not None:
        path.write_text(text)
    good = prepared_file(tmp_path / "test.txt", TEST)
    with pytest.raises(PreprocessingError) as info:
        preprocess_sessions("bad", path, good, data_dir=tmp_path / "data", log=quiet)
    for fragment in (str(path), *fragments):
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not (tmp_path / "data").exists()


HEADER = "SessionId\tItemId\tTime\n"


@pytest.mark.parametrize("text, fragments", [
    (None, ["no such file"]),
    ("", ["the file is empty"]),
    (HEADER, ["a header but no events"]),
    ("1\t2\t3.5\n", ["line 1", "expected the header"]),
    ("SessionId,ItemId,Time\n1,2,3.5\n", ["line 1", "expected the header"]),
    (HEADER + "1\t2\t3.5\n1\t2\n", ["line 3", "wrong number of fields", "found 2"]),
    (HEADER + "1\t2\t3.5\n1\t2\t3.5\t4\n", ["line 3", "found 4"]),
    (HEADER + "1\t2\t3.5\n1,2,3.5\n", ["line 3", "wrong separator"]),
    (HEADER + "1\t2\t3.5\n1\tabc\t3.5\n", ["line 3", "non-numeric ItemId 'abc'"]),
    (HEADER + "1\t2\t3.5\nx1\t2\t3.5\n", ["line 3", "non-numeric SessionId 'x1'"]),
    (HEADER + "1\t2\t3.5\n1\t2\tsoon\n", ["line 3", "non-numeric Time 'soon'"]),
    (HEADER + "1\t2\t3.5\n1\t2\tnan\n", ["line 3", "not a finite number"]),
    (HEADER + "1\t2\t3.5\n1\t-2\t3.5\n", ["line 3", "ItemId -2 is negative"]),
    (HEADER + "1\t2\t3.5\n1\t 2\t3.5\n", ["line 3", "non-numeric ItemId ' 2'"]),
    (HEADER + "1\t2\t3.5\n\n1\t2\t3.5\n", ["line 3", "empty line"]),
])
def test_malformed_prepared_file(tmp_path, text, fragments):
    _prepared_error(tmp_path, text, *fragments)


def test_a_directory_for_a_file_is_named_as_one(tmp_path):
    with pytest.raises(PreprocessingError, match=f"{tmp_path}: is a directory; give the file itself"):
        preprocess_sessions("x", tmp_path, prepared_file(tmp_path / "test.txt", TEST), data_dir=tmp_path / "d",
                            log=quiet)


def test_test_sessions_that_are_training_sessions_are_counted_in_a_warning(tmp_path):
    messages: List[str] = []
    same = prepared_file(tmp_path / "train.txt", TEST)
    preprocess_sessions("x", same, same, data_dir=tmp_path / "d", log=messages.append)
    sessions_in_test = len({row[0] for row in TEST})
    assert [m for m in messages if m.startswith("WARNING: x: ") and
            f"{sessions_in_test} of {sessions_in_test} test sessions" in m and "leakage" in m]


@pytest.mark.parametrize("text, fragments", [
    (None, ["no such file"]),
    ("", ["the file is empty"]),
    ("1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:52:09.277Z,214536502\n", ["line 2", "found 3"]),
    ("1,2014-04-07T10:51:09.277Z,214536502,0\n1\t2014-04-07T10:52:09.277Z\t214536502\t0\n",
     ["line 2", "wrong separator"]),
    ("1,2014-04-07T10:51:09.277Z,214536502,0\n1,yesterday,214536502,0\n",
     ["line 2", "Timestamp 'yesterday' is not an ISO 8601 date-time"]),
    ("1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:52:09.277Z,item9,0\n",
     ["line 2", "non-numeric ItemId 'item9'"]),
    ("SessionId,Timestamp,ItemId,Category\n1,2014-04-07T10:51:09.277Z,214536502,0\n",
     ["line 1", "non-numeric SessionId 'SessionId'"]),
    ("1,2014-04-07T10:51:09.277Z,214536502,0\n-1,2014-04-07T10:52:09.277Z,214536502,0\n",
     ["line 2", "SessionId -1 is negative"]),
])
def test_malformed_clicks(tmp_path, text, fragments):
    path = tmp_path / "yoochoose-clicks.dat"
    if text is not None:
        path.write_text(text)
    with pytest.raises(PreprocessingError) as info:
        preprocess_yoochoose(path, "bad", tmp_path / "data", log=quiet)
    for fragment in (str(path), *fragments):
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not (tmp_path / "data").exists()


def test_clicks_error_in_a_later_chunk_names_its_line(tmp_path):
    path = clicks_file(tmp_path / "clicks.dat", CLICKS)
    with open(path, "a") as f:
        f.write("7,2014-04-07T10:52:09.277Z,oops,0\n")
    with pytest.raises(PreprocessingError, match=f"line {len(CLICKS) + 1}: non-numeric ItemId 'oops'"):
        sessions.parse_clicks(path, chunk_rows=4)


@pytest.mark.parametrize("name", ["", "a/b", "../up", "ml-1m", "synthetic", ".hidden"])
def test_session_names_are_checked(tmp_path, name):
    with pytest.raises(PreprocessingError, match="--name="):
        preprocess_sessions(name, prepared_file(tmp_path / "train.txt", TRAIN),
                            prepared_file(tmp_path / "test.txt", TEST), data_dir=tmp_path, log=quiet)


def test_ensure_preprocessed_for_session_names(tmp_path):
    with pytest.raises(PreprocessingError) as info:
        ensure_preprocessed("my-clicks", tmp_path)
    message = str(info.value)
    assert "unknown data set 'my-clicks'" in message
    assert f"--dataset=sessions --name=my-clicks --train=TRAIN --test=TEST [--valid=VALID] --data_dir={tmp_path}" \
        in message and "--dataset=yoochoose" in message
    preprocess_sessions("other", prepared_file(tmp_path / "train.txt", TRAIN),
                        prepared_file(tmp_path / "test.txt", TEST), data_dir=tmp_path, log=quiet)
    (tmp_path / "my-clicks").mkdir()
    (tmp_path / "my-clicks/sequences.npz").write_bytes((tmp_path / "other/sequences.npz").read_bytes())
    with pytest.raises(PreprocessingError, match="not a valid my-clicks cache .it holds data set 'other'"):
        ensure_preprocessed("my-clicks", tmp_path)


# --------------------------------------------------------------------------------------------------
# The command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "preprocess_public_data.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_sessions_and_yoochoose(tmp_path):
    train, valid, test = (prepared_file(tmp_path / f"{n}.txt", rows) for n, rows in
                          (("train", TRAIN), ("valid", VALID), ("test", TEST)))
    done = _cli("--dataset=sessions", "--name=tiny", f"--train={train}", f"--valid={valid}", f"--test={test}",
                f"--data_dir={tmp_path / 'data'}")
    assert done.returncode == 0, done.stderr
    assert "tiny: sessions 2 train, 1 valid, 1 test; items (candidates) 3, events 10" in done.stdout
    data = load_sequences(ensure_preprocessed("tiny", tmp_path / "data"))
    assert data.user_split.tolist() == [SPLIT_TRAIN, SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST]
    assert data.item_keys.tolist() == ["", "300", "500", "700"] and data.candidate_ids.tolist() == [1, 2, 3]

    clicks = clicks_file(tmp_path / "yoochoose-clicks.dat", CLICKS)
    done = _cli("--dataset=yoochoose", f"--archive={clicks}", f"--data_dir={tmp_path / 'data'}")
    assert done.returncode == 0, done.stderr
    data = load_sequences(ensure_preprocessed("rsc15", tmp_path / "data"))  # the default name
    assert data.user_ids.tolist() == [3, 4, 5, 6, 7, 8, 20, 23, 24]
    assert sorted(p.name for p in (tmp_path / "data/rsc15").iterdir()) == [
        "rsc15_test.txt", "rsc15_train_full.txt", "rsc15_train_tr.txt", "rsc15_train_valid.txt", "sequences.npz"]


@pytest.mark.parametrize("args, message", [
    (["--dataset=sessions", "--train=a", "--test=b"], "needs --name, --train and --test"),
    (["--dataset=sessions", "--name=x", "--train=a", "--test=b", "--archive=c"], "not --archive"),
    (["--dataset=sessions,ml-1m", "--name=x"], "--dataset=sessions goes alone"),
    (["--dataset=yoochoose"], "needs --archive=PATH/yoochoose-clicks.dat"),
    (["--dataset=yoochoose", "--archive=a", "--test=b"], "no --train, --valid or --test"),
    (["--dataset=ml-1m", "--train=a"], "--train: only for --dataset=sessions or yoochoose"),
    (["--dataset=sessions", "--name=x", "--train=/nonexistent/a", "--test=b"], "/nonexistent/a: no such file"),
])
def test_cli_errors(tmp_path, args, message):
    done = _cli(*args, f"--data_dir={tmp_path}")
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------------
# The public 100k subsample, when it is beside the repository


@pytest.mark.skipif(not SHARED_RSC15.exists(), reason=f"{SHARED_RSC15} not present")
def test_real_rsc15_100k_counts(tmp_path):
    start = time.time()
    path = preprocess_sessions("rsc15-100k", SHARED_RSC15 / "yoochoose-clicks-100k_train_full.txt",
                               SHARED_RSC15 / "yoochoose-clicks-100k_test.txt", data_dir=tmp_path, log=quiet)
    assert time.time() - start < 10
    data = load_sequences(path)
    train, test = data.user_split == SPLIT_TRAIN, data.user_split == SPLIT_TEST
    assert (int(train.sum()), int(test.sum())) == (17794, 3416)  # ../shared/data/README.md
    assert int(data.lengths[train].sum()) == 70278 and int(data.lengths[test].sum()) == 13568
    assert data.candidate_ids.size == 2933 and data.lengths.min() >= 2
    assert np.unique(data.item_ids[data.offsets[int(np.argmax(test))]:]).size == 1771
