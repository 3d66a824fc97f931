"""The data sets this project preprocesses, and the entry points that build their caches.

ml-1m and ml-20m (MovieLens, `sources/movielens.py`) keep their movie ids; amzn-books (Amazon
Books ratings, `sources/amazon.py`) is filtered in one pass and mapped to dense ids; session data
sets (`sources/sessions.py`) are built from GRU4Rec-style prepared split files or from the raw
YOOCHOOSE clicks, and a user's own interaction log (`sources/interactions.py`) from a CSV, TSV or
Parquet file, under a name the user chooses. Every data set becomes
`<data_dir>/<name>/sequences.npz` (the flat cache of `sequence_store`, the only file the trainer
reads), written last and atomically, beside files for people and other tools: the release's
`sasrec_format.csv` for the public sets, GRU4Rec's prepared split files for raw clicks.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from generative_recommenders.data.download import RemoteFile, how_to_supply, locate_archive
from generative_recommenders.data.parsing import Log, PreprocessingError, print_log
from generative_recommenders.data.sequence_store import (
    CACHE_FILE,
    FORMAT_VERSION,
    SequenceData,
    save_sequences,
)
from generative_recommenders.data.sources import amazon, interactions, movielens, sessions
from generative_recommenders.data.synthetic import SYNTHETIC
from generative_recommenders.files import atomic_write, check_writable_dir, remove_stale_temporaries

__all__ = ["DATASETS", "DEFAULT_DATA_DIR", "PreprocessingError", "cache_path", "check_counts", "ensure_preprocessed",
           "preprocess", "preprocess_command", "preprocess_interactions", "preprocess_sessions", "preprocess_yoochoose",
           "write_outputs"]

DEFAULT_DATA_DIR = "tmp/"
CSV_FILE = "sasrec_format.csv"
NAMED_KINDS = ("sessions", "yoochoose", "interactions")  # --dataset values that build a data set under --name
DEFAULT_YOOCHOOSE_NAME = "rsc15"

Builder = Callable[[Path, Log], Tuple[SequenceData, Dict[str, int]]]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    remote: RemoteFile
    build: Builder
    expected: Mapping[str, int]  # counts of the official files, compared by `check_counts`
    integer_ratings: bool = False  # written as integers in sasrec_format.csv
    csv_item_offset: int = 0  # added to the cached item ids in sasrec_format.csv


DATASETS: Dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="ml-1m",
            remote=movielens.ML_1M,
            build=movielens.build_ml_1m,
            expected={"users": 6040, "items": 3706, "max_item_id": 3952, "interactions": 1000209, "candidates": 3883},
            integer_ratings=True,
        ),
        DatasetSpec(
            name="ml-20m",
            remote=movielens.ML_20M,
            build=movielens.build_ml_20m,
            expected={"users": 138493, "items": 26744, "max_item_id": 131262, "interactions": 20000263,
                      "candidates": 27278},
        ),
        DatasetSpec(
            name="amzn-books",
            remote=amazon.AMAZON_BOOKS,
            build=amazon.build_amzn_books,
            expected={"raw_rows": 22507155, "candidates": 695762, "max_item_id": 695762},
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


def _data_dir_flag(data_dir: str | Path) -> str:
    return "" if Path(data_dir) == Path(DEFAULT_DATA_DIR) else f" --data_dir={data_dir}"


def preprocess_command(name: str, data_dir: str | Path = DEFAULT_DATA_DIR) -> str:
    """The shell command that builds the cache of `name` under `data_dir`."""
    return f"python3 preprocess_public_data.py --dataset={name}{_data_dir_flag(data_dir)}"


def named_commands(name: str, data_dir: str | Path = DEFAULT_DATA_DIR) -> str:
    """The shell commands that build a data set called `name` under `data_dir` from the user's files."""
    return (f"`python3 preprocess_public_data.py --dataset=interactions --name={name} --input=LOG.csv"
            f"{_data_dir_flag(data_dir)}` (your own interaction log), "
            f"`python3 preprocess_public_data.py --dataset=sessions --name={name} --train=TRAIN --test=TEST "
            f"[--valid=VALID]{_data_dir_flag(data_dir)}` (GRU4Rec-style prepared files) or "
            f"`python3 preprocess_public_data.py --dataset=yoochoose --archive=PATH/yoochoose-clicks.dat "
            f"--name={name}{_data_dir_flag(data_dir)}` (raw YOOCHOOSE clicks)")


def check_counts(spec: DatasetSpec, counts: Mapping[str, int]) -> List[str]:
    """One message per count that differs from the official data set's."""
    return [f"{_COUNT_LABELS.get(key, key)}: {counts[key]:,} here, {value:,} in the official data set"
            for key, value in spec.expected.items() if key in counts and counts[key] != value]


# --------------------------------------------------------------------------------------------------
# Outputs


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


def write_outputs(data: SequenceData, out_dir: Path, side_files: Mapping[str, Callable[[Path], None]]) -> Path:
    """Writes each side file (name -> function writing it to a path), then sequences.npz, which appears last.

    Each file is written to a hidden temporary file and renamed when complete, so a killed process
    leaves no complete-looking file; on an exception, what this call wrote is removed.
    """
    npz_path = out_dir / CACHE_FILE
    paths = [npz_path, *(out_dir / name for name in side_files)]
    for path in paths:  # never leave an old cache beside new side files (or the reverse)
        path.unlink(missing_ok=True)
        remove_stale_temporaries(path)

    def write_cache(tmp_npz: Path) -> None:
        save_sequences(data, tmp_npz)
        for name, write in side_files.items():
            atomic_write(out_dir / name, write)

    try:
        atomic_write(npz_path, write_cache, suffix=".npz")
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    return npz_path


