"""Shared pieces of the raw-file parsers: line checks, error diagnosis, grouping rows into sequences.

Parsers read clean files vectorised (pandas' C parser after cheap global checks). Only when a
check or the parser fails is the file scanned line by line (`diagnose`), so that the one error
raised names the file and its first bad line; clean files never pay for that scan.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import re
from datetime import datetime
from pathlib import Path
from typing import (TYPE_CHECKING, Callable, ContextManager, Iterable, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple)

import numpy as np

from generative_recommenders.data.sequence_store import SequenceData

if TYPE_CHECKING:
    import pandas as pd

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
DIGITS = b"0123456789"
PARSER_ERRORS = (ValueError, OverflowError)  # pandas' ParserError and UnicodeDecodeError are ValueErrors

Log = Callable[[str], None]


def print_log(message: str) -> None:
    print(message, flush=True)


class PreprocessingError(Exception):
    """A problem the user can fix (bad or missing input, failed download); the CLI prints it and exits 1."""


def check_input_file(path: Path, source: str = "") -> None:
    """Raises PreprocessingError unless `path` is a regular file (`source`: how the message names it)."""
    source = source or str(path)
    if path.is_dir():
        raise PreprocessingError(f"{source}: is a directory; give the file itself")
    if not path.is_file():
        raise PreprocessingError(f"{source}: no such file")


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


# --------------------------------------------------------------------------------------------------
# Validating delimited text: precise errors for the first bad line


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    # "id": integer >= 1; "int": integer >= 0; "float": finite number; "time": ISO 8601 date-time;
    # "str": non-empty; "any"
    kind: str


_INT_RE = re.compile(r"-?\d+\Z")  # strict: no spaces or '+' (the MovieLens fast paths reject them too)
_OTHER_SEPARATORS = ("::", ",", "\t", ";", "|")


def _float_problem(field: Field, text: str) -> Optional[str]:
    try:
        value = float(text)
    except ValueError:
        return f"non-numeric {field.name} {text!r}"
    if text != text.strip():
        return f"{field.name} {text!r} has spaces"
    return None if math.isfinite(value) else f"{field.name} {text!r} is not a finite number"


def _time_problem(field: Field, text: str) -> Optional[str]:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return f"{field.name} {text!r} is not an ISO 8601 date-time (e.g. 2014-04-07T10:51:09.277Z)"
    return None


def _integer_problem(field: Field, text: str) -> Optional[str]:
    if not _INT_RE.match(text):
        return f"non-numeric {field.name} {text!r} (expected an integer)"
    value = int(text)
    if field.kind == "id" and value <= 0:
        return f"{field.name} {value} is not a positive integer (ids start at 1; 0 is padding)"
    if field.kind == "id" and value > INT32_MAX:
        return f"{field.name} {value} is too large (ids must fit in 32 bits)"
    if value < 0:
        return f"{field.name} {value} is negative"
    if value > INT64_MAX:
        return f"{field.name} {value} is too large (integers must fit in 64 bits)"
    return None


def field_problem(field: Field, text: str) -> Optional[str]:
    if field.kind == "any":
        return None
    if field.kind == "str":
        return None if text.strip() else f"empty {field.name}"
    if field.kind == "float":
        return _float_problem(field, text)
    if field.kind == "time":
        return _time_problem(field, text)
    return _integer_problem(field, text)


def line_problem(line: str, sep: str, fields: Sequence[Field]) -> Optional[str]:
    if not line.strip():
        return "empty line"
    parts = line.split(sep)
    if len(parts) != len(fields):
        expected = f"expected {len(fields)} fields ({', '.join(f.name for f in fields)}) separated by {sep!r}"
        other = next((s for s in _OTHER_SEPARATORS if s not in sep and sep not in s and s in line), None)
        if len(parts) == 1 or other is not None:
            return f"wrong separator: {expected}" + (f", the line uses {other!r}" if other else "")
        return f"wrong number of fields: {expected}, found {len(parts)}"
    for part, field in zip(parts, fields):
        problem = field_problem(field, part)
        if problem:
            return problem
    return None


def line_error(source: str, lineno: int, problem: str, line: str) -> PreprocessingError:
    shown = line if len(line) <= 100 else line[:97] + "..."
    return PreprocessingError(f"{source}, line {lineno}: {problem} (line: {shown!r})")


def _scan(lines: Iterable[bytes], source: str, sep: str, fields: Sequence[Field], first_lineno: int,
          encoding: str) -> Optional[PreprocessingError]:
    """The error for the first bad line, or None when every line is fine."""
    for lineno, raw in enumerate(lines, start=first_lineno):
        try:
            line = raw.decode(encoding).rstrip("\r\n")
        except UnicodeDecodeError as exc:
            return line_error(source, lineno, f"not valid {encoding} ({exc.reason})", raw.decode("latin-1"))
        problem = line_problem(line, sep, fields)
        if problem:
            return line_error(source, lineno, problem, line)
    return None


def diagnose(source: str, open_lines: Callable[[], ContextManager], sep: str, fields: Sequence[Field],
             skip_lines: int, encoding: str, reason: str) -> PreprocessingError:
    """Called after a fast check failed: re-reads the file line by line to name the first bad line."""
    with open_lines() as stream:
        error = _scan(itertools.islice(stream, skip_lines, None), source, sep, fields, skip_lines + 1, encoding)
    return error or PreprocessingError(f"{source}: could not parse the file ({reason})")


def count_lines(data: bytes) -> int:
    """Lines of text in `data`; a final newline ends the last line and does not start another."""
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def is_blank(data: bytes) -> bool:
    return not data or data.isspace()  # isspace stops at the first other byte; strip() would copy


def has_bytes_outside(data: bytes, allowed: bytes, start: int = 0, chunk_bytes: int = 1 << 25) -> bool:
    """Whether data[start:] has a byte not in `allowed` (in chunks, to bound temporary memory)."""
    view = memoryview(data)
    return any(bytes(view[pos:pos + chunk_bytes]).translate(None, allowed)
               for pos in range(start, len(data), chunk_bytes))


def count_separators_and_lines(path: Path, sep: bytes, chunk_bytes: int = 1 << 26) -> Tuple[int, int]:
    """Occurrences of `sep` and lines in a file, read in chunks (`sep` is one byte)."""
    separators = newlines = 0
    last = b""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            separators += chunk.count(sep)
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    return separators, newlines + (0 if last in (b"\n", b"") else 1)


def comma_file_checker(path: Path, fields: Sequence[Field]) -> Tuple[Callable[[str], PreprocessingError], int]:
    """Checks a large headerless comma-separated file before pandas reads it in chunks.

    The file must exist, be non-empty and hold len(fields) - 1 commas per line (pandas would silently
    drop extra fields). Returns `fail(reason)`, which re-reads it line by line to name the first bad
    line, and the number of lines (the rows pandas must return).
    """
    source = str(path)
    check_input_file(path)
    if path.stat().st_size == 0:
        raise PreprocessingError(f"{source}: the file is empty")

    def fail(reason: str) -> PreprocessingError:
        return diagnose(source, lambda: open(path, "rb"), ",", fields, 0, "utf-8", reason)

    commas, lines = count_separators_and_lines(path, b",")
    if commas != (len(fields) - 1) * lines:
        raise fail("wrong separator or number of fields")
    return fail, lines


def parse_small(data: bytes, source: str, sep: str, fields: Sequence[Field], encoding: str) -> List[List[str]]:
    """Line-by-line parsing for the small metadata files (a few thousand lines)."""
    if not data.strip():
        raise PreprocessingError(f"{source}: the file is empty")
    rows = []
    for lineno, raw in enumerate(io.BytesIO(data), start=1):
        line = raw.decode(encoding).rstrip("\r\n")
        problem = line_problem(line, sep, fields)
        if problem:
            raise line_error(source, lineno, problem, line)
        rows.append(line.split(sep))
    return rows


def decode(data: bytes, source: str, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise PreprocessingError(f"{source}, line {lineno}: not valid {encoding} ({exc.reason})") from exc


def read_headed_table(data: bytes, source: str, sep: str, header: str, fields: Sequence[Field],
                      dtypes: Mapping[str, type], allowed: bytes, what: str,
                      check: Callable[["pd.DataFrame"], Optional[str]]) -> "pd.DataFrame":
    """A delimited text file with a header line, parsed by pandas into a DataFrame (columns = field names).

    Global checks first (only `allowed` bytes after the header, the separator count), then pandas,
    then `check(frame)` on the values; any failure becomes the error for the first bad line.
    `what` names the rows in the message for a file that has only the header.
    """
    import pandas as pd  # imported here: loading a cache (ensure_preprocessed) does not need it

    if is_blank(data):
        raise PreprocessingError(f"{source}: the file is empty")
    header_end = data.find(b"\n")
    found = data[: header_end if header_end >= 0 else len(data)].decode("latin-1").rstrip("\r")
    if found != header:
        raise line_error(source, 1, f"expected the header {header!r}", found)
    lines = count_lines(data) - 1
    if lines == 0:
        raise PreprocessingError(f"{source}: the file has a header but no {what}")

    def fail(reason: str) -> PreprocessingError:
        return diagnose(source, lambda: io.BytesIO(data), sep, fields, 1, "latin-1", reason)

    if has_bytes_outside(data, allowed, start=header_end + 1):
        raise fail("unexpected characters")
    separator = sep.encode()
    if data.count(separator) - header.count(sep) != (len(fields) - 1) * lines:  # pandas would drop extra fields
        raise fail("wrong separator or number of fields")
    names = [field.name for field in fields]
    try:
        frame = pd.read_csv(io.BytesIO(data), sep=sep, skiprows=1, header=None, names=names, dtype=dtypes,
                            engine="c", skip_blank_lines=False, na_filter=False)
    except PARSER_ERRORS as exc:
        raise fail(str(exc)) from exc
    problem = "row count" if len(frame) != lines else check(frame)
    if problem:
        raise fail(problem)
    return frame


# --------------------------------------------------------------------------------------------------
# Rows -> per-user sequences


class Ratings(NamedTuple):
    """One row per rating, in file order."""

    users: np.ndarray  # int64 (MovieLens ids) or int32 (dense codes)
    items: np.ndarray
    ratings: np.ndarray  # float32
    timestamps: np.ndarray  # int64


def warn_duplicate_rows(name: str, rows: Ratings, source: str, log: Log) -> None:
    """Logs how many rows repeat an earlier row exactly (kept: the release kept them; a count says how many)."""
    import pandas as pd

    duplicates = int(pd.DataFrame(rows._asdict()).duplicated().sum())
    if duplicates:
        log(f"WARNING: {name}: {duplicates:,} rows of {source} repeat an earlier row exactly (same user, item, "
            f"rating and time); kept as they are")


def user_time_order(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Stable argsort by (user, timestamp); timestamps may be integers or floats."""
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(timestamps.dtype, np.integer):
        user_min, time_min = int(users.min()), int(timestamps.min())
        time_span = int(timestamps.max()) - time_min + 1
        if (int(users.max()) - user_min + 1) * time_span < 2**63:
            # One sort of a combined key: the files are mostly grouped by user already, which timsort exploits.
            key = (users.astype(np.int64) - user_min) * time_span + (timestamps.astype(np.int64) - time_min)
            return np.argsort(key, kind="stable")
    order = np.argsort(timestamps, kind="stable")
    return order[np.argsort(users[order], kind="stable")]


def group_by_user(users: np.ndarray, timestamps: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row order that groups rows by ascending user and sorts each user's rows by time; user ids; offsets.

    The sort is stable, so rows with equal timestamps keep their file order. (The release sorted
    with pandas' default, non-stable sort, so the order of tied rows was arbitrary there.)
    """
    order = user_time_order(users, timestamps)
    sorted_users = users[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_users[1:] != sorted_users[:-1]]))
    offsets = np.concatenate([starts, [len(order)]]).astype(np.int64)
    return order, sorted_users[starts].astype(np.int64), offsets


def to_sequences(name: str, rows: Ratings, candidates: np.ndarray, item_shift: int = 0) -> SequenceData:
    order, user_ids, offsets = group_by_user(rows.users, rows.timestamps)
    return SequenceData(
        name=name,
        item_ids=(rows.items[order] + item_shift).astype(np.int32),
        ratings=rows.ratings[order].astype(np.float32),
        timestamps=rows.timestamps[order].astype(np.int64),
        offsets=offsets,
        user_ids=user_ids,
        candidate_ids=np.asarray(candidates, dtype=np.int32),
    )
