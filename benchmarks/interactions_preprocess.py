"""Time and peak memory of `preprocess_public_data.py --dataset=interactions` on a synthetic log.

    python3 benchmarks/interactions_preprocess.py                    # 20M rows, integer ids
    python3 benchmarks/interactions_preprocess.py --rows=2000000 --string_ids --min_user_interactions=5

Writes a CSV of `--rows` rows (`user_id,item_id,timestamp,rating`: uniform users, Zipf-popular items,
random times) in a temporary directory, then runs the preprocessing command in a child process and
reports its wall time and peak resident memory (the child's ru_maxrss). Nothing is kept.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

REPO = Path(__file__).resolve().parents[1]

flags.DEFINE_integer("rows", 20_000_000, "Rows of the synthetic log.")
flags.DEFINE_integer("users", 200_000, "Distinct users (uniform).")
flags.DEFINE_integer("items", 300_000, "Item id range (Zipf-popular, so fewer are seen).")
flags.DEFINE_bool("string_ids", False, "Ids as text (u123, i456) instead of integers.")
flags.DEFINE_integer("min_user_interactions", 1, "Passed to the command.")
flags.DEFINE_integer("min_item_interactions", 1, "Passed to the command.")
FLAGS = flags.FLAGS


def write_log(path: Path, rows: int, users: int, items: int, string_ids: bool, block: int = 1_000_000) -> None:
    """The synthetic CSV, written block by block (a progress line per 5M rows)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    start = time.time()
    with open(path, "w") as f:
        f.write("user_id,item_id,timestamp,rating\n")
        for first in range(0, rows, block):
            n = min(block, rows - first)
            frame = pd.DataFrame({"user_id": rng.integers(1, users + 1, n),
                                  "item_id": (rng.zipf(1.3, n) - 1) % items + 1,
                                  "timestamp": 1_500_000_000 + rng.integers(0, 100_000_000, n),
                                  "rating": rng.integers(1, 6, n)})
            if string_ids:
                frame["user_id"] = "u" + frame["user_id"].astype(str)
                frame["item_id"] = "i" + frame["item_id"].astype(str)
            frame.to_csv(f, header=False, index=False)
            if (first + n) % 5_000_000 == 0 or first + n == rows:
                print(f"  wrote {first + n:,} rows ({time.time() - start:.0f} s)", flush=True)


def main(argv) -> None:
    del argv
    with tempfile.TemporaryDirectory(prefix="interactions-bench-") as tmp:
        log = Path(tmp) / "log.csv"
        print(f"writing {FLAGS.rows:,} rows to {log}", flush=True)
        write_log(log, FLAGS.rows, FLAGS.users, FLAGS.items, FLAGS.string_ids)
        size = log.stat().st_size
        command = [sys.executable, str(REPO / "preprocess_public_data.py"), "--dataset=interactions", "--name=bench",
                   f"--input={log}", f"--data_dir={tmp}/data",
                   f"--min_user_interactions={FLAGS.min_user_interactions}",
                   f"--min_item_interactions={FLAGS.min_item_interactions}"]
        print(" ".join(command), flush=True)
        start = time.time()
        subprocess.run(command, check=True)
        seconds = time.time() - start
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # Linux: KiB
        with open("/proc/loadavg") as f:
            load = f.read().split()[0]
        print(f"preprocessed {FLAGS.rows:,} rows ({size / 2**20:,.0f} MiB of CSV, "
              f"{'text' if FLAGS.string_ids else 'integer'} ids) in {seconds:.1f} s, peak RSS {peak_gib:.2f} GiB "
              f"(load average {load} after)", flush=True)


if __name__ == "__main__":
    app.run(main)
