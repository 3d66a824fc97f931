"""benchmarks/hstu_attention_variants.py in its CPU check mode (TINY=1, interpreter): forward and backward tile
rows for the kernel on main and for another kernel file, with their differences from main's default tiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "ops" / "triton" / "hstu_attention.py"


@pytest.mark.parametrize("mode", ["forward", "backward", "rab_tiles"])
def test_variants_benchmark_times_every_file_and_tile(tmp_path, mode):
    out = tmp_path / "variants.jsonl"
    other = tmp_path / "copy.py"
    other.write_text(KERNEL.read_text())  # an identical kernel file: differences 0
    cmd = [sys.executable, "benchmarks/hstu_attention_variants.py", str(out), f"copy={other}"]
    cmd += {"forward": [], "backward": ["--backward"], "rab_tiles": ["--backward", "--rab_tiles"]}[mode]
    backward = mode != "forward"
    env = dict(os.environ, TINY="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["impl"], r["cfg"] is None) for r in rows] == [("main", True), ("main", False), ("copy", True),
                                                              ("copy", False)]
    assert all(r["backward"] == backward and "error" not in r for r in rows)
    assert all(r["rab_tiles"] == (mode == "rab_tiles") for r in rows)
    # Other rab-pass tiles sum the bias gradients in another order (fp32 atomics): equal up to rounding.
    assert all(r["max_diff"] <= (1e-5 if mode == "rab_tiles" and r["cfg"] else 0.0) for r in rows), rows
