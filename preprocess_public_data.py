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
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from absl import app, flags

from generative_recommenders.data.public_datasets import (
    DATASETS,
    DEFAULT_DATA_DIR,
    DEFAULT_YOOCHOOSE_NAME,
    SESSION_KINDS,
    PreprocessingError,
    preprocess,
    preprocess_sessions,
    preprocess_yoochoose,
)

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("dataset", None, f"Data set(s) to preprocess, repeatable or comma-separated: "
                          f"{', '.join(DATASETS)} (default: all three); or, alone, `sessions` (prepared session "
                          "files: --name, --train, --test, optional --valid) or `yoochoose` (raw clicks: --archive, "
                          "optional --name).")
flags.DEFINE_string("archive", None, "An archive or raw file already on disk (e.g. ../shared/data/ml-1m.zip, "
                    "PATH/yoochoose-clicks.dat); only with a single --dataset.")
flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Where archives are looked for or downloaded to, and where "
                    "<name>/sequences.npz is written.")
flags.DEFINE_string("name", None, "Session data sets only: the name to build them under (<data_dir>/<name>/) and "
                    f"to train with; required for --dataset=sessions, default {DEFAULT_YOOCHOOSE_NAME} for "
                    "--dataset=yoochoose.")
flags.DEFINE_string("train", None, "--dataset=sessions: the prepared training file (SessionId<TAB>ItemId<TAB>Time); "
                    "its items are the candidates.")
flags.DEFINE_string("valid", None, "--dataset=sessions: an optional prepared validation file.")
flags.DEFINE_string("test", None, "--dataset=sessions: the prepared test file.")


def dataset_names(values: Optional[Sequence[str]]) -> List[str]:
    """`--dataset` values (repeated and/or comma lists) -> names, in order, without repeats."""
    names: List[str] = []
    for value in values or list(DATASETS):
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    known = [*DATASETS, *SESSION_KINDS]
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


def run(datasets: Optional[Sequence[str]], archive: Optional[str], data_dir: str, name: Optional[str] = None,
        train: Optional[str] = None, valid: Optional[str] = None, test: Optional[str] = None) -> int:
    try:
        names = dataset_names(datasets)
        kinds = [n for n in names if n in SESSION_KINDS]
        if kinds and len(names) != 1:
            raise PreprocessingError(f"--dataset={kinds[0]} goes alone (got {', '.join(names)})")
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
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    return run(FLAGS.dataset, FLAGS.archive, FLAGS.data_dir, FLAGS.name, FLAGS.train, FLAGS.valid, FLAGS.test)


if __name__ == "__main__":
    app.run(main)
