"""Downloads and preprocesses the public data sets into `<data_dir>/<name>/sequences.npz`.

    python3 preprocess_public_data.py                      # ml-1m, ml-20m and amzn-books
    python3 preprocess_public_data.py --dataset=ml-1m --archive=../shared/data/ml-1m.zip

Without --archive, a file already at `<data_dir>/<archive name>` (ml-1m.zip, ml-20m.zip,
ratings_Books.csv) is used; otherwise it is downloaded from the original host.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from absl import app, flags

from generative_recommenders.data.public_datasets import DATASETS, DEFAULT_DATA_DIR, PreprocessingError, preprocess

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("dataset", None, f"Data set(s) to preprocess, repeatable or comma-separated: "
                          f"{', '.join(DATASETS)} (default: all).")
flags.DEFINE_string("archive", None, "An archive or raw file already on disk (e.g. ../shared/data/ml-1m.zip); "
                    "only with a single --dataset.")
flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Where archives are looked for or downloaded to, and where "
                    "<name>/sequences.npz is written.")


def dataset_names(values: Optional[Sequence[str]]) -> List[str]:
    """`--dataset` values (repeated and/or comma lists) -> names, in order, without repeats."""
    names: List[str] = []
    for value in values or list(DATASETS):
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        raise PreprocessingError(f"unknown --dataset {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    if not names:
        raise PreprocessingError("--dataset is empty")
    return names


def run(datasets: Optional[Sequence[str]], archive: Optional[str], data_dir: str) -> int:
    try:
        names = dataset_names(datasets)
        if archive is not None and len(names) != 1:
            raise PreprocessingError(f"--archive needs exactly one --dataset (got {', '.join(names)})")
        for name in names:
            preprocess(name, data_dir, archive)
    except PreprocessingError as exc:
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    return run(FLAGS.dataset, FLAGS.archive, FLAGS.data_dir)


if __name__ == "__main__":
    app.run(main)
