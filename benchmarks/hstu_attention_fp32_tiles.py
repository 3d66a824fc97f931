"""Block sizes of the fused attention kernel for fp32 inputs with TF32 dots (the trainer's default).

    python3 benchmarks/hstu_attention_fp32_tiles.py > benchmarks/results/hstu_attention_fp32_tiles_h100.txt

Times each candidate forward and backward block configuration at the shapes the
trainer runs under its CUDA graph (B = 128, full padded length N = 211 for
MovieLens and 61 for Books; the frozen configs' heads and head dims), as a
CUDA-graph replay, and prints each one's largest relative difference from the
first (default) configuration. The fp32 tables in ops/triton/hstu_attention.py
come from this output.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import triton

import hstu_attention as bench
from ops.triton.hstu_attention import _backward, _forward

FWD = [(64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2), (128, 64, 8, 2), (64, 16, 4, 2)]
BWD = [(64, 16, 16, 4, 1), (64, 16, 16, 4, 2), (64, 32, 32, 4, 2), (64, 64, 32, 8, 2), (32, 16, 16, 4, 2),
       (64, 32, 16, 4, 2), (128, 32, 32, 8, 2), (64, 64, 64, 8, 2), (32, 32, 32, 4, 2), (64, 32, 32, 8, 1)]
SHAPES = [("ml-1m", 211, 2, 25), ("ml-1m", 211, 1, 50), ("ml-20m", 211, 8, 32), ("ml-20m", 211, 4, 64),
          ("books", 61, 4, 16)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _time(label: str, fn, reference) -> None:
    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=50)
        got = fn()
        got, reference = (got, reference) if isinstance(got, tuple) else ((got,), (reference,))
        err = max(_rel(x, y) for x, y in zip(got, reference))
        print(f"{label}: {ms:.4f} ms err {err:.1e}", flush=True)
    except Exception as exc:  # a configuration that does not compile or fit is reported, not fatal
        print(f"{label}: FAILED {type(exc).__name__} {str(exc)[:100]}", flush=True)


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    bench.DTYPE = torch.float32
    for name, n, h, d in SHAPES:
        b = bench.make_batch(128, n, h, d, d, ragged=False)
        args = [b[x].detach() for x in ("q", "k", "v")] + [b["offsets"], n, b["ts"], b["ts_w"].detach(), b["pos_w"].detach()]
        reference = _forward(*args, config=FWD[0])
        for f in FWD:
            _time(f"{name} h{h} d{d} fwd {f}", lambda: _forward(*args, config=f), reference)
        reference = _backward(b["grad"], *args, True, True, config=BWD[0])
        for c in BWD:
            _time(f"{name} h{h} d{d} bwd {c}", lambda: _backward(b["grad"], *args, True, True, config=c), reference)


if __name__ == "__main__":
    main()
