"""Amazon Books ratings: one-pass 5-core filter, dense ids in sorted order of the id strings.

Count each item's and each user's rows over the raw file once; keep rows whose item and user
both have >= 5 rows; number items and users 0..n-1 in sorted order of their strings; group by
user in time order; drop users left with fewer than 5 items. The cache stores item code + 1
(0 is padding) and keeps each item's original id string in `item_keys`.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from generative_recommenders.data.download import Checksum, RemoteFile
from generative_recommenders.data.parsing import (
    PARSER_ERRORS,
    Field,
    Log,
    PreprocessingError,
    Ratings,
    check_input_file,
    comma_file_checker,
    warn_duplicate_rows,
    print_log,
    to_sequences,
)
from generative_recommenders.data.sequence_store import SequenceData

# Size and sha256 of the file at this URL as recorded in ../shared/data/README.md.
AMAZON_BOOKS = RemoteFile(
    url="https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/ratings_Books.csv",
    size=916259383,
    checksum=Checksum("sha256", "411873640232eaa462881c67e9b5e07ce4f1a4c135cf5c7a98ccd3a33901dc11"),
)
MIN_COUNT = 5  # items and users need >= 5 rows; users need >= 5 items after filtering
_FIELDS = (Field("user", "str"), Field("item", "str"), Field("rating", "float"), Field("timestamp", "int"))


class SortedIdCoder:
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

    def finish(self) -> Tuple[np.ndarray, np.ndarray]:
        """All codes, in row order, and the distinct ids in sorted order (UTF-8 bytes)."""
        if not self._codes:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bytes)
        sorted_ids, inverse = np.unique(np.concatenate(self._uniques), return_inverse=True)
        starts = np.cumsum([0] + [len(u) for u in self._uniques])
        codes = np.concatenate([inverse.reshape(-1)[start + chunk] for start, chunk in zip(starts, self._codes)])
        self._codes, self._uniques = [], []
        return codes.astype(np.int32), sorted_ids


def parse_amazon_ratings(path: Path, chunk_rows: int = 2_000_000) -> Tuple[Ratings, np.ndarray, np.ndarray]:
    """Headerless `user,item,rating,timestamp` with string ids.

    Returns the rows with user and item codes in sorted order of the id strings, and the distinct
    user and item ids in that order (UTF-8 bytes). Read in chunks: the 45M id strings of the full
    file would take ~3 GB as Python objects at once.
    """
    import pandas as pd

    fail, lines = comma_file_checker(path, _FIELDS)
    users, items = SortedIdCoder(), SortedIdCoder()
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
                    raise fail("empty id or non-finite rating")
    except PARSER_ERRORS as exc:
        raise fail(str(exc)) from exc
    user_codes, user_ids = users.finish()
    item_codes, item_ids = items.finish()
    if len(user_codes) != lines:
        raise fail("row count")
    return Ratings(user_codes, item_codes, np.concatenate(ratings), np.concatenate(timestamps)), user_ids, item_ids


def _dense(present: np.ndarray) -> np.ndarray:
    """Old code -> new code for the codes marked present, keeping their (sorted) order."""
    return (np.cumsum(present) - 1).astype(np.int32)


def build_amzn_books(path: Path, log: Log = print_log) -> Tuple[SequenceData, Dict[str, int]]:
    start = time.time()
    if path.is_dir():
        path = path / AMAZON_BOOKS.archive_name
    check_input_file(path)
    rows, user_ids, item_ids = parse_amazon_ratings(path)
    raw_rows, num_users, num_items = len(rows.users), len(user_ids), len(item_ids)
    log(f"amzn-books: parsed {raw_rows:,} raw rows ({num_users:,} users, {num_items:,} items) from {path} "
        f"in {time.time() - start:.1f} s")
    warn_duplicate_rows("amzn-books", rows, str(path), log)

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
    item_present = np.bincount(rows.items, minlength=num_items) > 0
    item_codes = _dense(item_present)
    user_codes = _dense(np.bincount(rows.users, minlength=num_users) > 0)
    rows = rows._replace(items=item_codes[rows.items], users=user_codes[rows.users])
    num_kept_items = int(item_codes[-1]) + 1 if len(rows.items) else 0
    if num_kept_items == 0:
        raise PreprocessingError(f"{path}: no rows left after keeping items and users with >= {MIN_COUNT} rows")

    # Items are stored + 1: 0 is padding. Candidates: every item code, even one whose users are dropped below.
    full = to_sequences("amzn-books", rows, np.arange(1, num_kept_items + 1), item_shift=1)
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
        item_keys=np.concatenate([[""], np.char.decode(item_ids[item_present], "utf-8")]),
    )
    return result, {"raw_rows": raw_rows, **result.summary()}
