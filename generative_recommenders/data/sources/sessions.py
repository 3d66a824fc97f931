"""Session-based data (RSC15 / YOOCHOOSE clicks, GRU4Rec's preparation): each session is one sequence.

Two inputs:
- prepared split files, tab-separated with the header `SessionId ItemId Time` (Unix seconds with
  a fraction), as GRU4Rec's preparation writes them: a train file, a test file, optionally a
  validation file;
- the raw challenge file `yoochoose-clicks.dat` (`SessionId,Timestamp,ItemId,Category`, no
  header, ISO 8601 UTC timestamps), prepared here with GRU4Rec's rules (`prepare_clicks`).

Item ids become 1..n in ascending order of the original ids over the items of the training
sessions (0 is padding); `item_keys` keeps the originals and every training item is a candidate.
Events of validation/test sessions on items absent from training are dropped, then sessions left
shorter than 2 (GRU4Rec's rule). Sequences are ordered train, valid, test, with `user_split`
saying which, `user_ids` the original session ids, timestamps in whole seconds (floor).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from generative_recommenders.data.parsing import (
    DIGITS,
    PARSER_ERRORS,
    Field,
    Log,
    PreprocessingError,
    check_input_file,
    comma_file_checker,
    group_by_user,
    print_log,
    read_headed_table,
)
from generative_recommenders.data.sequence_store import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, SequenceData

if TYPE_CHECKING:
    import pandas as pd

PREPARED_HEADER = "SessionId\tItemId\tTime"
_PREPARED_FIELDS = (Field("SessionId", "int"), Field("ItemId", "int"), Field("Time", "float"))
_CLICK_FIELDS = (Field("SessionId", "int"), Field("Timestamp", "time"), Field("ItemId", "int"),
                 Field("Category", "any"))
DAY_S = 86_400  # the test (and validation) split: sessions ending in the data's last day
MIN_ITEM_CLICKS = 5
MIN_SESSION_LENGTH = 2
_SPLIT_NAMES = {SPLIT_TRAIN: "train", SPLIT_VALID: "valid", SPLIT_TEST: "test"}


@dataclasses.dataclass(frozen=True)
class Events:
    """Clicks, one row each: session id, original item id, Unix time in seconds."""

    source: str  # the file (or split) they come from, for messages
    sessions: np.ndarray  # int64
    items: np.ndarray  # int64
    times: np.ndarray  # float64

    def take(self, rows: np.ndarray) -> Events:
        return dataclasses.replace(self, sessions=self.sessions[rows], items=self.items[rows], times=self.times[rows])

    def describe(self) -> str:
        return (f"{len(self.sessions):,} events, {_num_distinct(self.sessions):,} sessions, "
                f"{_num_distinct(self.items):,} items")


def _num_distinct(values: np.ndarray) -> int:
    import pandas as pd

    return len(pd.unique(values))


def _row_counts(keys: np.ndarray) -> np.ndarray:
    """For each row, the number of rows with its key (hashing: the full click log has 33M rows)."""
    import pandas as pd

    codes, _ = pd.factorize(keys)
    return np.bincount(codes)[codes]


# --------------------------------------------------------------------------------------------------
# Reading


def _check_prepared(frame: "pd.DataFrame") -> Optional[str]:
    if (frame["SessionId"].to_numpy() < 0).any() or (frame["ItemId"].to_numpy() < 0).any():
        return "a negative id"
    return None if np.isfinite(frame["Time"].to_numpy()).all() else "a time is not a finite number"


def read_prepared(path: Path) -> Events:
    """A prepared split file: header `SessionId<TAB>ItemId<TAB>Time`, one event per line."""
    check_input_file(path)
    names = [field.name for field in _PREPARED_FIELDS]
    frame = read_headed_table(
        path.read_bytes(), str(path), "\t", PREPARED_HEADER, _PREPARED_FIELDS,
        dtypes=dict(zip(names, (np.int64, np.int64, np.float64))), allowed=DIGITS + b"\t.-+eE\r\n",
        what="events", check=_check_prepared)
    return Events(str(path), *(frame[name].to_numpy() for name in names))


def _click_times(texts: np.ndarray) -> Optional[np.ndarray]:
    """ISO 8601 timestamps -> Unix seconds (UTC where no zone is given); None if one does not parse."""
    import pandas as pd

    try:
        stamps = pd.to_datetime(texts, format="ISO8601", utc=True)
    except PARSER_ERRORS:
        return None
    return None if stamps.isna().any() else stamps.as_unit("us").asi8 / 1e6


def parse_clicks(path: Path, chunk_rows: int = 2_000_000) -> Events:
    """yoochoose-clicks.dat: `SessionId,Timestamp,ItemId,Category` lines, read in chunks (the file has 33M)."""
    import pandas as pd

    source = str(path)
    fail, lines = comma_file_checker(path, _CLICK_FIELDS)
    columns: Dict[str, List[np.ndarray]] = {"sessions": [], "items": [], "times": []}
    try:
        with pd.read_csv(path, header=None, names=[f.name for f in _CLICK_FIELDS], usecols=[0, 1, 2],
                         dtype={"SessionId": np.int64, "Timestamp": object, "ItemId": np.int64}, engine="c",
                         quoting=csv.QUOTE_NONE, skip_blank_lines=False, na_filter=False,
                         chunksize=chunk_rows) as reader:
            for chunk in reader:
                times = _click_times(chunk["Timestamp"].to_numpy(dtype=object))
                sessions, items = chunk["SessionId"].to_numpy(), chunk["ItemId"].to_numpy()
                if times is None or (sessions < 0).any() or (items < 0).any():
                    raise fail("a bad timestamp or a negative id")
                columns["sessions"].append(sessions)
                columns["items"].append(items)
                columns["times"].append(times)
    except PARSER_ERRORS as exc:
        raise fail(str(exc)) from exc
    events = Events(source, **{key: np.concatenate(parts) for key, parts in columns.items()})
    if len(events.sessions) != lines:
        raise fail("row count")
    return events


# --------------------------------------------------------------------------------------------------
# GRU4Rec's preparation of the raw clicks


def split_last_day(events: Events, first: str, second: str) -> Tuple[Events, Events]:
    """Sessions whose last click falls in the data's final day go to the second part, keeping only
    items of the first part and sessions still of length >= 2 (GRU4Rec's test and validation split)."""
    import pandas as pd

    codes, uniques = pd.factorize(events.sessions)
    last = np.full(len(uniques), -np.inf)
    np.maximum.at(last, codes, events.times)
    in_last_day = last[codes] >= events.times.max() - DAY_S
    before = dataclasses.replace(events.take(~in_last_day), source=first)
    after = dataclasses.replace(events.take(in_last_day), source=second)
    after = after.take(np.isin(after.items, before.items))
    after = after.take(_row_counts(after.sessions) >= MIN_SESSION_LENGTH)
    for part in (before, after):
        if len(part.sessions) == 0:
            raise PreprocessingError(f"{events.source}: {part.source} is empty (split off: the sessions ending in "
                                     f"the last {DAY_S:,} s, on items seen before them, of length >= 2)")
    return before, after


def prepare_clicks(events: Events, log: Log = print_log) -> Dict[str, Events]:
    """GRU4Rec's rules: drop sessions of length 1, then items with < 5 clicks, then sessions shorter
    than 2; test = sessions ending in the last day, validation the same inside train.

    Returns the parts under GRU4Rec's file names: train_full, test, train_tr, train_valid; each
    grouped by session (ascending id), in time order within a session (stable: file order on ties).
    """
    log(f"{events.source}: {events.describe()}")
    events = events.take(_row_counts(events.sessions) > 1)
    log(f"  sessions of length > 1: {events.describe()}")
    events = events.take(_row_counts(events.items) >= MIN_ITEM_CLICKS)
    log(f"  then items with >= {MIN_ITEM_CLICKS} clicks: {events.describe()}")
    events = events.take(_row_counts(events.sessions) >= MIN_SESSION_LENGTH)
    log(f"  then sessions of length >= {MIN_SESSION_LENGTH}: {events.describe()}")
    if len(events.sessions) == 0:
        raise PreprocessingError(f"{events.source}: no clicks left after GRU4Rec's filters")
    train_full, test = split_last_day(events, "train_full", "test")
    train_tr, valid = split_last_day(train_full, "train_tr", "train_valid")
    parts = {part.source: part for part in (train_full, test, train_tr, valid)}
    for name, part in parts.items():
        log(f"  {name}: {part.describe()}")
    return {name: part.take(group_by_user(part.sessions, part.times)[0]) for name, part in parts.items()}


def write_prepared(events: Events, path: Path, rows_per_block: int = 100_000) -> None:
    """GRU4Rec's prepared layout: tab-separated `SessionId ItemId Time` with a header, in the given row order.

    Times are written as Python's repr (shortest exact form, as pandas writes them); formatting the
    lines directly is twice as fast as DataFrame.to_csv.
    """
    with open(path, "w", encoding="ascii") as f:
        f.write(PREPARED_HEADER + "\n")
        for first in range(0, len(events.sessions), rows_per_block):
            block = slice(first, first + rows_per_block)
            rows = zip(events.sessions[block].tolist(), events.items[block].tolist(), events.times[block].tolist())
            f.write("".join([f"{session}\t{item}\t{time!r}\n" for session, item, time in rows]))


# --------------------------------------------------------------------------------------------------
# Splits -> sequences


def _known_items_only(name: str, events: Events, items: np.ndarray, log: Log) -> Events:
    """GRU4Rec's rule for evaluation sessions: drop events of items never seen in training, then
    sessions left shorter than 2."""
    known = np.isin(events.items, items)
    kept = events.take(known)
    long_enough = _row_counts(kept.sessions) >= MIN_SESSION_LENGTH
    result = kept.take(long_enough)
    sessions_before, sessions_after = _num_distinct(events.sessions), _num_distinct(result.sessions)
    log(f"{name}: {events.source}: dropped {int((~known).sum()):,} events of items absent from training, then "
        f"{int((~long_enough).sum()):,} events of sessions left shorter than {MIN_SESSION_LENGTH}: "
        f"{sessions_before - sessions_after:,} of {sessions_before:,} sessions dropped; {result.describe()} left")
    if len(result.sessions) == 0:
        raise PreprocessingError(f"{events.source}: no session is left after dropping events of items absent from "
                                 f"the training file and sessions shorter than {MIN_SESSION_LENGTH}")
    return result


def _warn_shared_sessions(name: str, split: str, events: Events, train: Events, log: Log) -> None:
    """Logs how many evaluation sessions are training sessions too (same id): evaluated on what was trained on."""
    ids = np.unique(events.sessions)
    shared = int(np.isin(ids, train.sessions).sum())
    if shared:
        log(f"WARNING: {name}: {shared:,} of {len(ids):,} {split} sessions of {events.source} are also training "
            f"sessions of {train.source} (same session id): the {split} metrics would measure leakage, not "
            f"generalisation; check that the files are not swapped or the same")


def build_sessions(name: str, train: Events, test: Events, valid: Optional[Events] = None,
                   log: Log = print_log) -> SequenceData:
    """One sequence per session, ordered train, valid, test."""
    keys = np.unique(train.items)
    parts = [(SPLIT_TRAIN, train)] + [(split, _known_items_only(name, events, keys, log))
                                      for split, events in ((SPLIT_VALID, valid), (SPLIT_TEST, test))
                                      if events is not None]
    for split, events in parts[1:]:
        _warn_shared_sessions(name, _SPLIT_NAMES[split], events, train, log)
    item_ids, timestamps, lengths, session_ids, splits = [], [], [], [], []
    for split, events in parts:
        order, ids, offsets = group_by_user(events.sessions, events.times)
        item_ids.append(np.searchsorted(keys, events.items[order]) + 1)
        timestamps.append(np.floor(events.times[order]).astype(np.int64))
        lengths.append(np.diff(offsets))
        session_ids.append(ids)
        splits.append(np.full(len(ids), split, dtype=np.int8))
    data = SequenceData(
        name=name,
        item_ids=np.concatenate(item_ids).astype(np.int32),
        ratings=np.ones(sum(map(len, item_ids)), dtype=np.float32),  # a click; sessions have no ratings
        timestamps=np.concatenate(timestamps),
        offsets=np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64),
        user_ids=np.concatenate(session_ids),
        candidate_ids=np.arange(1, len(keys) + 1, dtype=np.int32),
        user_split=np.concatenate(splits),
        item_keys=np.array([""] + [str(key) for key in keys.tolist()]),
    )
    return data


def describe_splits(data: SequenceData) -> str:
    """E.g. "sessions 2 train, 1 valid, 1 test; items (candidates) 3, events 10"."""
    counts = np.bincount(data.user_split, minlength=len(_SPLIT_NAMES))
    per_split = ", ".join(f"{counts[split]:,} {name}" for split, name in _SPLIT_NAMES.items() if counts[split])
    return f"sessions {per_split}; items (candidates) {data.candidate_ids.size:,}, events {data.num_interactions:,}"
