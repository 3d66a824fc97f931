"""Jagged HSTU attention: fused Triton kernel vs the PyTorch formula vs softmax SDPA.

    python3 benchmarks/hstu_attention.py --out benchmarks/results/hstu_attention_h100.jsonl

Times forward and forward+backward (median of triton.testing.do_bench, after
warm-up) of
* impl=triton:      ops.triton.hstu_attention.triton_hstu_attention, with the
                    relative bias (timestamps, ts_w, pos_w all requiring grad),
                    and impl=triton_nobias without it;
* impl=triton_before: an earlier version of the kernel file, copied to
                    .carry/hstu_attention_before.py (`git show REV:ops/triton/
                    hstu_attention.py`), with its own block tables: the same-machine
                    baseline for a speed-up claim;
* impl=torch:       ops.hstu_attention.hstu_attention_reference (dense padded
                    PyTorch; skipped where its N x N buffers would not fit);
* impl=sdpa_causal: torch scaled_dot_product_attention, causal softmax, padded
                    dense (B, h, N, d), no bias: the speed of light of a fused
                    attention kernel on this GPU, not the same computation.
fwd_ms / fwd_bwd_ms time eager calls with CUDA events: where the GPU work is
small (N <= 1024, the MovieLens shapes) that is mostly Python, autograd and
launch overhead, for every implementation alike.
bf16 throughout. Shapes: B=8, h=2, d=128, N in {256, 1024, 4096, 8192}, all
sequences full length and ragged (lengths uniform in [1, N], fixed seed); the
ml-1m (B=128, N=211, h=1 d=50 / h=2 d=25) and ml-20m (h=4 d=64 / h=8 d=32)
shapes with ragged lengths up to 200. Timestamps are time-ordered (cumulative
log-normal gaps), as in real histories. One JSON line per measurement.

`--tune` instead times a list of block configurations on a few shapes, checks
each against the PyTorch formula, prints a breakdown of where the time goes and
writes the fastest per padded head dim (`--tune-out`, read back by `--configs`;
the tables in ops/triton/hstu_attention.py were filled from it).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from benchmarks.timing import time_and_peak, write_jsonl
from ops.hstu_attention import hstu_attention_reference
from ops.triton import hstu_attention as kernel_mod

DTYPE = torch.bfloat16


def make_batch(batch, max_len, heads, dqk, dv, ragged, seed=0, max_ragged=None, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    if ragged:
        lengths = torch.randint(1, (max_ragged or max_len) + 1, (batch,), generator=gen)
    else:
        lengths = torch.full((batch,), max_len)
    offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
    total = int(offsets[-1])
    scale = dqk ** -0.25

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device, DTYPE).requires_grad_()

    q, k, v = t(total, heads, dqk, s=scale), t(total, heads, dqk, s=scale), t(total, heads, dv)
    gaps = torch.exp(torch.randn(batch, max_len, generator=gen) * 2 + 6)
    ts = (torch.cumsum(gaps.long(), 1) + 1_000_000_000).to(device)
    ts_w = (torch.randn(129, generator=gen) * 0.02).to(device).requires_grad_()
    pos_w = (torch.randn(2 * max_len - 1, generator=gen) * 0.02).to(device).requires_grad_()
    grad = torch.randn(total, heads, dv, generator=gen).to(device, DTYPE)
    return dict(q=q, k=k, v=v, offsets=offsets.to(device), lengths=lengths, n=max_len, ts=ts,
                ts_w=ts_w, pos_w=pos_w, grad=grad)


def _bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


BEFORE_PATH = Path(__file__).resolve().parent.parent / ".carry" / "hstu_attention_before.py"


def load_kernel_file(path, name: str):
    """A kernel file (e.g. `git show REV:ops/triton/hstu_attention.py > f.py`) imported as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _before_module():
    """Another version of the kernel file at BEFORE_PATH, timed on the same machine as a baseline for a
    speed-up, or as a variant under study."""
    return load_kernel_file(BEFORE_PATH, "hstu_attention_before")


