"""The offline sm_90 compile reports (benchmarks/sass.py and its two scripts) on a CPU-only machine: the kernels
compile, and the numbers read back reflect the switches the scripts turn (the dQ matmul makes the fused
cross-entropy's loop longer; the HSTU bias brings the time buckets' logs, and only its weight gradients issue
atomics)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists(),
                                reason="this triton ships no ptxas")


def _report(*args: str) -> List[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [ast.literal_eval(line) for line in done.stdout.splitlines()]


def test_linear_cross_entropy_report_of_one_tile():
    with_dq, without_dq = _report("benchmarks/linear_cross_entropy_sass.py", "64x32x4x2")
    assert with_dq["tiles"] == (64, 32, 4, 2) and with_dq["grad_query"] and not without_dq["grad_query"]
    assert all(0 < r["registers"] <= 255 and r["loop_instructions"] > 0 for r in (with_dq, without_dq))
    assert with_dq["loop_instructions"] > without_dq["loop_instructions"]


def test_hstu_attention_report_of_the_kernels():
    rows = _report("benchmarks/hstu_attention_sass.py")
    fwd = {r["bias"]: r for r in rows if r["kernel"] == "forward"}
    bwd = {(r["bias"], r["pos_grad"], r["ts_grad"]): r for r in rows if r["kernel"] == "backward"}
    assert len(fwd) == 2 and len(bwd) == 5
    assert all(0 < r["registers"] <= 255 and r["sass"] > 0 for r in rows)
    assert fwd[True]["MUFU"] > fwd[False]["MUFU"] and fwd[True]["sass"] > fwd[False]["sass"]
    assert bwd[True, True, True]["REDG"] > 0 and bwd[True, False, False]["REDG"] == 0
    assert bwd[True, True, True]["sass"] > bwd[True, False, False]["sass"] > bwd[False, False, False]["sass"]
