"""The paper's three public data sets: download, parse, filter, cache.

ml-1m and ml-20m (MovieLens) keep their movie ids; amzn-books (Amazon Books
ratings) is filtered in one pass (items and users with >= 5 rows) and mapped
to dense ids. Every data set becomes `<data_dir>/<name>/sequences.npz` (the
flat cache of `sequence_store`, the only file the trainer reads) plus
`sasrec_format.csv` in the release's layout, for people and other tools.

Parsing is vectorised (pandas' C parser on bytes that passed cheap global
checks). Only when a check or the parser fails is the file scanned line by
line, so that the error names the first bad line; clean files never pay for
that scan.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import http.client
import io
import itertools
import json
import math
import re
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Callable, ContextManager, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from generative_recommenders.data.sequence_store import (
    CACHE_FILE,
    FORMAT_VERSION,
    SequenceData,
    atomic_write,
    save_sequences,
)

DEFAULT_DATA_DIR = "tmp/"
CSV_FILE = "sasrec_format.csv"
MIN_COUNT = 5  # Amazon Books: items and users need >= 5 rows; users need >= 5 items after filtering
_INT32_MAX = 2**31 - 1

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


class PreprocessingError(Exception):
    """A problem the user can fix (bad or missing input, failed download); the CLI prints it and exits 1."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    url: str
    expected: Mapping[str, int]  # counts of the official files, compared by `check_counts`
    size: Optional[int] = None  # bytes of the official download, where known
    sha256: Optional[str] = None
    integer_ratings: bool = False  # written as integers in sasrec_format.csv
    csv_item_offset: int = 0  # added to the cached item ids in sasrec_format.csv

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def is_zip(self) -> bool:
        return self.archive_name.endswith(".zip")


DATASETS: Dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="ml-1m",
            url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
            expected={"users": 6040, "items": 3706, "max_item_id": 3952, "interactions": 1000209, "candidates": 3883},
            integer_ratings=True,
        ),
        DatasetSpec(
            name="ml-20m",
            url="https://files.grouplens.org/datasets/movielens/ml-20m.zip",
            expected={"users": 138493, "items": 26744, "max_item_id": 131262, "interactions": 20000263,
                      "candidates": 27278},
        ),
        DatasetSpec(
            name="amzn-books",
            url="https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/ratings_Books.csv",
            expected={"raw_rows": 22507155, "candidates": 695762, "max_item_id": 695762},
            size=916259383,
            sha256="411873640232eaa462881c67e9b5e07ce4f1a4c135cf5c7a98ccd3a33901dc11",
            # The release's CSV holds the 0-based dense codes; the cache stores code + 1 (0 = padding).
            csv_item_offset=-1,
        ),
    )
}