def time_impl(impl, b, fwd_config=None, bwd_config=None):
    """(fwd_ms, fwd_bwd_ms, peak_mem_gb) of one implementation on batch b."""
    q, k, v, offsets, n = b["q"], b["k"], b["v"], b["offsets"], b["n"]
    bias = (b["ts"], b["ts_w"], b["pos_w"])
    if impl == "triton_before":  # its own block tables: a baseline as it was
        before = _before_module()
        fn = lambda: before._hstu_attention(q, k, v, offsets, n, *bias)
        params = [q, k, v, b["ts_w"], b["pos_w"]]
    elif impl == "triton":
        fn = lambda: kernel_mod._hstu_attention(q, k, v, offsets, n, *bias, fwd_config=fwd_config,
                                                bwd_config=bwd_config)
        params = [q, k, v, b["ts_w"], b["pos_w"]]
    elif impl == "triton_nobias":
        fn = lambda: kernel_mod._hstu_attention(q, k, v, offsets, n, fwd_config=fwd_config,
                                                bwd_config=bwd_config)
        params = [q, k, v]
    elif impl == "torch":
        fn = lambda: hstu_attention_reference(q, k, v, offsets, n, *bias)
        params = [q, k, v, b["ts_w"], b["pos_w"]]
    elif impl == "sdpa_causal":
        batch, heads = len(b["lengths"]), q.shape[1]
        dense = [torch.randn(batch, heads, n, x.shape[2], device=q.device, dtype=DTYPE).requires_grad_()
                 for x in (q, k, v)]
        fn = lambda: F.scaled_dot_product_attention(*dense, is_causal=True)
        params = dense
    else:
        raise ValueError(impl)
    out = fn()
    grad = b["grad"] if impl != "sdpa_causal" else torch.randn_like(out)

    def fwd_bwd():
        torch.autograd.grad(fn(), params, grad)

    return time_and_peak(fn, fwd_bwd)


def dense_bytes(batch, heads, n):
    # the reference's largest live set: a handful of (B, h, n, n) fp32 buffers plus (B, n, n) int64
    return batch * heads * n * n * 4 * 8 + batch * n * n * 8 * 2


SHAPES = (
    [dict(name="scale", B=8, N=N, h=2, dqk=128, dv=128, ragged=r) for N in (256, 1024, 4096, 8192)
     for r in (False, True)]
    + [dict(name="ml-1m", B=128, N=211, h=h, dqk=d, dv=d, ragged=True, max_ragged=200)
       for h, d in ((1, 50), (2, 25))]
    + [dict(name="ml-20m", B=128, N=211, h=h, dqk=d, dv=d, ragged=True, max_ragged=200)
       for h, d in ((4, 64), (8, 32))]
)


IMPLS = ("triton", "triton_nobias", "triton_before", "torch", "sdpa_causal")


def run(out_path, configs_path=None, impls=IMPLS):
    configs = {}
    if configs_path:
        configs = {int(k): v for k, v in json.load(open(configs_path)).items()}
    props = torch.cuda.get_device_properties(0)
    common = dict(dtype="bf16", device=props.name, torch=torch.__version__, triton=triton.__version__)
    rows = []
    for shape in SHAPES:
        b = make_batch(shape["B"], shape["N"], shape["h"], shape["dqk"], shape["dv"], shape["ragged"],
                       max_ragged=shape.get("max_ragged"))
        block_d = kernel_mod._pow2_dim(max(shape["dqk"], shape["dv"]))
        cfg = configs.get(block_d, {})
        fwd_cfg = tuple(cfg["fwd"]) if "fwd" in cfg else kernel_mod._fwd_config(b["q"], block_d)
        bwd_cfg = tuple(cfg["bwd"]) if "bwd" in cfg else kernel_mod._bwd_config(b["q"], block_d)
        for impl in impls:
            if impl == "triton_before" and not BEFORE_PATH.exists():
                continue
            row = dict(impl=impl, config=shape["name"], N=shape["N"], B=shape["B"], heads=shape["h"],
                       dqk=shape["dqk"], dv=shape["dv"], ragged=shape["ragged"],
                       total_len=int(b["lengths"].sum()), **common)
            if impl in ("triton", "triton_nobias"):
                row.update(fwd_config=list(fwd_cfg), bwd_config=list(bwd_cfg))
            if impl == "triton_before":
                row.update(kernel_file=BEFORE_PATH.name)
            if impl == "triton_nobias" and shape["name"] != "scale":
                continue
            if impl == "torch" and dense_bytes(shape["B"], shape["h"], shape["N"]) > 40 * 2**30:
                row.update(fwd_ms=None, fwd_bwd_ms=None, peak_mem_gb=None, status="oom/skipped")
            else:
                try:
                    fwd, fwd_bwd, peak = time_impl(impl, b, fwd_cfg, bwd_cfg)
                    row.update(fwd_ms=round(fwd, 4), fwd_bwd_ms=round(fwd_bwd, 4),
                               peak_mem_gb=round(peak, 3), status="ok")
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row.update(fwd_ms=None, fwd_bwd_ms=None, peak_mem_gb=None, status="oom/skipped")
            print(json.dumps(row), flush=True)
            rows.append(row)
        del b
        torch.cuda.empty_cache()
    if out_path:
        write_jsonl(out_path, rows)


