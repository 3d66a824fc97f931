"""Copies a preprocessed data set with each user's equal-timestamp interactions in random order.

The release sorted interactions with a non-stable sort, so interactions sharing a
timestamp (40% of ml-1m's) reached the model in arbitrary order; this project
sorts stably (file order). This script makes the release's situation for an
experiment on how much that order matters:

    python3 scripts/shuffle_ties.py --src=tmp --dst=tmp/shuffled-ties --dataset=ml-1m
    python3 main.py --gin_config_file=... --gin_bindings="train_fn.data_dir='tmp/shuffled-ties'"
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generative_recommenders.data.sequence_store import CACHE_FILE, load_sequences, save_sequences  # noqa: E402

flags.DEFINE_string("src", "tmp", "data_dir holding <dataset>/sequences.npz")
flags.DEFINE_string("dst", "tmp/shuffled-ties", "data_dir to write the copy to")
flags.DEFINE_string("dataset", "ml-1m", "data set name")
flags.DEFINE_integer("seed", 0, "shuffle seed")
FLAGS = flags.FLAGS


def shuffled_tie_order(user_of_row: np.ndarray, timestamps: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the rows that keeps (user, timestamp) order but shuffles rows within ties."""
    noise = np.random.default_rng(seed).random(len(timestamps))
    return np.lexsort((noise, timestamps, user_of_row))


def main(argv) -> None:
    del argv
    data = load_sequences(Path(FLAGS.src) / FLAGS.dataset / CACHE_FILE)
    user_of_row = np.repeat(np.arange(data.num_users), data.lengths)
    order = shuffled_tie_order(user_of_row, data.timestamps, FLAGS.seed)
    moved = float(np.mean(order != np.arange(len(order))))
    data.item_ids, data.ratings, data.timestamps = data.item_ids[order], data.ratings[order], data.timestamps[order]
    out = Path(FLAGS.dst) / FLAGS.dataset / CACHE_FILE
    save_sequences(data, out)
    print(f"wrote {out}: {moved:.1%} of the interactions changed place")


if __name__ == "__main__":
    app.run(main)
