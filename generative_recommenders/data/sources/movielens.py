"""MovieLens-1M and -20M: ratings into per-user sequences, movie ids kept as they are.

Candidates are every movie of the movies file (rated or not); each item id also gets its key
(the movie id as a string) and its title, "" for ids that are no movie.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from generative_recommenders.data.download import Checksum, RemoteFile, read_member
from generative_recommenders.data.parsing import (
    DIGITS,
    INT32_MAX,
    PARSER_ERRORS,
    Field,
    Log,
    PreprocessingError,
    Ratings,
    count_lines,
    decode,
    diagnose,
    field_problem,
    has_bytes_outside,
    is_blank,
    line_error,
    mib,
    parse_small,
    print_log,
    read_headed_table,
    to_sequences,
    warn_duplicate_rows,
)
from generative_recommenders.data.sequence_store import SequenceData

# GroupLens publishes an MD5 beside each archive (<archive>.md5, e.g. the line
# "MD5 (ml-1m.zip) = c4d9eecfca2ab87c1945afe126590906"). No network here, so the values were
# found quoted from those files in public repositories (a MovieLens verify script that curls
# files.grouplens.org/datasets/movielens/ml-1m.zip.md5 and ml-20m.zip.md5; a note citing the
# ml-20m.zip.md5 sidecar) and agree with several dataset loaders. No SHA-256 is published. The
# sizes are the Content-Length files.grouplens.org sent in logged wget downloads (ml-1m: 2016,
# 2019, 2024; ml-20m: 2019, and the academictorrents mirror of ml-20m.zip lists the same bytes).
ML_1M = RemoteFile(
    url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    size=5917549,
    checksum=Checksum("md5", "c4d9eecfca2ab87c1945afe126590906"),
)
ML_20M = RemoteFile(
    url="https://files.grouplens.org/datasets/movielens/ml-20m.zip",
    size=198702078,
    checksum=Checksum("md5", "cd245b17a1ae2cc31bb14903e1204af3"),
)

_ML_1M_RATING_FIELDS = (Field("UserID", "id"), Field("MovieID", "id"), Field("Rating", "int"),
                        Field("Timestamp", "int"))
_ML_20M_HEADER = "userId,movieId,rating,timestamp"
_ML_20M_RATING_FIELDS = (Field("userId", "id"), Field("movieId", "id"), Field("rating", "float"),
                         Field("timestamp", "int"))


class Movies(NamedTuple):
    ids: np.ndarray  # int64, sorted, distinct
    titles: List[str]  # aligned with ids


def _check_movielens_ratings(users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> Optional[str]:
    if users.size and (users.min() <= 0 or items.min() <= 0):
        return "an id is not positive"
    if items.size and items.max() > INT32_MAX:
        return "an item id does not fit in 32 bits"
    if not np.isfinite(ratings).all():
        return "a rating is not a finite number"
    return None


def parse_ml_1m_ratings(data: bytes, source: str) -> Ratings:
    """`UserID::MovieID::Rating::Timestamp` lines, all integers."""
    import pandas as pd  # imported here: loading a cache (ensure_preprocessed) does not need it

    if is_blank(data):
        raise PreprocessingError(f"{source}: the file is empty")

    def fail(reason: str) -> PreprocessingError:
        return diagnose(source, lambda: io.BytesIO(data), "::", _ML_1M_RATING_FIELDS, 0, "latin-1", reason)

    # Only digits, ':' and newlines may occur; then '::' -> ',' lets pandas' fast C parser read it
    # (its python engine, needed for a two-character separator, is ~10x slower).
    if has_bytes_outside(data, DIGITS + b":\r\n"):
        raise fail("unexpected characters")
    text = data.replace(b"::", b",")
    lines = count_lines(text)
    if b":" in text or text.count(b",") != 3 * lines:
        raise fail("wrong separator or number of fields")
    try:
        frame = pd.read_csv(io.BytesIO(text), header=None, names=["user", "item", "rating", "timestamp"],
                            dtype=np.int64, engine="c", skip_blank_lines=False, na_filter=False)
    except PARSER_ERRORS as exc:
        raise fail(str(exc)) from exc
    users, items = frame["user"].to_numpy(), frame["item"].to_numpy()
    ratings, timestamps = frame["rating"].to_numpy().astype(np.float32), frame["timestamp"].to_numpy()
    problem = "row count" if len(frame) != lines else _check_movielens_ratings(users, items, ratings)
    if problem:
        raise fail(problem)
    return Ratings(users, items, ratings, timestamps)


def parse_ml_20m_ratings(data: bytes, source: str) -> Ratings:
    """CSV with header `userId,movieId,rating,timestamp`; ratings in half stars."""
    names = [field.name for field in _ML_20M_RATING_FIELDS]
    frame = read_headed_table(
        data, source, ",", _ML_20M_HEADER, _ML_20M_RATING_FIELDS,
        dtypes=dict(zip(names, (np.int64, np.int64, np.float64, np.int64))), allowed=DIGITS + b",.\r\n",
        what="ratings", check=lambda f: _check_movielens_ratings(*(f[n].to_numpy() for n in names[:3])))
    users, items, ratings, timestamps = (frame[n].to_numpy() for n in names)
    return Ratings(users, items, ratings.astype(np.float32), timestamps)


def _movies(ids: Sequence[int], titles: Sequence[str]) -> Movies:
    """Sorted distinct ids; an id listed twice keeps its first title."""
    unique, first = np.unique(np.array(ids, dtype=np.int64), return_index=True)
    return Movies(unique, [titles[i] for i in first])


def parse_movies_dat(data: bytes, source: str) -> Movies:
    """ml-1m `MovieID::Title::Genres` (latin-1)."""
    fields = (Field("MovieID", "id"), Field("Title", "str"), Field("Genres", "any"))
    rows = parse_small(data, source, "::", fields, "latin-1")
    return _movies([int(row[0]) for row in rows], [row[1] for row in rows])


def parse_movies_csv(data: bytes, source: str) -> Movies:
    """ml-20m `movieId,title,genres` (titles may hold quoted commas: a real CSV reader)."""
    text = decode(data, source, "utf-8")
    if not text.strip():
        raise PreprocessingError(f"{source}: the file is empty")
    expected = ["movieId", "title", "genres"]
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    ids, titles = [], []
    try:
        header = next(reader)
        if [h.strip() for h in header] != expected:
            raise line_error(source, 1, f"expected the header {','.join(expected)!r}", ",".join(header))
        for row in reader:
            if len(row) != len(expected):
                problem = "empty line" if not row else (
                    f"wrong number of fields: expected 3 (movieId, title, genres) separated by ',', found {len(row)}")
                raise line_error(source, reader.line_num, problem, ",".join(row))
            problem = field_problem(Field("movieId", "id"), row[0])
            if problem:
                raise line_error(source, reader.line_num, problem, ",".join(row))
            ids.append(int(row[0]))
            titles.append(row[1])
    except csv.Error as exc:
        raise PreprocessingError(f"{source}, line {reader.line_num}: {exc}") from exc
    if not ids:
        raise PreprocessingError(f"{source}: the file has a header but no movies")
    return _movies(ids, titles)


def _category_codes(values: Sequence) -> np.ndarray:
    """Codes 0..k-1 in sorted order of the values (as pandas' categorical codes)."""
    return np.unique(np.asarray(values), return_inverse=True)[1].reshape(-1).astype(np.int32)


def parse_ml_1m_users(data: bytes, source: str) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """ml-1m `UserID::Gender::Age::Occupation::Zip-code` -> user ids and categorical codes per feature.

    Age group and occupation are coded in numeric order, sex and zip code in string order
    (how a categorical over the parsed columns orders them).
    """
    fields = (Field("UserID", "id"), Field("Gender", "str"), Field("Age", "int"), Field("Occupation", "int"),
              Field("Zip-code", "str"))
    rows = parse_small(data, source, "::", fields, "latin-1")
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


def _candidates(name: str, movie_ids: np.ndarray, rated: np.ndarray, movies_source: str, log: Log) -> np.ndarray:
    """Every movie of the movies file (rated or not): negatives are sampled from all of them."""
    missing = np.setdiff1d(rated, movie_ids)
    if missing.size:
        log(f"WARNING: {name}: {missing.size:,} rated movie ids are missing from {movies_source} "
            f"(e.g. {missing[:5].tolist()}); adding them to the candidates")
    return np.union1d(movie_ids, rated)


def _with_item_names(data: SequenceData, movies: Movies) -> SequenceData:
    """Sets item_keys (the movie id as a string) and item_titles per item id; "" where there is none."""
    keys = [""] * (data.max_item_id + 1)
    titles = [""] * (data.max_item_id + 1)
    for item in data.candidate_ids.tolist():
        keys[item] = str(item)
    for item, title in zip(movies.ids.tolist(), movies.titles):
        titles[item] = title
    data.item_keys, data.item_titles = np.array(keys), np.array(titles)
    return data


def _log_parsed(name: str, rows: Ratings, source: str, seconds: float, log: Log) -> None:
    log(f"{name}: parsed {len(rows.users):,} ratings from {source} in {seconds:.1f} s")
    warn_duplicate_rows(name, rows, source, log)


def _movielens_sequences(name: str, archive: Path, rows: Ratings, movies_file: str,
                         parse_movies: Callable[[bytes, str], Movies], log: Log) -> SequenceData:
    data, movies_source = read_member(archive, name, movies_file)
    movies = parse_movies(data, movies_source)
    candidates = _candidates(name, movies.ids, np.unique(rows.items), movies_source, log)
    return _with_item_names(to_sequences(name, rows, candidates), movies)


def build_ml_1m(archive: Path, log: Log = print_log) -> Tuple[SequenceData, Dict[str, int]]:
    start = time.time()
    data, source = read_member(archive, "ml-1m", "ratings.dat")
    rows = parse_ml_1m_ratings(data, source)
    del data
    _log_parsed("ml-1m", rows, source, time.time() - start, log)
    result = _movielens_sequences("ml-1m", archive, rows, "movies.dat", parse_movies_dat, log)
    users, users_source = read_member(archive, "ml-1m", "users.dat")
    user_table, features = parse_ml_1m_users(users, users_source)
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


def build_ml_20m(archive: Path, log: Log = print_log) -> Tuple[SequenceData, Dict[str, int]]:
    start = time.time()
    data, source = read_member(archive, "ml-20m", "ratings.csv")
    log(f"ml-20m: read {mib(len(data))} from {source} in {time.time() - start:.1f} s")
    rows = parse_ml_20m_ratings(data, source)
    del data
    _log_parsed("ml-20m", rows, source, time.time() - start, log)
    result = _movielens_sequences("ml-20m", archive, rows, "movies.csv", parse_movies_csv, log)
    return result, result.summary()
