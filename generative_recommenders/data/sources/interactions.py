"""A user's own interaction log (CSV, TSV, RecBole `.inter`, Parquet) -> one time-ordered sequence per user.

Rows are `user, item, time[, rating]` under a header. Columns are found by name; a name also matches
a RecBole-typed header field (`user_id` matches `user_id:token`). The rules, in RecBole's order:

1. optionally drop repeated (user, item, time) rows, keeping the first in file order;
2. optionally keep only rows with rating >= --min_rating;
3. k-core: drop users with fewer than --min_user_interactions rows and items with fewer than
   --min_item_interactions, repeated until nothing changes (a fixed point: the largest subset where
   both hold, whatever the order of removal);
4. each user's rows sorted by time with a stable sort: rows with equal times keep their file order.

Item ids become 1..n in ascending order of the original ids (numeric when every id is an integer,
else as text); `item_keys` keeps the originals and every item is a candidate. Integer user ids are
kept as the user ids; text ones become 1..n in ascending text order with `user_keys` keeping them.
Times must be numbers (e.g. Unix seconds); they are sorted exactly and stored as whole units (floor).
Without a rating column every rating is 1.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from generative_recommenders.data.parsing import (PARSER_ERRORS, Log, PreprocessingError, check_input_file,
                                                  group_by_user, print_log)
from generative_recommenders.data.sequence_store import SequenceData

if TYPE_CHECKING:
    import pandas as pd

# Column defaults: RecBole's atomic-file names first, then the plain ones.
DEFAULT_COLUMNS = {
    "user": ("user_id:token", "user_id"),
    "item": ("item_id:token", "item_id"),
    "time": ("timestamp:float", "timestamp"),
    "rating": ("rating:float", "rating"),
}
SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".inter": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zip", ".zst")
CHUNK_ROWS = 2_000_000


@dataclasses.dataclass(frozen=True)
class Options:
    """How to read and filter a log (the command's flags)."""

    sep: Optional[str] = None  # None: from the file's extension
    user_col: Optional[str] = None  # None: DEFAULT_COLUMNS
    item_col: Optional[str] = None
    time_col: Optional[str] = None
    rating_col: Optional[str] = None  # None: a `rating` column if the file has one, else every rating is 1
    min_rating: Optional[float] = None
    min_user_interactions: int = 1
    min_item_interactions: int = 1
    drop_duplicates: bool = False


@dataclasses.dataclass(frozen=True)
class Rows:
    """Interactions in file order: codes into the key arrays, times, ratings."""

    users: np.ndarray  # int64 codes into user_keys
    items: np.ndarray  # int64 codes into item_keys
    times: np.ndarray  # int64, or float64 when a time has a fraction
    ratings: np.ndarray  # float32
    user_keys: np.ndarray  # the original ids in order of first appearance: int64, or object (text)
    item_keys: np.ndarray

    def take(self, rows: np.ndarray) -> Rows:
        return dataclasses.replace(self, users=self.users[rows], items=self.items[rows], times=self.times[rows],
                                   ratings=self.ratings[rows])

    def describe(self) -> str:
        return (f"{len(self.users):,} interactions, {_distinct(self.users):,} users, "
                f"{_distinct(self.items):,} items")


def _distinct(codes: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(codes))) if codes.size else 0


# --------------------------------------------------------------------------------------------------
# The file: format, header, columns


@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    sep: Optional[str]  # None: Parquet

    def where(self, row: int) -> str:
        """The place of 0-based data row `row` in messages: a text file's line (the header is line 1)."""
        return f"row {row + 1}" if self.sep is None else f"line {row + 2}"

    def error(self, row: int, column: str, problem: str) -> PreprocessingError:
        return PreprocessingError(f"{self.path}, {self.where(row)}, column {column!r}: {problem}")