_COUNT_LABELS = {
    "raw_rows": "raw rows",
    "users": "users",
    "items": "rated items",
    "max_item_id": "max item id",
    "interactions": "ratings",
    "candidates": "candidate items",
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise PreprocessingError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def cache_path(name: str, data_dir: str | Path) -> Path:
    return Path(data_dir) / name / CACHE_FILE


def preprocess_command(name: str, data_dir: str | Path = DEFAULT_DATA_DIR) -> str:
    """The shell command that builds the cache of `name` under `data_dir`."""
    command = f"python3 preprocess_public_data.py --dataset={name}"
    if Path(data_dir) != Path(DEFAULT_DATA_DIR):
        command += f" --data_dir={data_dir}"
    return command


def _how_to_supply(spec: DatasetSpec, data_dir: str | Path) -> str:
    return (f"if this machine cannot download it, fetch {spec.url} elsewhere and pass it with "
            f"--archive=/path/to/{spec.archive_name}, or put it at {Path(data_dir) / spec.archive_name}")


# --------------------------------------------------------------------------------------------------
# Finding or downloading the raw file


class _RetryableDownloadError(Exception):
    pass


def sha256_of(path: Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _fetch(url: str, tmp: Path, expected_size: Optional[int], expected_sha256: Optional[str], timeout_s: float,
           check: Optional[Callable[[Path], None]], log: Log) -> None:
    """One download attempt into `tmp`; raises on any failure."""
    digest = hashlib.sha256()
    done = 0
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
        announced = int(response.headers.get("Content-Length") or 0)
        if announced and expected_size is not None and announced != expected_size:
            raise PreprocessingError(f"{url}: the server announces {announced:,} bytes, the known file has "
                                     f"{expected_size:,}; it changed upstream (nothing was downloaded)")
        total = announced or expected_size
        last_report = time.monotonic()
        while chunk := response.read(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if time.monotonic() - last_report >= 2.0:
                last_report = time.monotonic()
                share = f" ({100 * done / total:.0f}%)" if total else ""
                log(f"  downloaded {_mib(done)} / {_mib(total) if total else '?'}{share}")
    log(f"  downloaded {_mib(done)} / {_mib(total) if total else '?'}")
    if announced and done != announced:
        raise _RetryableDownloadError(f"connection closed after {done:,} of {announced:,} bytes")
    if expected_size is not None and done != expected_size:
        raise _RetryableDownloadError(f"got {done:,} bytes, expected {expected_size:,}")
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        raise PreprocessingError(f"{url}: sha256 {digest.hexdigest()} differs from the known {expected_sha256}; "
                                 "the download is corrupt or the file changed upstream (nothing was kept)")
    if check is not None:
        check(tmp)


def _remove_stale_temporaries(path: Path) -> None:
    """Deletes temporary files that an earlier, killed run left for `path` (atomic_write's naming)."""
    for stale in path.parent.glob(f"*{path.name}.*.tmp"):
        if stale.name.startswith("."):  # also nested ones: "..sequences.npz.abc.npz.tmp.def.tmp"
            stale.unlink(missing_ok=True)


def download(url: str, dest: str | Path, *, expected_size: Optional[int] = None,
             expected_sha256: Optional[str] = None, attempts: int = 3, backoff_s: float = 2.0,
             timeout_s: float = 60.0, check: Optional[Callable[[Path], None]] = None,
             how_to_supply: str = "", log: Log = _print) -> Path:
    """Downloads `url` to `dest` with retries; the file appears under its name only when complete and verified."""
    dest = Path(dest)
    _remove_stale_temporaries(dest)
    delay = backoff_s
    last_error: Optional[BaseException] = None
    for attempt in range(1, attempts + 1):
        log(f"downloading {url} -> {dest} (attempt {attempt} of {attempts})")
        try:
            # atomic_write keeps the bytes in a hidden temporary file, deleted on failure.
            atomic_write(dest, lambda tmp: _fetch(url, tmp, expected_size, expected_sha256, timeout_s, check, log),
                         suffix=".part")
            return dest
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in (408, 429):  # the server's answer will not change
                raise PreprocessingError(
                    f"could not download {url}: HTTP {exc.code} {exc.reason}; {how_to_supply}") from exc
            last_error = exc
        except (urllib.error.URLError, OSError, http.client.HTTPException, _RetryableDownloadError) as exc:
            last_error = exc
        if attempt < attempts:
            log(f"  download failed ({last_error}); retrying in {delay:.0f} s")
            time.sleep(delay)
            delay *= 2
    raise PreprocessingError(f"could not download {url} after {attempts} attempts ({last_error}); "
                             f"{how_to_supply or 'pass the file with --archive=PATH'}")


def _check_zip(path: Path) -> None:
    """Reads every member once (CRC checks): catches truncated or damaged downloads."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise PreprocessingError(f"the downloaded archive is not a valid zip file ({exc})") from exc
    if bad is not None:
        raise PreprocessingError(f"the downloaded archive has a corrupt member {bad}")


def _check_local_file(spec: DatasetSpec, path: Path, log: Log) -> None:
    """Warns (only) when a file supplied by the user is not the official one: other versions are allowed."""
    if path.is_dir() or spec.size is None:
        return
    size = path.stat().st_size
    if size != spec.size:
        log(f"WARNING: {path} has {size:,} bytes, the official {spec.archive_name} has {spec.size:,}; "
            "using it anyway")
    elif spec.sha256 is not None:
        digest = sha256_of(path)
        if digest != spec.sha256:
            log(f"WARNING: {path} has sha256 {digest}, the official file {spec.sha256}; using it anyway")
        else:
            log(f"{path}: size and sha256 match the official file")


def locate_archive(spec: DatasetSpec, data_dir: str | Path, archive: Optional[str | Path] = None, *,
                   allow_download: bool = True, log: Log = _print) -> Path:
    """The raw archive to read: `archive` if given, else `<data_dir>/<archive name>`, downloading it if missing."""
    if archive is not None:
        path = Path(archive).expanduser()
        if not path.exists():
            raise PreprocessingError(f"--archive={archive}: no such file")
        _check_local_file(spec, path, log)
        return path
    path = Path(data_dir) / spec.archive_name
    if path.exists():
        log(f"{spec.name}: using {path} (already on disk)")
        _check_local_file(spec, path, log)
        return path
    if not allow_download:
        raise PreprocessingError(f"{spec.name}: {path} does not exist; {_how_to_supply(spec, data_dir)}")
    return download(spec.url, path, expected_size=spec.size, expected_sha256=spec.sha256,
                    check=_check_zip if spec.is_zip else None, how_to_supply=_how_to_supply(spec, data_dir), log=log)


def _read_member(archive: Path, folder: str, filename: str) -> Tuple[bytes, str]:
    """Bytes of `folder/filename` in a zip archive (or in a folder where it was extracted), and a label for errors."""
    if archive.is_dir():
        for candidate in (archive / folder / filename, archive / filename):
            if candidate.is_file():
                return candidate.read_bytes(), str(candidate)
        raise PreprocessingError(f"{archive}: missing {folder}/{filename} in this folder")
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            member = f"{folder}/{filename}"
            if member not in names:  # also accept an archive re-packed without the folder
                others = [n for n in names if n == filename or n.endswith("/" + filename)]
                if len(others) != 1:
                    raise PreprocessingError(f"{archive}: missing member {member} in the zip archive "
                                             f"(it has {len(names)} members: {', '.join(names[:8])})")
                member = others[0]
            label = f"{archive}:{member}"
            try:
                return zf.read(member), label
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise PreprocessingError(f"{label}: the zip archive is corrupt ({exc}); download it again") from exc
    except (zipfile.BadZipFile, EOFError) as exc:
        raise PreprocessingError(f"{archive}: not a valid zip archive, truncated or corrupt ({exc}); "
                                 "download it again") from exc


# --------------------------------------------------------------------------------------------------
# Validating delimited text: precise errors for the first bad line


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    kind: str  # "id": integer >= 1; "int": integer >= 0; "float": finite number; "str": non-empty; "any"


_INT_RE = re.compile(r"-?\d+\Z")  # strict: no spaces or '+', which the fast paths reject too
_OTHER_SEPARATORS = ("::", ",", "\t", ";", "|")


def _field_problem(field: _Field, text: str) -> Optional[str]:
    if field.kind == "any":
        return None
    if field.kind == "str":
        return None if text.strip() else f"empty {field.name}"
    if field.kind == "float":
        try:
            value = float(text)
        except ValueError:
            return f"non-numeric {field.name} {text!r}"
        if text != text.strip():
            return f"{field.name} {text!r} has spaces"
        return None if math.isfinite(value) else f"{field.name} {text!r} is not a finite number"
    if not _INT_RE.match(text):
        return f"non-numeric {field.name} {text!r} (expected an integer)"
    value = int(text)
    if field.kind == "id" and value <= 0:
        return f"{field.name} {value} is not a positive integer (ids start at 1; 0 is padding)"
    if field.kind == "id" and value > _INT32_MAX:
        return f"{field.name} {value} is too large (ids must fit in 32 bits)"
    if value < 0:
        return f"{field.name} {value} is negative"
    return None


def _line_problem(line: str, sep: str, fields: Sequence[_Field]) -> Optional[str]:
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
        problem = _field_problem(field, part)
        if problem:
            return problem
    return None


def _line_error(source: str, lineno: int, problem: str, line: str) -> PreprocessingError:
    shown = line if len(line) <= 100 else line[:97] + "..."
    return PreprocessingError(f"{source}, line {lineno}: {problem} (line: {shown!r})")


def _scan(lines: Iterable[bytes], source: str, sep: str, fields: Sequence[_Field], first_lineno: int,
          encoding: str) -> Optional[PreprocessingError]:
    """The error for the first bad line, or None when every line is fine."""
    for lineno, raw in enumerate(lines, start=first_lineno):
        try:
            line = raw.decode(encoding).rstrip("\r\n")
        except UnicodeDecodeError as exc:
            return _line_error(source, lineno, f"not valid {encoding} ({exc.reason})", raw.decode("latin-1"))
        problem = _line_problem(line, sep, fields)
        if problem:
            return _line_error(source, lineno, problem, line)
    return None


def _diagnose(source: str, open_lines: Callable[[], ContextManager], sep: str, fields: Sequence[_Field],
              skip_lines: int, encoding: str, reason: str) -> PreprocessingError:
    """Called after a fast check failed: re-reads the file line by line to name the first bad line."""
    with open_lines() as stream:
        error = _scan(itertools.islice(stream, skip_lines, None), source, sep, fields, skip_lines + 1, encoding)
    return error or PreprocessingError(f"{source}: could not parse the file ({reason})")


def _count_lines(data: bytes) -> int:
    """Lines of text in `data`; a final newline ends the last line and does not start another."""
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def _is_blank(data: bytes) -> bool:
    return not data or data.isspace()  # isspace stops at the first other byte; strip() would copy


def _has_bytes_outside(data: bytes, allowed: bytes, start: int = 0, chunk_bytes: int = 1 << 25) -> bool:
    """Whether data[start:] has a byte not in `allowed` (in chunks, to bound temporary memory)."""
    view = memoryview(data)
    return any(bytes(view[pos:pos + chunk_bytes]).translate(None, allowed)
               for pos in range(start, len(data), chunk_bytes))


def _parse_small(data: bytes, source: str, sep: str, fields: Sequence[_Field], encoding: str) -> List[List[str]]:
    """Line-by-line parsing for the small metadata files (a few thousand lines)."""
    if not data.strip():
        raise PreprocessingError(f"{source}: the file is empty")
    rows = []
    for lineno, raw in enumerate(io.BytesIO(data), start=1):
        line = raw.decode(encoding).rstrip("\r\n")
        problem = _line_problem(line, sep, fields)
        if problem:
            raise _line_error(source, lineno, problem, line)
        rows.append(line.split(sep))
    return rows


# --------------------------------------------------------------------------------------------------
# Parsing the ratings files


class Ratings(NamedTuple):
    """One row per rating, in file order."""

    users: np.ndarray  # int64 (MovieLens ids) or int32 (dense codes)
    items: np.ndarray
    ratings: np.ndarray  # float32
    timestamps: np.ndarray  # int64


_DIGITS = b"0123456789"
_ML_1M_RATING_FIELDS = (_Field("UserID", "id"), _Field("MovieID", "id"), _Field("Rating", "int"),
                        _Field("Timestamp", "int"))
_ML_20M_HEADER = "userId,movieId,rating,timestamp"
_ML_20M_RATING_FIELDS = (_Field("userId", "id"), _Field("movieId", "id"), _Field("rating", "float"),
                         _Field("timestamp", "int"))
_AMAZON_FIELDS = (_Field("user", "str"), _Field("item", "str"), _Field("rating", "float"), _Field("timestamp", "int"))
_PARSER_ERRORS = (ValueError, OverflowError)  # pandas' ParserError and UnicodeDecodeError are ValueErrors


def _check_movielens_ratings(users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> Optional[str]:
    if users.size and (users.min() <= 0 or items.min() <= 0):
        return "an id is not positive"
    if items.size and items.max() > _INT32_MAX:
        return "an item id does not fit in 32 bits"
    if not np.isfinite(ratings).all():
        return "a rating is not a finite number"
    return None


def parse_ml_1m_ratings(data: bytes, source: str) -> Ratings:
    """`UserID::MovieID::Rating::Timestamp` lines, all integers."""
    import pandas as pd  # imported here: loading a cache (ensure_preprocessed) does not need it

    if _is_blank(data):
        raise PreprocessingError(f"{source}: the file is empty")

    def diagnose(reason: str) -> PreprocessingError:
        return _diagnose(source, lambda: io.BytesIO(data), "::", _ML_1M_RATING_FIELDS, 0, "latin-1", reason)

    # Only digits, ':' and newlines may occur; then '::' -> ',' lets pandas' fast C parser read it
    # (its python engine, needed for a two-character separator, is ~10x slower).
    if _has_bytes_outside(data, _DIGITS + b":\r\n"):
        raise diagnose("unexpected characters")
    text = data.replace(b"::", b",")
    lines = _count_lines(text)
    if b":" in text or text.count(b",") != 3 * lines:
        raise diagnose("wrong separator or number of fields")
    try:
        frame = pd.read_csv(io.BytesIO(text), header=None, names=["user", "item", "rating", "timestamp"],
                            dtype=np.int64, engine="c", skip_blank_lines=False, na_filter=False)
    except _PARSER_ERRORS as exc:
        raise diagnose(str(exc)) from exc
    users, items = frame["user"].to_numpy(), frame["item"].to_numpy()
    ratings, timestamps = frame["rating"].to_numpy().astype(np.float32), frame["timestamp"].to_numpy()
    problem = "row count" if len(frame) != lines else _check_movielens_ratings(users, items, ratings)
    if problem:
        raise diagnose(problem)
    return Ratings(users, items, ratings, timestamps)


def parse_ml_20m_ratings(data: bytes, source: str) -> Ratings:
    """CSV with header `userId,movieId,rating,timestamp`; ratings in half stars."""
    import pandas as pd

    if _is_blank(data):
        raise PreprocessingError(f"{source}: the file is empty")
    header_end = data.find(b"\n")
    header = data[: header_end if header_end >= 0 else len(data)].decode("latin-1").rstrip("\r")
    if header != _ML_20M_HEADER:
        raise _line_error(source, 1, f"expected the header {_ML_20M_HEADER!r}", header)
    lines = _count_lines(data) - 1
    if lines == 0:
        raise PreprocessingError(f"{source}: the file has a header but no ratings")

    def diagnose(reason: str) -> PreprocessingError:
        return _diagnose(source, lambda: io.BytesIO(data), ",", _ML_20M_RATING_FIELDS, 1, "latin-1", reason)

    if _has_bytes_outside(data, _DIGITS + b",.\r\n", start=header_end + 1):
        raise diagnose("unexpected characters")
    if data.count(b",") - 3 != 3 * lines:
        raise diagnose("wrong separator or number of fields")
    try:
        frame = pd.read_csv(io.BytesIO(data), skiprows=1, header=None, names=["user", "item", "rating", "timestamp"],
                            dtype={"user": np.int64, "item": np.int64, "rating": np.float64, "timestamp": np.int64},
                            engine="c", skip_blank_lines=False, na_filter=False)
    except _PARSER_ERRORS as exc:
        raise diagnose(str(exc)) from exc
    users, items = frame["user"].to_numpy(), frame["item"].to_numpy()
    ratings, timestamps = frame["rating"].to_numpy(), frame["timestamp"].to_numpy()
    problem = "row count" if len(frame) != lines else _check_movielens_ratings(users, items, ratings)
    if problem:
        raise diagnose(problem)
    return Ratings(users, items, ratings.astype(np.float32), timestamps)


def _count_separators_and_lines(path: Path, chunk_bytes: int = 1 << 26) -> Tuple[int, int]:
    commas = newlines = 0
    last = b""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            commas += chunk.count(b",")
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    return commas, newlines + (0 if last in (b"\n", b"") else 1)


class _SortedIdCoder:
    """Codes for string ids, numbered in sorted order of the strings, collected chunk by chunk.

    Each chunk is factorised by hashing (fast, in C); the chunks' distinct ids are then sorted once
    as fixed-width UTF-8 bytes, which numpy compares in C (UTF-8 byte order is code point order,
    the order of Python's sorted()). Sorting them as Python strings, or reading them as a pandas
    categorical, was ~7x slower on the 22.5M-row file.
    """

    def __init__(self) -> None:
        self._codes: List[np.ndarray] = []
        self._uniques: List[np.ndarray] = []

    def add(self, ids: np.ndarray) -> bool:
        """Adds a chunk of ids (object array of str); False if one is missing (empty field)."""
        import pandas as pd

        codes, uniques = pd.factorize(ids)
        if (codes < 0).any():
            return False
        self._codes.append(codes.astype(np.int32))
        self._uniques.append(np.array([u.encode("utf-8") for u in uniques], dtype=bytes))
        return True

    def finish(self) -> Tuple[np.ndarray, int]:
        """All codes, in row order, and the number of distinct ids."""
        if not self._codes:
            return np.zeros(0, dtype=np.int32), 0
        sorted_ids, inverse = np.unique(np.concatenate(self._uniques), return_inverse=True)
        starts = np.cumsum([0] + [len(u) for u in self._uniques])
        codes = np.concatenate([inverse.reshape(-1)[start + chunk] for start, chunk in zip(starts, self._codes)])
        self._codes, self._uniques = [], []
        return codes.astype(np.int32), len(sorted_ids)


def parse_amazon_ratings(path: Path, chunk_rows: int = 2_000_000) -> Tuple[Ratings, int, int]:
    """Headerless `user,item,rating,timestamp` with string ids.

    Returns the rows with user and item codes in sorted order of the id strings, and the numbers of
    distinct users and items. Read in chunks: the 45M id strings of the full file would take ~3 GB
    as Python objects at once.
    """
    import pandas as pd

    source = str(path)
    if path.stat().st_size == 0:
        raise PreprocessingError(f"{source}: the file is empty")

    def diagnose(reason: str) -> PreprocessingError:
        return _diagnose(source, lambda: open(path, "rb"), ",", _AMAZON_FIELDS, 0, "utf-8", reason)

    commas, lines = _count_separators_and_lines(path)
    if commas != 3 * lines:  # pandas would silently drop extra fields of a line
        raise diagnose("wrong separator or number of fields")
    users, items = _SortedIdCoder(), _SortedIdCoder()
    ratings, timestamps = [], []
    try:
        with pd.read_csv(path, header=None, names=["user", "item", "rating", "timestamp"], index_col=False,
                         dtype={"user": object, "item": object, "rating": np.float32, "timestamp": np.int64},
                         engine="c", quoting=csv.QUOTE_NONE, skip_blank_lines=False, keep_default_na=False,
                         na_values={"user": [""], "item": [""]}, encoding="utf-8", chunksize=chunk_rows) as reader:
            for chunk in reader:
                ok = users.add(chunk["user"].to_numpy(dtype=object))
                ok = ok and items.add(chunk["item"].to_numpy(dtype=object))
                ratings.append(chunk["rating"].to_numpy())
                timestamps.append(chunk["timestamp"].to_numpy())
                if not ok or not np.isfinite(ratings[-1]).all():
                    raise diagnose("empty id or non-finite rating")
    except _PARSER_ERRORS as exc:
        raise diagnose(str(exc)) from exc
    user_codes, num_users = users.finish()
    item_codes, num_items = items.finish()
    if len(user_codes) != lines:
        raise diagnose("row count")
    rows = Ratings(user_codes, item_codes, np.concatenate(ratings), np.concatenate(timestamps))
    return rows, num_users, num_items


def parse_movies_dat(data: bytes, source: str) -> np.ndarray:
    """ml-1m `MovieID::Title::Genres` (latin-1) -> sorted movie ids."""
    fields = (_Field("MovieID", "id"), _Field("Title", "str"), _Field("Genres", "any"))
    rows = _parse_small(data, source, "::", fields, "latin-1")
    return np.unique(np.array([int(row[0]) for row in rows], dtype=np.int64))


def _decode(data: bytes, source: str, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise PreprocessingError(f"{source}, line {lineno}: not valid {encoding} ({exc.reason})") from exc


def parse_movies_csv(data: bytes, source: str) -> np.ndarray:
    """ml-20m `movieId,title,genres` (titles may hold quoted commas: a real CSV reader) -> sorted movie ids."""
    text = _decode(data, source, "utf-8")
    if not text.strip():
        raise PreprocessingError(f"{source}: the file is empty")
    expected = ["movieId", "title", "genres"]
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    ids = []
    try:
        header = next(reader)
        if [h.strip() for h in header] != expected:
            raise _line_error(source, 1, f"expected the header {','.join(expected)!r}", ",".join(header))
        for row in reader:
            if len(row) != len(expected):
                problem = "empty line" if not row else (
                    f"wrong number of fields: expected 3 (movieId, title, genres) separated by ',', found {len(row)}")
                raise _line_error(source, reader.line_num, problem, ",".join(row))
            problem = _field_problem(_Field("movieId", "id"), row[0])
            if problem:
                raise _line_error(source, reader.line_num, problem, ",".join(row))
            ids.append(int(row[0]))
    except csv.Error as exc:
        raise PreprocessingError(f"{source}, line {reader.line_num}: {exc}") from exc
    if not ids:
        raise PreprocessingError(f"{source}: the file has a header but no movies")
    return np.unique(np.array(ids, dtype=np.int64))


def _category_codes(values: Sequence) -> np.ndarray:
    """Codes 0..k-1 in sorted order of the values (as pandas' categorical codes)."""
    return np.unique(np.asarray(values), return_inverse=True)[1].reshape(-1).astype(np.int32)


def parse_ml_1m_users(data: bytes, source: str) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """ml-1m `UserID::Gender::Age::Occupation::Zip-code` -> user ids and categorical codes per feature.

    Age group and occupation are coded in numeric order, sex and zip code in string order
    (how a categorical over the parsed columns orders them).
    """
    fields = (_Field("UserID", "id"), _Field("Gender", "str"), _Field("Age", "int"), _Field("Occupation", "int"),
              _Field("Zip-code", "str"))
    rows = _parse_small(data, source, "::", fields, "latin-1")
    ids = np.array([int(row[0]) for row in rows], dtype=np.int64)
    if np.unique(ids).size != ids.size:
        raise PreprocessingError(f"{source}: a UserID occurs on more than one line")
    features = {
        "sex": _category_codes([row[1] for row in rows]),
        "age_group": _category_codes([int(row[2]) for row in rows]),
        "occupation": _category_codes([int(row[3]) for row in rows]),
        "zip_code": _category_codes([row[4] for row in rows]),
    }
    return ids, features


# --------------------------------------------------------------------------------------------------
# Building the sequences


def _user_time_order(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Stable argsort by (user, timestamp)."""
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64)
    user_min, time_min = int(users.min()), int(timestamps.min())
    time_span = int(timestamps.max()) - time_min + 1
    if (int(users.max()) - user_min + 1) * time_span < 2**63:
        # One sort of a combined key: the files are mostly grouped by user already, which timsort exploits.
        key = (users.astype(np.int64) - user_min) * time_span + (timestamps.astype(np.int64) - time_min)
        return np.argsort(key, kind="stable")
    order = np.argsort(timestamps, kind="stable")
    return order[np.argsort(users[order], kind="stable")]


def group_by_user(rows: Ratings) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row order that groups rows by ascending user and sorts each user's rows by time; user ids; offsets.

    The sort is stable, so rows with equal timestamps keep their file order. (The release sorted
    with pandas' default, non-stable sort, so the order of tied rows was arbitrary there.)
    """
    order = _user_time_order(rows.users, rows.timestamps)
    sorted_users = rows.users[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_users[1:] != sorted_users[:-1]]))
    offsets = np.concatenate([starts, [len(order)]]).astype(np.int64)
    return order, sorted_users[starts].astype(np.int64), offsets


def _sequences(name: str, rows: Ratings, candidates: np.ndarray, item_shift: int = 0) -> SequenceData:
    order, user_ids, offsets = group_by_user(rows)
    return SequenceData(
        name=name,
        item_ids=(rows.items[order] + item_shift).astype(np.int32),
        ratings=rows.ratings[order].astype(np.float32),
        timestamps=rows.timestamps[order].astype(np.int64),
        offsets=offsets,
        user_ids=user_ids,
        candidate_ids=np.asarray(candidates, dtype=np.int32),
    )


def _movielens_candidates(name: str, movie_ids: np.ndarray, rated: np.ndarray, movies_source: str,
                          log: Log) -> np.ndarray:
    """Every movie of the movies file (rated or not): negatives are sampled from all of them."""
    missing = np.setdiff1d(rated, movie_ids)
    if missing.size:
        log(f"WARNING: {name}: {missing.size:,} rated movie ids are missing from {movies_source} "
            f"(e.g. {missing[:5].tolist()}); adding them to the candidates")
    return np.union1d(movie_ids, rated)


def _log_parsed(name: str, rows: Ratings, source: str, seconds: float, log: Log) -> None:
    log(f"{name}: parsed {len(rows.users):,} ratings from {source} in {seconds:.1f} s")


def build_ml_1m(archive: Path, log: Log = _print) -> Tuple[SequenceData, Dict[str, int]]:
    start = time.time()
    data, source = _read_member(archive, "ml-1m", "ratings.dat")
    rows = parse_ml_1m_ratings(data, source)
    del data
    _log_parsed("ml-1m", rows, source, time.time() - start, log)
    movies, movies_source = _read_member(archive, "ml-1m", "movies.dat")
    candidates = _movielens_candidates("ml-1m", parse_movies_dat(movies, movies_source), np.unique(rows.items),
                                       movies_source, log)
    users, users_source = _read_member(archive, "ml-1m", "users.dat")
    user_table, features = parse_ml_1m_users(users, users_source)
    result = _sequences("ml-1m", rows, candidates)
    # Features of each sequence's user; -1 where users.dat lacks the user.
    order = np.argsort(user_table)
    position = np.minimum(np.searchsorted(user_table[order], result.user_ids), len(order) - 1)
    found = user_table[order][position] == result.user_ids
    if not found.all():
        log(f"WARNING: ml-1m: {int((~found).sum()):,} users of the ratings are missing from {users_source}; "
            "their features are -1")
    result.user_features = {key: np.where(found, values[order][position], -1).astype(np.int32)
                            for key, values in features.items()}
    return result, result.summary()


def build_ml_20m(archive: Path, log: Log = _print) -> Tuple[SequenceData, Dict[str, int]]:
    start = time.time()
    data, source = _read_member(archive, "ml-20m", "ratings.csv")
    log(f"ml-20m: read {_mib(len(data))} from {source} in {time.time() - start:.1f} s")
    rows = parse_ml_20m_ratings(data, source)
    del data
    _log_parsed("ml-20m", rows, source, time.time() - start, log)
    movies, movies_source = _read_member(archive, "ml-20m", "movies.csv")
    candidates = _movielens_candidates("ml-20m", parse_movies_csv(movies, movies_source), np.unique(rows.items),
                                       movies_source, log)
    result = _sequences("ml-20m", rows, candidates)
    return result, result.summary()


def _dense(present: np.ndarray) -> np.ndarray:
    """Old code -> new code for the codes marked present, keeping their (sorted) order."""
    return (np.cumsum(present) - 1).astype(np.int32)


def build_amzn_books(path: Path, log: Log = _print) -> Tuple[SequenceData, Dict[str, int]]:
    start = time.time()
    if path.is_dir():
        path = path / DATASETS["amzn-books"].archive_name
    if not path.is_file():
        raise PreprocessingError(f"{path}: no such file")
    rows, num_users, num_items = parse_amazon_ratings(path)
    raw_rows = len(rows.users)
    log(f"amzn-books: parsed {raw_rows:,} raw rows ({num_users:,} users, {num_items:,} items) from {path} "
        f"in {time.time() - start:.1f} s")

    # One pass: counts over the raw file, then keep rows whose item and user both have >= 5 rows.
    item_ok = np.bincount(rows.items, minlength=num_items) >= MIN_COUNT
    user_ok = np.bincount(rows.users, minlength=num_users) >= MIN_COUNT
    row_item_ok, row_user_ok = item_ok[rows.items], user_ok[rows.users]
    keep = row_item_ok & row_user_ok
    log(f"amzn-books: kept {int(keep.sum()):,} of {raw_rows:,} rows; dropped {int((~row_item_ok).sum()):,} rows "
        f"of items with < {MIN_COUNT} rows and {int((~row_user_ok).sum()):,} rows of users with < {MIN_COUNT} rows "
        f"({int((~row_item_ok & ~row_user_ok).sum()):,} rows counted in both)")
    rows = Ratings(*(column[keep] for column in rows))
    del keep, row_item_ok, row_user_ok

    # Dense codes 0..n-1 over the ids left, in sorted order of the id strings (the raw codes are sorted).
    item_codes = _dense(np.bincount(rows.items, minlength=num_items) > 0)
    user_codes = _dense(np.bincount(rows.users, minlength=num_users) > 0)
    rows = rows._replace(items=item_codes[rows.items], users=user_codes[rows.users])
    num_kept_items = int(item_codes[-1]) + 1 if len(rows.items) else 0
    if num_kept_items == 0:
        raise PreprocessingError(f"{path}: no rows left after keeping items and users with >= {MIN_COUNT} rows")

    # Items are stored + 1: 0 is padding. Candidates: every item code, even one whose users are dropped below.
    full = _sequences("amzn-books", rows, np.arange(1, num_kept_items + 1), item_shift=1)
    lengths = full.lengths
    long_enough = lengths >= MIN_COUNT
    row_mask = np.repeat(long_enough, lengths)
    log(f"amzn-books: dropped {int((~long_enough).sum()):,} users left with < {MIN_COUNT} items "
        f"({int((~row_mask).sum()):,} rows); {int(long_enough.sum()):,} users remain")
    result = dataclasses.replace(
        full,
        item_ids=full.item_ids[row_mask],
        ratings=full.ratings[row_mask],
        timestamps=full.timestamps[row_mask],
        offsets=np.concatenate([[0], np.cumsum(lengths[long_enough])]).astype(np.int64),
        user_ids=full.user_ids[long_enough],
    )
    return result, {"raw_rows": raw_rows, **result.summary()}


_BUILDERS: Dict[str, Callable[[Path, Log], Tuple[SequenceData, Dict[str, int]]]] = {
    "ml-1m": build_ml_1m,
    "ml-20m": build_ml_20m,
    "amzn-books": build_amzn_books,
}


# --------------------------------------------------------------------------------------------------
# Outputs


def check_counts(spec: DatasetSpec, counts: Mapping[str, int]) -> List[str]:
    """One message per count that differs from the official data set's."""
    return [f"{_COUNT_LABELS.get(key, key)}: {counts[key]:,} here, {value:,} in the official data set"
            for key, value in spec.expected.items() if key in counts and counts[key] != value]


_CSV_FEATURES = ("sex", "age_group", "occupation", "zip_code")


def _csv_list(values: Sequence) -> str:
    """Comma-joined values, quoted when they contain a comma (csv.QUOTE_MINIMAL, as pandas' to_csv writes)."""
    text = ",".join(map(str, values))
    return f'"{text}"' if "," in text else text


def write_sasrec_csv(data: SequenceData, spec: DatasetSpec, path: Path, users_per_block: int = 20000) -> None:
    """The release's `sasrec_format.csv` layout: one row per user, lists comma-joined inside quotes.

    Rows follow ascending user id (the release shuffled them; the trainer reads only sequences.npz).
    Fields hold only digits, commas, dots and signs, so rows are formatted directly (csv.writer's
    per-character scan of the long lists cost more than the formatting).
    """
    features = [key for key in _CSV_FEATURES if key in data.user_features]
    offsets, user_ids = data.offsets.tolist(), data.user_ids.tolist()
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(["index", "user_id", "sequence_item_ids", "sequence_ratings", "sequence_timestamps",
                          *features]) + "\n")
        # Converted block by block: Python lists of all 20M values of ml-20m would take GBs.
        for first in range(0, data.num_users, users_per_block):
            last = min(first + users_per_block, data.num_users)
            lo, hi = offsets[first], offsets[last]
            items = (data.item_ids[lo:hi].astype(np.int64) + spec.csv_item_offset).tolist()
            ratings = data.ratings[lo:hi]
            ratings = (ratings.astype(np.int64) if spec.integer_ratings
                       else np.round(ratings.astype(np.float64), 6)).tolist()
            timestamps = data.timestamps[lo:hi].tolist()
            feature_values = [data.user_features[key][first:last].tolist() for key in features]
            lines = []
            for user in range(first, last):
                a, b = offsets[user] - lo, offsets[user + 1] - lo
                fields = [str(user), str(user_ids[user]), _csv_list(items[a:b]), _csv_list(ratings[a:b]),
                          _csv_list(timestamps[a:b]), *(str(values[user - first]) for values in feature_values)]
                lines.append(",".join(fields) + "\n")
            f.write("".join(lines))


def write_outputs(data: SequenceData, spec: DatasetSpec, out_dir: Path) -> Path:
    """Writes sasrec_format.csv, then sequences.npz; the cache appears last, when everything is in place.

    Each file is written to a hidden temporary file and renamed when complete, so a killed process
    leaves no complete-looking file; on an exception, what this call wrote is removed.
    """
    npz_path, csv_path = out_dir / CACHE_FILE, out_dir / CSV_FILE
    for path in (npz_path, csv_path):  # never leave an old cache beside a new CSV (or the reverse)
        path.unlink(missing_ok=True)
        _remove_stale_temporaries(path)

    def write_cache(tmp_npz: Path) -> None:
        save_sequences(data, tmp_npz)
        atomic_write(csv_path, lambda tmp_csv: write_sasrec_csv(data, spec, tmp_csv))

    try:
        atomic_write(npz_path, write_cache, suffix=".npz")
    except BaseException:
        for path in (npz_path, csv_path):
            path.unlink(missing_ok=True)
        raise
    return npz_path


def _format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{_COUNT_LABELS.get(key, key)} {value:,}" for key, value in counts.items())


def preprocess(name: str, data_dir: str | Path = DEFAULT_DATA_DIR, archive: Optional[str | Path] = None, *,
               allow_download: bool = True, log: Log = _print) -> Path:
    """Builds `<data_dir>/<name>/sequences.npz` and `sasrec_format.csv`; returns the cache path."""
    spec = get_spec(name)
    start = time.time()
    source = locate_archive(spec, data_dir, archive, allow_download=allow_download, log=log)
    data, counts = _BUILDERS[name](source, log)
    log(f"{name}: {_format_counts(counts)}")
    differences = check_counts(spec, counts)
    for difference in differences:
        log(f"WARNING: {name}: count differs from the official data set: {difference}")
    if not differences:
        log(f"{name}: all counts match the official data set")
    out_dir = Path(data_dir) / name
    path = write_outputs(data, spec, out_dir)
    log(f"{name}: wrote {path} and {out_dir / CSV_FILE} ({time.time() - start:.1f} s in all)")
    return path


def _cache_problem(path: Path, name: str) -> Optional[str]:
    """Cheap validity check (metadata only); `load_sequences` checks the arrays themselves."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "meta_json" not in npz.files:
                return "no metadata"
            meta = json.loads(npz["meta_json"].tobytes().decode())
    except Exception as exc:  # any unreadable file: zip, npy or json errors
        return f"unreadable: {exc}"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"cache format {meta.get('format_version')}, expected {FORMAT_VERSION}"
    if meta.get("name") != name:
        return f"it holds data set {meta.get('name')!r}"
    return None


def ensure_preprocessed(name: str, data_dir: str | Path) -> Path:
    """The cache path of `name` if a valid cache exists; otherwise an error saying which command builds it."""
    spec = get_spec(name)
    path = cache_path(name, data_dir)
    how = f"run `{preprocess_command(name, data_dir)}` ({_how_to_supply(spec, data_dir)})"
    if not path.is_file():
        raise PreprocessingError(f"{name} has not been preprocessed: {path} does not exist; {how}")
    problem = _cache_problem(path, name)
    if problem:
        raise PreprocessingError(f"{path} is not a valid {name} cache ({problem}); {how}")
    return path