TUNE_FWD = [(64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)]
TUNE_BWD = [(64, 16, 16, 4, 2), (64, 32, 16, 4, 2), (64, 32, 32, 4, 2), (32, 16, 16, 4, 2),
            (64, 16, 16, 4, 3), (64, 64, 32, 8, 2), (128, 64, 64, 8, 2)]
BREAKDOWN_N = 4096
TUNE_SHAPES = [dict(B=8, N=4096, h=2, d=128, ragged=False), dict(B=128, N=211, h=4, d=64, ragged=True),
               dict(B=128, N=211, h=8, d=32, ragged=True)]


def _compile_one(args):
    """Worker: compile (by running once) one config on a tiny batch of the same specialisation."""
    shape, fwd_cfg, bwd_cfg = args
    b = make_batch(1, shape["N"], shape["h"], shape["d"], shape["d"], False)
    try:
        out = kernel_mod._hstu_attention(b["q"], b["k"], b["v"], b["offsets"], b["n"], b["ts"], b["ts_w"],
                                         b["pos_w"], fwd_config=fwd_cfg, bwd_config=bwd_cfg)
        if bwd_cfg is not None:
            torch.autograd.grad(out, [b["q"], b["k"], b["v"], b["ts_w"], b["pos_w"]], b["grad"])
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # report, keep tuning the others
        return f"{shape} {fwd_cfg} {bwd_cfg}: {type(exc).__name__}: {str(exc)[:300]}"


def _rel(a, b):
    return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)


def tune(workers, compile_only=False, out=None):
    """Times TUNE_FWD x TUNE_BWD on TUNE_SHAPES; checks each against the PyTorch formula."""
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs = [(s, f, None) for s in TUNE_SHAPES for f in TUNE_FWD] + \
           [(s, TUNE_FWD[0], c) for s in TUNE_SHAPES for c in TUNE_BWD]
    t0 = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for err in pool.map(_compile_one, jobs):
            if err:
                print("compile error:", err, flush=True)
    print(f"parallel compile of {len(jobs)} configs: {time.time() - t0:.1f} s", flush=True)
    if compile_only:
        return
    best = {}
    for s in TUNE_SHAPES:
        b = make_batch(s["B"], s["N"], s["h"], s["d"], s["d"], s["ragged"], max_ragged=200)
        params = [b["q"], b["k"], b["v"], b["ts_w"], b["pos_w"]]
        args = (b["q"], b["k"], b["v"], b["offsets"], b["n"], b["ts"], b["ts_w"], b["pos_w"])
        ref = hstu_attention_reference(*args)
        ref_g = torch.autograd.grad(ref, params, b["grad"])
        fwd_times, bwd_times = {}, {}
        for f in TUNE_FWD:
            try:
                err = _rel(kernel_mod._hstu_attention(*args, fwd_config=f), ref)
                fwd_times[f] = _bench(lambda: kernel_mod._hstu_attention(*args, fwd_config=f))
                print(f"tune fwd {s} {f}: {fwd_times[f]:.4f} ms (rel err vs torch {err:.1e})", flush=True)
            except Exception as exc:
                print(f"tune fwd {s} {f}: FAILED {type(exc).__name__} {str(exc)[:200]}", flush=True)
        f0 = min(fwd_times, key=fwd_times.get)
        for c in TUNE_BWD:
            try:
                out_ = kernel_mod._hstu_attention(*args, fwd_config=f0, bwd_config=c)
                err = max(_rel(x, y) for x, y in zip(torch.autograd.grad(out_, params, b["grad"]), ref_g))
                both = _bench(lambda: torch.autograd.grad(
                    kernel_mod._hstu_attention(*args, fwd_config=f0, bwd_config=c), params, b["grad"]))
                bwd_times[c] = both - fwd_times[f0]
                print(f"tune bwd {s} {c}: bwd {bwd_times[c]:.4f} ms (max rel err of 5 grads {err:.1e})",
                      flush=True)
            except Exception as exc:
                print(f"tune bwd {s} {c}: FAILED {type(exc).__name__} {str(exc)[:200]}", flush=True)
        block_d = kernel_mod._pow2_dim(s["d"])
        best[block_d] = dict(fwd=f0, bwd=min(bwd_times, key=bwd_times.get))
        print(f"best for block_d={block_d}: {best[block_d]}", flush=True)
        if s["N"] == BREAKDOWN_N:  # where the time goes, best configs
            for label, extra, ps in [
                ("bias, all grads", args[5:], params),
                ("bias, no weight grads", (b["ts"], b["ts_w"].detach(), b["pos_w"].detach()), params[:3]),
                ("bias, pos_w grad only", (b["ts"], b["ts_w"].detach(), b["pos_w"]), params[:3] + [b["pos_w"]]),
                ("bias, ts_w grad only", (b["ts"], b["ts_w"], b["pos_w"].detach()), params[:4]),
                ("no bias", (), params[:3]),
            ]:
                cfg = dict(fwd_config=best[block_d]["fwd"], bwd_config=best[block_d]["bwd"])
                fwd = _bench(lambda: kernel_mod._hstu_attention(*args[:5], *extra, **cfg))
                both = _bench(lambda: torch.autograd.grad(kernel_mod._hstu_attention(*args[:5], *extra, **cfg),
                                                          ps, b["grad"]))
                print(f"breakdown {label}: fwd {fwd:.4f} ms, fwd+bwd {both:.4f} ms", flush=True)
        torch.cuda.empty_cache()
    if out:
        with open(out, "w") as f:
            json.dump({str(k): v for k, v in best.items()}, f)