def open_source(path: Path, sep: Optional[str]) -> Source:
    """The file and how to read it: Parquet by extension, else delimited text with `sep` or its extension's."""
    check_input_file(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:  # pandas decompresses data.csv.gz itself
        suffixes.pop()
    suffix = suffixes[-1] if suffixes else ""
    if suffix in PARQUET_SUFFIXES:
        if sep is not None:
            raise PreprocessingError(f"{path}: a Parquet file has no separator; leave out --sep")
        if importlib.util.find_spec("pyarrow") is None:
            raise PreprocessingError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow); or write the "
                                     "log as CSV")
        return Source(path, None)
    sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep) if sep is not None else SEPARATORS.get(suffix)
    if sep is None:
        raise PreprocessingError(f"{path}: cannot tell the separator from the extension {suffix or '(none)'!r} "
                                 f"(known: {', '.join(SEPARATORS)}, {', '.join(PARQUET_SUFFIXES)}); give --sep")
    if len(sep) != 1:
        raise PreprocessingError(f"--sep={sep!r}: the separator must be one character")
    return Source(path, sep)


def read_header(source: Source) -> List[str]:
    import pandas as pd

    if source.sep is None:
        import pyarrow.parquet as pq

        return list(pq.read_schema(source.path).names)
    try:
        return [str(name) for name in pd.read_csv(source.path, sep=source.sep, nrows=0, engine="c").columns]
    except pd.errors.EmptyDataError:
        raise PreprocessingError(f"{source.path}: the file is empty") from None
    except PARSER_ERRORS as exc:
        raise PreprocessingError(f"{source.path}, line 1: unreadable header ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _find_column(header: Sequence[str], wanted: Sequence[str]) -> Optional[str]:
    """The header field named one of `wanted` (in that order), or typed like RecBole's (`name:type`)."""
    for name in wanted:
        for field in header:
            if field == name or (":" not in name and field.split(":", 1)[0] == name):
                return field
    return None


def resolve_columns(source: Source, header: Sequence[str], options: Options) -> Dict[str, str]:
    """Role (user, item, time and, where there is one, rating) -> the header field holding it."""
    columns = {}
    for role, default in DEFAULT_COLUMNS.items():
        given = getattr(options, f"{role}_col")
        found = _find_column(header, [given] if given else default)
        if found is None and (role != "rating" or given or options.min_rating is not None):
            place = "the schema" if source.sep is None else "line 1 (the header)"
            names = given or " or ".join(default)
            raise PreprocessingError(f"{source.path}, {place}: no {role} column {names!r} among "
                                     f"{', '.join(map(repr, header))}; name it with --{role}_col")
        if found is not None:
            columns[role] = found
    return columns


# --------------------------------------------------------------------------------------------------
# Reading the rows


class _NotIntegers(Exception):
    """An id column turned out not to hold only integers: it is read again as text."""

    def __init__(self, role: str) -> None:
        super().__init__(role)
        self.role = role


class _KeyCoder:
    """Dense codes of the ids, in order of first appearance, kept across chunks (hashing, not sorting)."""

    def __init__(self) -> None:
        self.keys: Optional["pd.Index"] = None

    def codes(self, values: np.ndarray) -> np.ndarray:
        import pandas as pd

        codes, uniques = pd.factorize(values)
        if self.keys is None:
            self.keys = pd.Index(uniques)
            return codes.astype(np.int64)
        positions = self.keys.get_indexer(uniques)
        new = positions < 0
        positions[new] = len(self.keys) + np.arange(int(new.sum()))
        self.keys = self.keys.append(pd.Index(uniques[new]))
        return positions[codes].astype(np.int64)


def _chunks(source: Source, columns: Dict[str, str], text_roles: frozenset) -> Iterator["pd.DataFrame"]:
    import pandas as pd

    names = list(dict.fromkeys(columns.values()))
    if source.sep is None:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(source.path).iter_batches(batch_size=CHUNK_ROWS, columns=names):
            yield batch.to_pandas()
        return
    dtypes = {columns[role]: str for role in text_roles}
    # Every column is read: with usecols, pandas silently drops a line's extra fields. Only empty fields are
    # missing (not "NA", "null", ...: those can be ids); blank lines stay rows, so a row's line is its index + 2.
    with pd.read_csv(source.path, sep=source.sep, dtype=dtypes, engine="c", chunksize=CHUNK_ROWS,
                     keep_default_na=False, na_values=[""], skip_blank_lines=False,
                     quoting=csv.QUOTE_MINIMAL) as reader:
        for chunk in reader:
            yield chunk[names]


def _first_missing(values: "pd.Series") -> Optional[int]:
    missing = np.flatnonzero(values.isna().to_numpy())
    return int(missing[0]) if missing.size else None


def _ids(source: Source, values: "pd.Series", first_row: int, role: str, text: bool) -> np.ndarray:
    """The column's ids: int64, or (text) an object array of str; raises _NotIntegers to be read as text."""
    if not text:
        if values.dtype.kind not in "iu":
            raise _NotIntegers(role)
        return values.to_numpy(dtype=np.int64)
    row = _first_missing(values)
    if row is not None:
        raise source.error(first_row + row, str(values.name), f"empty {role} id")
    return values.astype(str).to_numpy(dtype=object)


def _numbers(source: Source, values: "pd.Series", first_row: int, what: str) -> np.ndarray:
    """The column as int64 or float64 numbers; the first missing, non-numeric or infinite value is an error."""
    import pandas as pd

    if values.dtype.kind in "iu":
        return values.to_numpy(dtype=np.int64)
    if values.dtype.kind == "b":
        raise source.error(first_row, str(values.name), f"the {what} column holds true/false, not numbers")
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numbers))
    if bad.size:
        row = int(bad[0])
        text = values.iloc[row]
        problem = (f"empty {what}" if pd.isna(text) or str(text).strip() == ""
                   else f"{what} {str(text)!r} is not a finite number" if np.isinf(numbers[row])
                   else f"non-numeric {what} {str(text)!r} (expected a number, e.g. Unix seconds)")
        raise source.error(first_row + row, str(values.name), problem)
    integral = numbers == np.floor(numbers)
    return numbers.astype(np.int64) if integral.all() and (np.abs(numbers) < 2**53).all() else numbers


