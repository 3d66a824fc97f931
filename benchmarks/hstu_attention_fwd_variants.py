"""Forward tile configurations of kernel files, timed in one process (CUDA graphs: kernel time, no launch overhead).

    python3 benchmarks/hstu_attention_fwd_variants.py OUT.jsonl [NAME=KERNEL_FILE ...]

Times `_hstu_attention` forwards (with the relative bias) of ops/triton/hstu_attention.py ("main") and of each
other kernel file given (e.g. a copy of an earlier version: `git show REV:ops/triton/hstu_attention.py > f.py`),
at the benchmark's long-sequence shapes (bf16) and the MovieLens trainer shapes (bf16 and fp32), with the file's
default tiles and a few alternatives; each row also records the largest difference from main's default-tile
output and, for the default tiles, an eager forward+backward time. Issue 20's prefetch variant was measured
with it (benchmarks/results/hstu_attention_fwd_variants_h200.jsonl). TINY=1 TRITON_INTERPRET=1: a CPU check.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch
from triton.testing import do_bench, do_bench_cudagraph

import benchmarks.hstu_attention as bench
from ops.triton import hstu_attention as main_mod

SHAPES = [("N4096", 8, 4096, 2, 128, False, None), ("N4096r", 8, 4096, 2, 128, True, None),
          ("N8192", 8, 8192, 2, 128, False, None), ("N8192r", 8, 8192, 2, 128, True, None),
          ("ml1m-h1d50", 128, 211, 1, 50, True, 200), ("ml1m-h2d25", 128, 211, 2, 25, True, 200),
          ("ml20m-h4d64", 128, 211, 4, 64, True, 200), ("ml20m-h8d32", 128, 211, 8, 32, True, 200)]
LONG_CFGS = [None, (64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2)]
SHORT_CFGS = [None, (64, 32, 4, 2), (64, 64, 8, 2)]


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(out_path: str, variants: list) -> None:
    global do_bench, do_bench_cudagraph
    mods = {"main": main_mod, **{v.split("=", 1)[0]: _load(v.split("=", 1)[0], v.split("=", 1)[1]) for v in variants}}
    shapes, long_cfgs, short_cfgs, device = SHAPES, LONG_CFGS, SHORT_CFGS, "cuda"
    if os.environ.get("TINY"):
        shapes, long_cfgs, device = [("tiny", 2, 300, 2, 16, True, None)], [None, (16, 16, 1, 1)], "cpu"
        do_bench_cudagraph = lambda fn, rep=0: (fn(), 0.0)[1]
        do_bench = lambda fn, **kw: (fn(), 0.0)[1]
    with open(out_path, "w") as out:
        for label, b, n, h, d, ragged, max_ragged in shapes:
            for dtype in [torch.bfloat16] + ([torch.float32] if n <= 211 else []):
                bench.DTYPE = dtype
                x = bench.make_batch(b, n, h, d, d, ragged, max_ragged=max_ragged, device=device)
                args = (x["q"], x["k"], x["v"], x["offsets"], n, x["ts"], x["ts_w"], x["pos_w"])
                params = [x["q"], x["k"], x["v"], x["ts_w"], x["pos_w"]]
                with torch.no_grad():
                    ref = main_mod._hstu_attention(*args).float()
                for name, mod in mods.items():
                    for cfg in (long_cfgs if n > 211 else short_cfgs):
                        row = dict(shape=label, dtype=str(dtype)[6:], impl=name, cfg=cfg)
                        try:
                            with torch.no_grad():
                                row["max_diff"] = (mod._hstu_attention(*args, fwd_config=cfg).float() - ref).abs().max().item()
                                row["fwd_ms"] = do_bench_cudagraph(lambda: mod._hstu_attention(*args, fwd_config=cfg), rep=100)
                            if cfg is None:
                                row["fwd_bwd_ms"] = do_bench(
                                    lambda: torch.autograd.grad(mod._hstu_attention(*args), params, x["grad"]),
                                    warmup=10, rep=60, return_mode="median")
                        except Exception as exc:  # e.g. OutOfResources for a tile too large
                            row["error"] = repr(exc)[:200]
                        print(json.dumps(row), flush=True)
                        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
