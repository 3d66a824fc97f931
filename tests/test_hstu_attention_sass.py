"""benchmarks/hstu_attention_sass.py: the HSTU kernels compile for sm_90 on a CPU-only machine, and the report
reflects the switches (the bias brings the time buckets' conversions and logs; only the weight gradients issue
atomics)."""

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
def test_sass_report_of_the_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    done = subprocess.run([sys.executable, "benchmarks/hstu_attention_sass.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [ast.literal_eval(line) for line in done.stdout.splitlines()]
    fwd = {r["bias"]: r for r in rows if r["kernel"] == "forward"}
    bwd = {(r["bias"], r["pos_grad"], r["ts_grad"]): r for r in rows if r["kernel"] == "backward"}
    assert len(fwd) == 2 and len(bwd) == 5
    assert all(0 < r["registers"] <= 255 and r["sass"] > 0 for r in rows)
    assert fwd[True]["MUFU"] > fwd[False]["MUFU"] and fwd[True]["sass"] > fwd[False]["sass"]
    assert bwd[True, True, True]["REDG"] > 0 and bwd[True, False, False]["REDG"] == 0
    assert bwd[True, True, True]["sass"] > bwd[True, False, False]["sass"] > bwd[False, False, False]["sass"]