def _read(source: Source, columns: Dict[str, str], text_roles: frozenset, log: Log) -> Rows:
    coders = {"user": _KeyCoder(), "item": _KeyCoder()}
    parts: Dict[str, List[np.ndarray]] = {"users": [], "items": [], "times": [], "ratings": []}
    rows, last_report, start = 0, time.time(), time.time()
    try:
        for chunk in _chunks(source, columns, text_roles):
            for role, key in (("user", "users"), ("item", "items")):
                ids = _ids(source, chunk[columns[role]], rows, role, role in text_roles)
                parts[key].append(coders[role].codes(ids))
            parts["times"].append(_numbers(source, chunk[columns["time"]], rows, "timestamp"))
            if "rating" in columns:
                parts["ratings"].append(_numbers(source, chunk[columns["rating"]], rows, "rating").astype(np.float32))
            rows += len(chunk)
            if time.time() - last_report > 10:
                log(f"  read {rows:,} rows ({time.time() - start:.0f} s)")
                last_report = time.time()
    except PARSER_ERRORS as exc:  # the C parser's own message names the line ("Expected 3 fields in line 7")
        raise PreprocessingError(f"{source.path}: could not parse the file ({_first_line(exc)})") from None
    if rows == 0:
        raise PreprocessingError(f"{source.path}: the file has a header but no rows" if source.sep is not None
                                 else f"{source.path}: the file has no rows")
    ratings = np.concatenate(parts["ratings"]) if parts["ratings"] else np.ones(rows, dtype=np.float32)
    keys = {role: coder.keys.to_numpy() for role, coder in coders.items()}
    return Rows(np.concatenate(parts["users"]), np.concatenate(parts["items"]), np.concatenate(parts["times"]),
                ratings, keys["user"], keys["item"])


def read_rows(source: Source, columns: Dict[str, str], log: Log = print_log) -> Rows:
    """Every row of the file; an id column is integers if every value parses as one, else text."""
    text_roles: frozenset = frozenset()
    while True:
        try:
            return _read(source, columns, text_roles, log)
        except _NotIntegers as exc:  # at most twice: once per id column
            text_roles = text_roles | {exc.role}


# --------------------------------------------------------------------------------------------------
# Filters and sequences


