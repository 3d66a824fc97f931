"""Downloads and preprocesses the data sets into `<data_dir>/<name>/sequences.npz`.

    python3 preprocess_public_data.py                      # ml-1m, ml-20m and amzn-books
    python3 preprocess_public_data.py --dataset=ml-1m --archive=../shared/data/ml-1m.zip

Without --archive, a file already at `<data_dir>/<archive name>` (ml-1m.zip, ml-20m.zip,
ratings_Books.csv) is used; otherwise it is downloaded from the original host and checked
against the published size and checksum.

Session data sets (one sequence per session, GRU4Rec's data preparation) are built under a name
of your choice, from prepared tab-separated split files (header `SessionId ItemId Time`) or from
the raw RecSys Challenge 2015 clicks (`yoochoose-clicks.dat`, not downloaded by this tool):

    python3 preprocess_public_data.py --dataset=sessions --name=rsc15-100k \\
        --train=PATH/train_tr.txt --valid=PATH/train_valid.txt --test=PATH/test.txt [--data_dir=tmp/]
    python3 preprocess_public_data.py --dataset=yoochoose --archive=PATH/yoochoose-clicks.dat [--name=rsc15]

The second also writes GRU4Rec's four prepared files (`<name>_train_full.txt`, `_test`,
`_train_tr`, `_train_valid`) beside the cache, which holds train_tr, train_valid and test.
Training reads a session data set by its name, like the public ones.

Your own interaction log (a header line, then one `user, item, time[, rating]` row per interaction;
CSV, TSV, RecBole's `.inter`, or Parquet with pyarrow) is built under a name of your choice too:

    python3 preprocess_public_data.py --dataset=interactions --name=shop --input=PATH/log.csv \\
        [--user_col=customer --item_col=sku --time_col=ts --rating_col=stars] [--min_rating=4] \\
        [--min_user_interactions=5 --min_item_interactions=5] [--drop_duplicates]

Columns default to RecBole's names (`user_id:token`, `item_id:token`, `timestamp:float`,
`rating:float`) or the plain ones (`user_id`, `item_id`, `timestamp`, `rating`); the rules are in
generative_recommenders/data/sources/interactions.py.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence

from absl import app, flags

from generative_recommenders.data.public_datasets import (
    DATASETS,
    DEFAULT_DATA_DIR,
    DEFAULT_YOOCHOOSE_NAME,
    NAMED_KINDS,
    PreprocessingError,
    preprocess,
    preprocess_interactions,
    preprocess_sessions,
    preprocess_yoochoose,
)
from generative_recommenders.data.sources.interactions import Options
from generative_recommenders.files import os_error_line

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("dataset", None, f"Data set(s) to preprocess, repeatable or comma-separated: "
                          f"{', '.join(DATASETS)} (default: all three); or, alone, `sessions` (prepared session "
                          "files: --name, --train, --test, optional --valid), `yoochoose` (raw clicks: --archive, "
                          "optional --name) or `interactions` (your own log: --name, --input).")
flags.DEFINE_string("archive", None, "An archive or raw file already on disk (e.g. ../shared/data/ml-1m.zip, "
                    "PATH/yoochoose-clicks.dat); only with a single --dataset.")
flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Where archives are looked for or downloaded to, and where "
                    "<name>/sequences.npz is written.")
flags.DEFINE_string("name", None, "Session data sets and your own log: the name to build them under "
                    "(<data_dir>/<name>/) and to train with; required for --dataset=sessions and interactions, "
                    f"default {DEFAULT_YOOCHOOSE_NAME} for --dataset=yoochoose.")
flags.DEFINE_string("train", None, "--dataset=sessions: the prepared training file (SessionId<TAB>ItemId<TAB>Time); "
                    "its items are the candidates.")
flags.DEFINE_string("valid", None, "--dataset=sessions: an optional prepared validation file.")
flags.DEFINE_string("test", None, "--dataset=sessions: the prepared test file.")
flags.DEFINE_string("input", None, "--dataset=interactions: the log, with a header line; .csv, .tsv, .inter (tab) or "
                    ".parquet (needs pyarrow), optionally compressed (.gz, ...).")
flags.DEFINE_string("sep", None, "--dataset=interactions: the field separator, one character ('\\t' or 'tab' for a "
                    "tab); default from --input's extension.")
flags.DEFINE_string("user_col", None, "--dataset=interactions: the user column (default user_id:token or user_id; "
                    "a name also matches RecBole's typed form, name:type).")
flags.DEFINE_string("item_col", None, "--dataset=interactions: the item column (default item_id:token or item_id).")
flags.DEFINE_string("time_col", None, "--dataset=interactions: the time column, numbers such as Unix seconds "
                    "(default timestamp:float or timestamp).")
flags.DEFINE_string("rating_col", None, "--dataset=interactions: the rating column (default rating:float or rating "
                    "where there is one; without one every rating is 1).")
flags.DEFINE_float("min_rating", None, "--dataset=interactions: keep only rows rated at least this.")
flags.DEFINE_integer("min_user_interactions", 1, "--dataset=interactions: k-core, users with at least this many "
                     "interactions (applied with --min_item_interactions until both hold).")
flags.DEFINE_integer("min_item_interactions", 1, "--dataset=interactions: k-core, items with at least this many "
                     "interactions.")
flags.DEFINE_bool("drop_duplicates", False, "--dataset=interactions: drop repeated (user, item, time) rows, keeping "
                  "the first (default: kept).")

INTERACTION_FLAGS = ("input", "sep", "user_col", "item_col", "time_col", "rating_col", "min_rating",
                     "min_user_interactions", "min_item_interactions", "drop_duplicates")


def dataset_names(values: Optional[Sequence[str]]) -> List[str]:
    """`--dataset` values (repeated and/or comma lists) -> names, in order, without repeats."""
    names: List[str] = []
    for value in values or list(DATASETS):
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    known = [*DATASETS, *NAMED_KINDS]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise PreprocessingError(f"unknown --dataset {', '.join(unknown)}; known: {', '.join(known)}")
    if not names:
        raise PreprocessingError("--dataset is empty")
    return names


def _run_sessions(kind: str, archive: Optional[str], data_dir: str, name: Optional[str], train: Optional[str],
                  valid: Optional[str], test: Optional[str]) -> None:
    if kind == "sessions":
        if archive is not None:
            raise PreprocessingError("--dataset=sessions reads --train, --test and --valid, not --archive")
        if name is None or train is None or test is None:
            raise PreprocessingError("--dataset=sessions needs --name, --train and --test (--valid is optional)")
        preprocess_sessions(name, train, test, valid, data_dir)
        return
    if any(path is not None for path in (train, valid, test)):
        raise PreprocessingError("--dataset=yoochoose splits the raw clicks itself: no --train, --valid or --test")
    if archive is None:
        raise PreprocessingError("--dataset=yoochoose needs --archive=PATH/yoochoose-clicks.dat (the RecSys "
                                 "Challenge 2015 clicks, which this tool does not download)")
    preprocess_yoochoose(archive, name or DEFAULT_YOOCHOOSE_NAME, data_dir)


def _run_interactions(data_dir: str, name: Optional[str], options: Dict[str, Any], other_flags: Sequence[str]) -> None:
    if other_flags:
        raise PreprocessingError(f"--dataset=interactions reads --input, not {', '.join(other_flags)}")
    path = options.pop("input", None)
    if name is None or path is None:
        raise PreprocessingError("--dataset=interactions needs --name and --input")
    preprocess_interactions(name, path, Options(**options), data_dir)


def run(datasets: Optional[Sequence[str]], archive: Optional[str], data_dir: str, name: Optional[str] = None,
        train: Optional[str] = None, valid: Optional[str] = None, test: Optional[str] = None,
        interaction_options: Optional[Dict[str, Any]] = None) -> int:
    """`interaction_options`: the --dataset=interactions flags given (INTERACTION_FLAGS -> value)."""
    interaction_options = dict(interaction_options or {})
    try:
        names = dataset_names(datasets)
        kinds = [n for n in names if n in NAMED_KINDS]
        if kinds and len(names) != 1:
            raise PreprocessingError(f"--dataset={kinds[0]} goes alone (got {', '.join(names)})")
        if kinds and kinds[0] == "interactions":
            _run_interactions(data_dir, name, interaction_options,
                              [f"--{flag}" for flag, value in (("archive", archive), ("train", train), ("valid", valid),
                                                               ("test", test)) if value is not None])
            return 0
        if interaction_options:
            raise PreprocessingError(f"{', '.join('--' + flag for flag in interaction_options)}: only for "
                                     "--dataset=interactions")
        if kinds:
            _run_sessions(kinds[0], archive, data_dir, name, train, valid, test)
            return 0
        session_flags = [flag for flag, value in (("--name", name), ("--train", train), ("--valid", valid),
                                                  ("--test", test)) if value is not None]
        if session_flags:
            raise PreprocessingError(f"{', '.join(session_flags)}: only for --dataset=sessions or yoochoose")
        if archive is not None and len(names) != 1:
            raise PreprocessingError(f"--archive needs exactly one --dataset (got {', '.join(names)})")
        for dataset in names:
            preprocess(dataset, data_dir, archive)
    except PreprocessingError as exc:
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:  # an unwritable, full or misplaced --data_dir: the path and the cause
        print(f"ERROR: {os_error_line(exc)}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    given = {flag: FLAGS[flag].value for flag in INTERACTION_FLAGS if FLAGS[flag].present}
    return run(FLAGS.dataset, FLAGS.archive, FLAGS.data_dir, FLAGS.name, FLAGS.train, FLAGS.valid, FLAGS.test, given)


if __name__ == "__main__":
    app.run(main)
