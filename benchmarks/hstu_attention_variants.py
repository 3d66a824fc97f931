"""Tile configurations of kernel files, timed in one process (CUDA graphs: kernel time, no launch overhead).

    python3 benchmarks/hstu_attention_variants.py OUT.jsonl [--backward] [--default_tiles] [--rab_tiles]
        [--fused_dq] [--shapes=N4096,ml20m-h8d32] [NAME=KERNEL_FILE ...]

Times `_hstu_attention` (with the relative bias and both weight gradients) of ops/triton/hstu_attention.py
("main") and of each other kernel file given (e.g. a copy of an earlier version: `git show
REV:ops/triton/hstu_attention.py > f.py`), at the benchmark's long-sequence shapes (bf16) and the MovieLens
trainer shapes (bf16 and fp32), with the file's default tiles and a few alternatives. Forward tiles by default;
with --backward, backward tiles, each row's time a captured forward+backward. Each row records the largest
difference from main's default-tile output (with --backward: of the five gradients) and, for the default
tiles of the forward, an eager forward+backward time. --default_tiles: each file's own tiles only, the other files
always at their own tiles (a quick before/after). --rab_tiles: with --backward, the tiles of the
rab-gradient pass (`_rab_grad_kernel`) instead, other files at their own tiles. --shapes: a subset of SHAPES by
label. --fused_dq: with --backward, the fused walk's tiles (dQ by atomics, weight gradients from the pass) in
every file that has it (the reference gradients are then main's fused walk at its own tiles). Issue 20's forward prefetch was measured with it (benchmarks/results/hstu_attention_fwd_variants_h200.jsonl).
TINY=1 TRITON_INTERPRET=1: a CPU check.
"""
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
# Backward (BLOCK, BLOCK_M1, BLOCK_N2, warps, stages): the d = 128 ones compile without spills (sm_90) with the
# backward's key times loaded one block ahead.
LONG_BWD_CFGS = [None, (64, 16, 16, 8, 2), (32, 16, 16, 4, 2), (32, 16, 16, 4, 3), (32, 32, 16, 4, 2)]
SHORT_BWD_CFGS = [None]  # the trainer shapes: each file's own tiles, fp32 only (the trainers' default)
# The rab-gradient pass (BLOCK_M, BLOCK_N, warps, stages): it holds every head's q, dO, k, v tiles per step.
LONG_RAB_CFGS = [None, (64, 32, 8, 2), (64, 16, 4, 2), (32, 32, 4, 2), (64, 64, 8, 1), (128, 32, 8, 1)]
SHORT_RAB_CFGS = [None, (64, 16, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2)]
# The fused backward (--fused_dq: one walk, dQ by atomics): the d = 128 candidates compile without spills (sm_90,
# benchmarks/hstu_attention_sass.py) but the first (the two-walk kernel's own tiles).
LONG_FUSED_CFGS = [None, (64, 16, 16, 8, 2), (128, 16, 16, 8, 2), (32, 16, 16, 4, 2), (64, 16, 16, 4, 2)]
SHORT_FUSED_CFGS = [None, (64, 16, 16, 4, 2), (32, 16, 16, 4, 2), (64, 32, 32, 4, 2)]
RAB_TILES = False  # set by --rab_tiles: cfg is the rab pass's, for the files that have one


def _grads(mod, args, params, grad, cfg):
    if RAB_TILES:
        kwargs = dict(rab_config=cfg) if hasattr(mod, "_rab_grad_kernel") else {}
    else:
        kwargs = dict(bwd_config=cfg)
    return torch.autograd.grad(mod._hstu_attention(*args, **kwargs), params, grad)


def _max_diff(xs, refs) -> float:
    return max((x.float() - r).abs().max().item() for x, r in zip(xs, refs))


def _time_forward(mod, args, params, grad, cfg, ref) -> dict:
    with torch.no_grad():
        row = dict(max_diff=(mod._hstu_attention(*args, fwd_config=cfg).float() - ref).abs().max().item(),
                   fwd_ms=do_bench_cudagraph(lambda: mod._hstu_attention(*args, fwd_config=cfg), rep=100))
    if cfg is None:
        row["fwd_bwd_ms"] = do_bench(lambda: torch.autograd.grad(mod._hstu_attention(*args), params, grad),
                                     warmup=10, rep=60, return_mode="median")
    return row


