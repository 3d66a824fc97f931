"""benchmarks/train_throughput.py on CPU: every kind of frozen config an all-configs run meets, in one process.

Run as a subprocess, as users run it: the script's absl flags would clash with the trainer modules' flags
if it were imported into the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/ml-1m/hstu-sampled-softmax-n128-final.gin",   # paper protocol: the "eval" split
           "configs/ml-1m/bert4rec-full-softmax-converged.gin",   # leave-one-out: "valid" and "test"
           "configs/ml-1m/hstu-ranking-final.gin"]                # ranking: skipped with a note


def test_paper_and_leave_one_out_configs_are_timed_and_ranking_ones_skipped(tmp_path):
    out = tmp_path / "throughput.jsonl"
    small = ["train_fn.max_sequence_length = 20", "train_fn.local_batch_size = 8", "train_fn.eval_batch_size = 8"]
    cmd = [sys.executable, "benchmarks/train_throughput.py", "--steps=1", "--warmup=1", "--eval_batches=1",
           f"--out={out}"] + [f"--config={c}" for c in CONFIGS] + [f"--binding={b}" for b in small]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"] for r in rows] == CONFIGS
    for timed in rows[:2]:
        assert timed["steps_per_s"] > 0 and timed["eval_batches_per_s"] > 0 and timed["projected_recipe_minutes"] > 0
    assert "ranking" in rows[2]["skipped"]
