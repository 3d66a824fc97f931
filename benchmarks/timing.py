"""What the kernel benchmarks share: forward and forward+backward medians, peak extra memory, JSON lines out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from triton.testing import do_bench


def time_and_peak(fwd: Callable[[], object], fwd_bwd: Callable[[], object]) -> Tuple[float, float, float]:
    """(fwd_ms, fwd_bwd_ms, peak extra GB of one fwd_bwd): medians of do_bench after its warm-up."""
    fwd_bwd()  # compile and allocate first
    torch.cuda.synchronize()
    fwd_ms = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    fwd_bwd_ms = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    return fwd_ms, fwd_bwd_ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def write_jsonl(path: str, rows: List[Dict]) -> None:
    """One JSON line per measurement (the file is replaced; its folder is created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