def _time_backward(mod, args, params, grad, cfg, ref_grads) -> dict:
    """A captured forward (default tiles) + backward (tiles cfg), and its gradients' largest difference."""
    return dict(max_diff=_max_diff(_grads(mod, args, params, grad, cfg), ref_grads),
                fwd_bwd_ms=do_bench_cudagraph(lambda: _grads(mod, args, params, grad, cfg), rep=100))


def main(out_path: str, variants: list, backward: bool = False, default_tiles: bool = False,
         rab_tiles: bool = False, shape_labels: str = "", fused_dq: bool = False) -> None:
    global do_bench, do_bench_cudagraph, RAB_TILES
    named = dict(v.split("=", 1) for v in variants)
    mods = {"main": main_mod, **{name: bench.load_kernel_file(path, name) for name, path in named.items()}}
    shapes, device = SHAPES, "cuda"
    if shape_labels:
        shapes = [s for s in SHAPES if s[0] in shape_labels.split(",")]
    long_cfgs, short_cfgs = (LONG_BWD_CFGS, SHORT_BWD_CFGS) if backward else (LONG_CFGS, SHORT_CFGS)
    RAB_TILES = backward and rab_tiles
    for mod in mods.values():  # a tile sweep of the pass runs it at every shape, in every file that has it
        if hasattr(mod, "RAB_PASS"):
            mod.RAB_PASS = True if RAB_TILES else None
    if RAB_TILES:
        long_cfgs, short_cfgs = LONG_RAB_CFGS, SHORT_RAB_CFGS
    if backward and fused_dq:  # every file that has the fused walk runs it
        long_cfgs, short_cfgs = LONG_FUSED_CFGS, SHORT_FUSED_CFGS
        for mod in mods.values():
            if hasattr(mod, "FUSED_DQ"):
                mod.FUSED_DQ = True
    if default_tiles:
        long_cfgs = short_cfgs = [None]
    if os.environ.get("TINY"):
        shapes, device = [("tiny", 2, 300, 2, 16, True, None)], "cpu"
        long_cfgs = [None, (16, 16, 16, 1, 1)] if backward and not RAB_TILES else [None, (16, 16, 1, 1)]
        do_bench_cudagraph = lambda fn, rep=0: (fn(), 0.0)[1]
        do_bench = lambda fn, **kw: (fn(), 0.0)[1]
    with open(out_path, "w") as out:
        for label, b, n, h, d, ragged, max_ragged in shapes:
            short = n <= 211
            dtypes = ([torch.float32] if backward else [torch.bfloat16, torch.float32]) if short else [torch.bfloat16]
            for dtype in dtypes:
                bench.DTYPE = dtype
                x = bench.make_batch(b, n, h, d, d, ragged, max_ragged=max_ragged, device=device)
                args = (x["q"], x["k"], x["v"], x["offsets"], n, x["ts"], x["ts_w"], x["pos_w"])
                params = [x["q"], x["k"], x["v"], x["ts_w"], x["pos_w"]]
                with torch.no_grad():
                    ref = main_mod._hstu_attention(*args).float()
                ref_grads = [g.float() for g in _grads(main_mod, args, params, x["grad"], None)] if backward else None
                for name, mod in mods.items():
                    for cfg in (short_cfgs if short else long_cfgs):
                        if RAB_TILES and cfg is not None and not hasattr(mod, "_rab_grad_kernel"):
                            continue  # a file without the pass: its own tiles once
                        row = dict(shape=label, dtype=str(dtype)[6:], impl=name, cfg=cfg, backward=backward,
                                   rab_tiles=RAB_TILES)
                        try:
                            if backward:
                                row.update(_time_backward(mod, args, params, x["grad"], cfg, ref_grads))
                            else:
                                row.update(_time_forward(mod, args, params, x["grad"], cfg, ref))
                        except Exception as exc:  # e.g. OutOfResources for a tile too large
                            row["error"] = repr(exc)[:200]
                        print(json.dumps(row), flush=True)
                        out.write(json.dumps(row) + "\n")
                        out.flush()  # a run stopped by a time limit keeps its rows


if __name__ == "__main__":
    flags = {"--backward", "--default_tiles", "--rab_tiles", "--fused_dq"}
    shapes_arg = [a for a in sys.argv[2:] if a.startswith("--shapes=")]
    main(sys.argv[1], [a for a in sys.argv[2:] if a not in flags and a not in shapes_arg],
         "--backward" in sys.argv[2:], "--default_tiles" in sys.argv[2:], "--rab_tiles" in sys.argv[2:],
         shapes_arg[0].split("=", 1)[1] if shapes_arg else "", "--fused_dq" in sys.argv[2:])