def markdown(path):
    """Markdown table of a results file: one row per shape, fwd / fwd+bwd ms per implementation."""
    rows = [json.loads(line) for line in open(path)]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    shapes = []
    for r in rows:
        key = (r["config"], r["B"], r["N"], r["heads"], r["dqk"], r["ragged"])
        if key not in shapes:
            shapes.append(key)
    cell = {}
    for r in rows:
        key = (r["config"], r["B"], r["N"], r["heads"], r["dqk"], r["ragged"])
        cell[key, r["impl"]] = (f"{r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f}" if r["status"] == "ok"
                                else r["status"])
    cols = impls
    print("| shape | B | N | h | d | lengths | " + " | ".join(cols) + " |")
    print("|" + " --- |" * (6 + len(cols)))
    for key in shapes:
        name, batch, n, heads, d, ragged = key
        lengths = "ragged" if ragged else "full"
        cells = [cell.get((key, impl), "-") for impl in cols]
        print(f"| {name} | {batch} | {n} | {heads} | {d} | {lengths} | " + " | ".join(cells) + " |")
    r0 = rows[0]
    print(f"\nms, forward / forward+backward, bf16, {r0['device']}, torch {r0['torch']}, triton {r0['triton']}.")


def main():
    global BEFORE_PATH, SHAPES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write JSON lines here")
    parser.add_argument("--tune", action="store_true", help="time block configurations instead")
    parser.add_argument("--workers", type=int, default=12, help="parallel compilations with --tune")
    parser.add_argument("--tune-compile-only", action="store_true", help="only fill the compile cache")
    parser.add_argument("--tune-out", default=None, help="with --tune: write the best configs (JSON) here")
    parser.add_argument("--configs", default=None,
                        help="JSON of block configs per padded head dim (from --tune-out); default: the "
                             "kernel's own table")
    parser.add_argument("--markdown", default=None, help="print a results file as a markdown table and exit")
    parser.add_argument("--before", default=None, help=f"kernel file for impl triton_before (default {BEFORE_PATH})")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated NAME:N to time, e.g. scale:4096,ml-20m:211 (default: all)")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help="comma-separated implementations to time (triton_before: the kernel file at "
                             f"{BEFORE_PATH.name} in .carry/, when present)")
    args = parser.parse_args()
    if args.markdown:
        return markdown(args.markdown)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.before:
        BEFORE_PATH = Path(args.before).resolve()
    if args.shapes:
        wanted = {tuple(x.split(":")) for x in args.shapes.split(",")}
        SHAPES = [s for s in SHAPES if (s["name"], str(s["N"])) in wanted]
    if args.tune or args.tune_compile_only:
        tune(args.workers, args.tune_compile_only, args.tune_out)
    else:
        run(args.out, args.configs, tuple(args.impls.split(",")))


if __name__ == "__main__":
    main()
