"""F.layer_norm against ops/layer_norm.py's CompositeLayerNorm, forward and forward+backward.

    python3 benchmarks/layer_norm.py --out benchmarks/results/layer_norm_h100.jsonl

Shapes: the rows of one padded ml-1m batch (128 x 211) by the frozen configs'
normalised sizes (25, 50) and a multiple of 4 for contrast (64). fp32. Each
call is timed as a CUDA-graph replay (`triton.testing.do_bench_cudagraph`), as
the trainer runs it: GPU time, without Python's launch overhead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch
import torch.nn.functional as F
import triton
from absl import app, flags

from ops.layer_norm import CompositeLayerNorm

flags.DEFINE_string("out", None, "Append JSON lines here.")
FLAGS = flags.FLAGS


def _ms(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100)


def main(argv: List[str]) -> None:
    del argv
    rows = 128 * 211
    impls = {"torch": lambda x: F.layer_norm(x, x.shape[-1:], eps=1e-6), "composite": lambda x: CompositeLayerNorm.apply(x, 1e-6)}
    for dim in (25, 50, 64):
        x = torch.randn(rows, dim, device="cuda", requires_grad=True)
        grad = torch.randn_like(x)
        for name, fn in impls.items():
            result = {
                "impl": name, "rows": rows, "dim": dim, "dtype": "float32",
                "fwd_ms": _ms(lambda: fn(x)),
                "fwd_bwd_ms": _ms(lambda: torch.autograd.grad(fn(x), x, grad)),
                "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            }
            line = json.dumps(result)
            print(line, flush=True)
            if FLAGS.out:
                with open(FLAGS.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    app.run(main)
