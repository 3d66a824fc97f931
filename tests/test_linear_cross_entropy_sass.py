"""benchmarks/linear_cross_entropy_sass.py: the forward kernel compiles for sm_90 on a CPU-only machine and the
script reads registers and the loop's length out of the result (the dQ matmul makes the loop longer)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (TOOLS / "ptxas").exists(), reason="this triton ships no ptxas")
def test_sass_report_of_one_tile():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    done = subprocess.run([sys.executable, "benchmarks/linear_cross_entropy_sass.py", "64x32x4x2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with_dq, without_dq = [ast.literal_eval(line) for line in done.stdout.splitlines()]
    assert with_dq["tiles"] == (64, 32, 4, 2) and with_dq["grad_query"] and not without_dq["grad_query"]
    assert all(0 < r["registers"] <= 255 and r["loop_instructions"] > 0 for r in (with_dq, without_dq))
    assert with_dq["loop_instructions"] > without_dq["loop_instructions"]