def _format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{_COUNT_LABELS.get(key, key)} {value:,}" for key, value in counts.items())


def preprocess(name: str, data_dir: str | Path = DEFAULT_DATA_DIR, archive: Optional[str | Path] = None, *,
               allow_download: bool = True, log: Log = print_log) -> Path:
    """Builds `<data_dir>/<name>/sequences.npz` and `sasrec_format.csv`; returns the cache path."""
    spec = get_spec(name)
    start = time.time()
    out_dir = Path(data_dir) / name
    check_writable_dir(out_dir)  # before a download or minutes of parsing
    source = locate_archive(name, spec.remote, data_dir, archive, allow_download=allow_download, log=log)
    data, counts = spec.build(source, log)
    log(f"{name}: {_format_counts(counts)}")
    differences = check_counts(spec, counts)
    for difference in differences:
        log(f"WARNING: {name}: count differs from the official data set: {difference}")
    if not differences:
        log(f"{name}: all counts match the official data set")
    path = write_outputs(data, out_dir, {CSV_FILE: lambda tmp: write_sasrec_csv(data, spec, tmp)})
    log(f"{name}: wrote {path} and {out_dir / CSV_FILE} ({time.time() - start:.1f} s in all)")
    return path


_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def _check_name(name: str) -> None:
    if not _DATASET_NAME.match(name or ""):
        raise PreprocessingError(f"--name={name!r}: a data set built under --name needs a name of letters, digits, "
                                 "'.', '_' and '-' (it becomes the folder <data_dir>/<name>)")
    if name in DATASETS or name == SYNTHETIC:
        raise PreprocessingError(f"--name={name}: that is the name of a built-in data set; choose another")


def _write_sessions(data: SequenceData, out_dir: Path, side_files: Mapping[str, Callable[[Path], None]],
                    start: float, log: Log) -> Path:
    log(f"{data.name}: {sessions.describe_splits(data)}")
    path = write_outputs(data, out_dir, side_files)
    written = ", ".join(str(out_dir / name) for name in side_files)
    log(f"{data.name}: wrote {path}{' and ' + written if written else ''} ({time.time() - start:.1f} s in all)")
    return path


def preprocess_sessions(name: str, train: str | Path, test: str | Path, valid: Optional[str | Path] = None,
                        data_dir: str | Path = DEFAULT_DATA_DIR, *, log: Log = print_log) -> Path:
    """Builds `<data_dir>/<name>/sequences.npz` from prepared session files; returns the cache path."""
    _check_name(name)
    check_writable_dir(Path(data_dir) / name)
    start = time.time()
    splits = {key: sessions.read_prepared(Path(path).expanduser())
              for key, path in (("train", train), ("valid", valid), ("test", test)) if path is not None}
    for events in splits.values():
        log(f"{name}: read {events.source}: {events.describe()}")
    data = sessions.build_sessions(name, **splits, log=log)
    return _write_sessions(data, Path(data_dir) / name, {}, start, log)


def preprocess_yoochoose(archive: str | Path, name: str = DEFAULT_YOOCHOOSE_NAME,
                         data_dir: str | Path = DEFAULT_DATA_DIR, *, log: Log = print_log) -> Path:
    """Prepares raw YOOCHOOSE clicks with GRU4Rec's rules and builds `<data_dir>/<name>/sequences.npz`
    from train_tr (train), train_valid (valid) and test; GRU4Rec's four split files are written beside it."""
    _check_name(name)
    check_writable_dir(Path(data_dir) / name)
    start = time.time()
    clicks = sessions.parse_clicks(Path(archive).expanduser())
    log(f"{name}: parsed {clicks.source} in {time.time() - start:.1f} s")
    parts = sessions.prepare_clicks(clicks, log)
    data = sessions.build_sessions(name, parts["train_tr"], parts["test"], parts["train_valid"], log=log)
    side_files = {f"{name}_{key}.txt": (lambda tmp, events=events: sessions.write_prepared(events, tmp))
                  for key, events in parts.items()}
    return _write_sessions(data, Path(data_dir) / name, side_files, start, log)


def preprocess_interactions(name: str, path: str | Path, options: interactions.Options = interactions.Options(),
                            data_dir: str | Path = DEFAULT_DATA_DIR, *, log: Log = print_log) -> Path:
    """Builds `<data_dir>/<name>/sequences.npz` from the user's own interaction log; returns the cache path."""
    _check_name(name)
    check_writable_dir(Path(data_dir) / name)
    start = time.time()
    data = interactions.build_interactions(name, Path(path).expanduser(), options, log)
    log(f"{name}: {_format_counts(data.summary())}")
    out_dir = Path(data_dir) / name
    written = write_outputs(data, out_dir, {})
    log(f"{name}: wrote {written} ({time.time() - start:.1f} s in all)")
    return written


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


def _how_to_build(name: str, data_dir: str | Path) -> str:
    if name in DATASETS:
        return f"run `{preprocess_command(name, data_dir)}` ({how_to_supply(DATASETS[name].remote, data_dir)})"
    return (f"unknown data set {name!r} (the public ones are {', '.join(DATASETS)}); "
            f"a data set of this name is built with {named_commands(name, data_dir)}")


def ensure_preprocessed(name: str, data_dir: str | Path) -> Path:
    """The cache path of `name` (a public data set, or one built under that name with --name) if a valid
    cache exists; otherwise an error saying which command builds it."""
    path = cache_path(name, data_dir)
    if not path.is_file():
        raise PreprocessingError(f"{name} has not been preprocessed: {path} does not exist; "
                                 f"{_how_to_build(name, data_dir)}")
    problem = _cache_problem(path, name)
    if problem:
        raise PreprocessingError(f"{path} is not a valid {name} cache ({problem}); {_how_to_build(name, data_dir)}")
    return path
