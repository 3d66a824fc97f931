"""The backward's paths, each forced, in one process: a captured forward+backward per path and shape.

    python3 benchmarks/hstu_attention_rab_switch.py [OUT.jsonl] [--shapes=LABEL,...]

Paths (`ops.triton.hstu_attention.RAB_PASS` and `FUSED_DQ`): `walk_ms`, the dQ walk computing the rab gradients
per head; `pass_ms`, the rab-gradient pass (heads summed in-program) beside the two walks; `fused_ms`, the pass
beside one fused walk whose dQ goes by atomics. At the long-sequence shapes also the bias-free kernel with two walks
(`nobias_ms`) and fused (`nobias_fused_ms`), for issue 20's "the bias-free path stays as fast". Shapes: the long
benchmark's (N = 4096, 8192, bf16), the trainers' (N = 211, lengths in [1, 200]) in fp32 (their default) and bf16,
and between them the shapes that drew `rab_pass_wins`'s line (benchmarks/hstu_attention.md). Rows in that order, so
a time limit cuts the least needed; each row is flushed when done.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch
from triton.testing import do_bench_cudagraph

import benchmarks.hstu_attention as bench
from ops.triton import hstu_attention as kernel

BF16, FP32 = torch.bfloat16, torch.float32
# label: (N, B, heads, d, ragged up to, dtype)
SHAPES = {
    "N4096": (4096, 8, 2, 128, None, BF16), "N8192": (8192, 8, 2, 128, None, BF16),
    "N4096r": (4096, 8, 2, 128, 4096, BF16), "N8192r": (8192, 8, 2, 128, 8192, BF16),
    "ml1m-h1d50": (211, 128, 1, 50, 200, FP32), "ml1m-h2d25": (211, 128, 2, 25, 200, FP32),
    "ml20m-h4d64": (211, 128, 4, 64, 200, FP32), "ml20m-h8d32": (211, 128, 8, 32, 200, FP32),
    "N1024": (1024, 8, 2, 128, None, BF16), "N2048": (2048, 8, 2, 128, None, BF16),
    "N512b32": (512, 32, 2, 128, None, BF16), "N1024r-fp32": (1024, 32, 2, 128, 1024, FP32),
    "ml1m-h2d25-bf16": (211, 128, 2, 25, 200, BF16), "ml20m-h4d64-bf16": (211, 128, 4, 64, 200, BF16),
    "ml20m-h8d32-bf16": (211, 128, 8, 32, 200, BF16),
}
PATHS = {"walk_ms": (False, False), "pass_ms": (True, False), "fused_ms": (True, True)}
NOBIAS_PATHS = {"nobias_ms": False, "nobias_fused_ms": True}


def _time(args, params, grad) -> float:
    return do_bench_cudagraph(lambda: torch.autograd.grad(kernel._hstu_attention(*args), params, grad), rep=50)


def time_shape(n: int, b: int, heads: int, d: int, ragged, dtype) -> dict:
    bench.DTYPE = dtype
    x = bench.make_batch(b, n, heads, d, d, ragged is not None, max_ragged=ragged, device="cuda")
    args = (x["q"], x["k"], x["v"], x["offsets"], n, x["ts"], x["ts_w"], x["pos_w"])
    params = [x["q"], x["k"], x["v"], x["ts_w"], x["pos_w"]]
    row = dict(n=n, batch=b, heads=heads, d=d, ragged=ragged is not None, dtype=str(dtype)[6:],
               device=torch.cuda.get_device_name(), torch=torch.__version__)
    grads = {}
    for name, (rab_pass, fused) in PATHS.items():
        kernel.RAB_PASS, kernel.FUSED_DQ = rab_pass, fused
        grads[name] = torch.autograd.grad(kernel._hstu_attention(*args), params, x["grad"])
        row[name] = _time(args, params, x["grad"])
    row["fused_max_diff"] = max((a.float() - b.float()).abs().max().item()
                                for a, b in zip(grads["fused_ms"], grads["pass_ms"]))
    if n >= 4096:
        for name, fused in NOBIAS_PATHS.items():
            kernel.FUSED_DQ = fused
            row[name] = _time(args[:5], params[:3], x["grad"])
    kernel.RAB_PASS = kernel.FUSED_DQ = None
    return row


def main(out_path: str = "", labels: str = "") -> None:
    out = open(out_path, "w") if out_path else None
    for label in labels.split(",") if labels else SHAPES:
        row = dict(shape=label, **time_shape(*SHAPES[label]))
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    flags = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--shapes=")]
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(paths[0] if paths else "", flags[0] if flags else "")