def without_duplicates(rows: Rows) -> Rows:
    """The first of each group of rows with the same (user, item, time), in file order."""
    import pandas as pd

    repeated = pd.DataFrame({"u": rows.users, "i": rows.items, "t": rows.times}).duplicated(keep="first")
    return rows.take(np.flatnonzero(~repeated.to_numpy()))


def k_core(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> Tuple[np.ndarray, int]:
    """Rows kept once every user has >= min_user rows and every item >= min_item (repeated to a fixed
    point, as RecBole filters), and the number of rounds that removed rows."""
    keep = np.arange(len(users))
    rounds = 0
    while keep.size:
        u, i = users[keep], items[keep]
        ok = (np.bincount(u)[u] >= min_user) & (np.bincount(i)[i] >= min_item)
        if ok.all():
            break
        keep, rounds = keep[ok], rounds + 1
    return keep, rounds


def sorted_codes(codes: np.ndarray, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Codes renumbered 0..m-1 in ascending order of the keys still used, and those keys in that order."""
    used = np.flatnonzero(np.bincount(codes, minlength=len(keys)))
    order = used[np.argsort(keys[used], kind="stable")]
    rank = np.zeros(len(keys), dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank[codes], keys[order]


def to_sequences(name: str, rows: Rows) -> SequenceData:
    users, user_keys = sorted_codes(rows.users, rows.user_keys)
    items, item_keys = sorted_codes(rows.items, rows.item_keys)
    order, _, offsets = group_by_user(users, rows.times)  # stable: equal times keep their file order
    text_users = user_keys.dtype == object
    times = rows.times[order]
    return SequenceData(
        name=name,
        item_ids=(items[order] + 1).astype(np.int32),
        ratings=rows.ratings[order],
        timestamps=(np.floor(times) if times.dtype.kind == "f" else times).astype(np.int64),
        offsets=offsets,
        user_ids=np.arange(1, user_keys.size + 1, dtype=np.int64) if text_users else user_keys.astype(np.int64),
        candidate_ids=np.arange(1, item_keys.size + 1, dtype=np.int32),
        item_keys=np.concatenate([[""], item_keys.astype(str)]),
        user_keys=user_keys.astype(str) if text_users else None,
    )


def build_interactions(name: str, path: Path, options: Options = Options(), log: Log = print_log) -> SequenceData:
    """The whole pipeline of the module docstring; messages go to `log`."""
    for flag in ("min_user_interactions", "min_item_interactions"):
        if getattr(options, flag) < 1:
            raise PreprocessingError(f"--{flag}={getattr(options, flag)}: must be at least 1")
    source = open_source(path, options.sep)
    columns = resolve_columns(source, read_header(source), options)
    start = time.time()
    log(f"{name}: reading {path} (columns: {', '.join(f'{r} {c!r}' for r, c in columns.items())})")
    rows = read_rows(source, columns, log)
    log(f"{name}: read {rows.describe()} in {time.time() - start:.1f} s")
    steps = []
    if options.drop_duplicates:
        rows = without_duplicates(rows)
        steps.append("dropping repeated (user, item, time) rows")
        log(f"  without repeated (user, item, time) rows: {rows.describe()}")
    if options.min_rating is not None:
        rows = rows.take(np.flatnonzero(rows.ratings >= options.min_rating))
        steps.append(f"--min_rating={options.min_rating:g}")
        log(f"  ratings >= {options.min_rating:g}: {rows.describe()}")
    if options.min_user_interactions > 1 or options.min_item_interactions > 1:
        keep, rounds = k_core(rows.users, rows.items, options.min_user_interactions, options.min_item_interactions)
        rows = rows.take(keep)
        steps.append(f"the {options.min_user_interactions}/{options.min_item_interactions}-core")
        log(f"  users with >= {options.min_user_interactions} and items with >= {options.min_item_interactions} "
            f"interactions (a fixed point after {rounds} round{'' if rounds == 1 else 's'} of removal): "
            f"{rows.describe()}")
    if rows.users.size == 0:
        raise PreprocessingError(f"{path}: no interactions left after {' then '.join(steps)}")
    return to_sequences(name, rows)
