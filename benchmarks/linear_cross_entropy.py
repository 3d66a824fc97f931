"""Full-softmax cross-entropy at the training shapes: the fused kernel against the chunked PyTorch loss
and two libraries' fused linear cross-entropies.

    python3 benchmarks/linear_cross_entropy.py --out benchmarks/results/linear_cross_entropy_h200.jsonl
    python3 benchmarks/linear_cross_entropy.py --markdown benchmarks/results/linear_cross_entropy_h200.jsonl
    python3 benchmarks/linear_cross_entropy.py --blocks --shapes amzn-books --dtypes bf16 --out tune.jsonl

For L queries against C candidate item vectors of D dims (L2-normalised, as the trainer's), targets
uniform over the candidates with 5% padding rows (target -1), temperature 0.05, the loss is the mean
over the kept rows of lse - target logit. Times forward and forward+backward (gradients of the
queries and the item vectors; medians of triton.testing.do_bench, eager calls) and the peak extra
memory of one forward+backward (benchmarks/timing.py), of
* impl=pytorch:  ops.linear_cross_entropy.linear_cross_entropy_reference, the chunked loss
                 FullSoftmaxLoss used before the kernel (and still uses off CUDA): gradients
                 are computed in the forward, so its "fwd" already holds most of the work;
* impl=chunked_rows: the same chunked loss with its per-row step (log-sum-exp, loss, logit gradient)
                 in one kernel (ops/triton/softmax_rows.py): the CUDA path of linear_cross_entropy for
                 fp32 rows wider than FUSED_MAX_FP32_DIM (ml-20m);
* impl=fused:    ops.triton.linear_cross_entropy.triton_linear_cross_entropy and the mean over
                 the kept rows (the CUDA path of linear_cross_entropy), the kernel's default tiles;
* impl=normalize+fused / fused_l2: the item vectors L2-normalised in the timed call, as the trainer's
                 full softmax does every step (train_fn.item_l2_norm): F.normalize then the kernel
                 (what FullSoftmaxLoss did before), and the kernel's eps argument (it normalises the
                 raw rows once and returns their gradient from its dItems launch: no autograd
                 backward of F.normalize);
                 their errors compare with the chunked loss of F.normalize(items);
* impl=cce / cce_filtered: cut_cross_entropy.linear_cross_entropy of query / T (no temperature
                 argument), exact (filter_eps=None) and with its default gradient filtering, which
                 skips blocks whose softmax is below 2^-12 in bf16 (not our exact semantics);
                 bf16 only (its backward requires 16-bit queries);
* impl=liger:    liger_kernel's fused_linear_cross_entropy of query / T, fp32 gradient
                 accumulation, chunks of the same ~2^26 logits as impl=pytorch (its default
                 chunk of C x D elements would be a single row here); it also computes the
                 gradients in its forward.
The libraries are optional: an impl whose package does not import is recorded as "missing".
Shapes, from the frozen full-softmax configs (local_batch_size x max_sequence_length positions, an
upper bound: the MovieLens histories are shorter on average): amzn-books 128 x 50 = 6,400 x
695,762 candidates, D = 64; ml-20m 25,600 x 26,744, D = 256; ml-1m 25,600 x 3,706, D = 50; and
what a training step feeds the loss (amzn-books-step, ml-20m-step: the positions of a mean batch,
padded to its CUDA-graph token bucket).
fp32 (TF32 matmuls on, as the trainer sets them) and bf16 (queries and item vectors stored in
bf16). loss_rel_err and grad_*_rel_err (max |got - want| / max |want|) compare with the chunked
loss on the fp32 values of the same inputs with exact fp32 matmuls.

`--blocks` instead times tile configurations of each of the kernel's two launches alone
(the forward, which also accumulates dQ, and dItems; the other at its defaults), then the number
of candidate splits of the forward with the best tiles, checks each against the default tiles' results, and prints the
fastest as a `Blocks(...)` per shape and dtype (for ops/triton/linear_cross_entropy.default_blocks).
`--rows_blocks` times the per-row kernel of impl=chunked_rows alone on one chunk of each shape's logits
(CHUNK_ELEMENTS of them) for each column block and warp count.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from benchmarks.timing import time_and_peak, write_jsonl
from ops import linear_cross_entropy as chunked
from ops.linear_cross_entropy import linear_cross_entropy_reference
from ops.triton import linear_cross_entropy as kernel_module
from ops.triton.linear_cross_entropy import Blocks, Tiles, default_blocks, triton_linear_cross_entropy
from ops.triton.softmax_rows import triton_softmax_rows

SHAPES = [
    dict(name="amzn-books", rows=128 * 50, columns=695_762, dim=64),
    # What a Books training step feeds the loss: the jagged positions of 128 users, padded to the CUDA-graph
    # token bucket (1,952 = the larger of the two buckets benchmarks/train_throughput.py's batches reach).
    dict(name="amzn-books-step", rows=1_952, columns=695_762, dim=64),
    dict(name="ml-20m", rows=128 * 200, columns=26_744, dim=256),
    # An ml-20m step: 14,470 jagged positions on average (benchmarks/results/train_throughput_h100.jsonl),
    # padded to the CUDA-graph token bucket that holds them (16,080 of 128 x 201's sixteen buckets).
    dict(name="ml-20m-step", rows=16_080, columns=26_744, dim=256),
    dict(name="ml-1m", rows=128 * 200, columns=3_706, dim=50),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("pytorch", "chunked_rows", "fused", "normalize+fused", "fused_l2", "cce", "cce_filtered", "liger")
NORMALIZING = ("normalize+fused", "fused_l2")  # impls that L2-normalise the item vectors themselves
EPS = 1e-6  # the configs' train_fn.l2_norm_eps
TEMPERATURE = 0.05
IGNORED = 0.05
TILES = [Tiles(*t) for t in [(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3),
                             (64, 128, 8, 3), (64, 256, 8, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                             (128, 128, 8, 3), (128, 256, 8, 2)]]
SPLITS = [None, 1, 2, 4, 8, 16, 32]


def make_inputs(shape: Dict, dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows, columns, dim = shape["rows"], shape["columns"], shape["dim"]
    query = F.normalize(torch.randn(rows, dim, device="cuda", generator=gen), dim=-1)
    items = F.normalize(torch.randn(columns, dim, device="cuda", generator=gen), dim=-1)
    targets = torch.randint(0, columns, (rows,), device="cuda", generator=gen)
    targets[torch.rand(rows, device="cuda", generator=gen) < IGNORED] = -1
    return dict(query=query.to(dtype).requires_grad_(), items=items.to(dtype).requires_grad_(), targets=targets)


def _fused(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
           eps: Optional[float] = None) -> torch.Tensor:
    losses, _ = triton_linear_cross_entropy(query, items, targets, TEMPERATURE, eps=eps)
    kept = (targets >= 0).float()
    return (losses * kept).sum() / kept.sum().clamp(min=1.0)


def _cce(filter_eps: Optional[str]) -> Callable:
    from cut_cross_entropy import linear_cross_entropy as cce_loss

    def loss(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if query.dtype == torch.float32:
            raise TypeError("unsupported dtype: cut-cross-entropy's backward takes bf16/fp16 queries")
        return cce_loss(query / TEMPERATURE, items, targets.masked_fill(targets < 0, -100), filter_eps=filter_eps,
                        impl="cce")

    return loss


def _liger(query: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # Its chunk is L / cdiv(C, chunk_mem_const * D) rows: this constant gives ~CHUNK_ELEMENTS logits.
    chunk_mem_const = max(1, chunked.CHUNK_ELEMENTS // (query.shape[0] * query.shape[1]))
    return liger_fused_linear_cross_entropy(query / TEMPERATURE, items, targets.masked_fill(targets < 0, -100),
                                            accum_dtype=torch.float32, chunk_mem_const=chunk_mem_const)


def loss_fn(impl: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The scalar loss of one implementation; ImportError when its library is missing."""
    if impl == "pytorch":
        return lambda q, i, t: linear_cross_entropy_reference(q, i, t, TEMPERATURE)
    if impl == "chunked_rows":
        return lambda q, i, t: linear_cross_entropy_reference(q, i, t, TEMPERATURE, rows_step=triton_softmax_rows)
    if impl == "fused":
        return _fused
    if impl == "normalize+fused":
        return lambda q, i, t: _fused(q, F.normalize(i, dim=-1, eps=EPS), t)
    if impl == "fused_l2":
        return lambda q, i, t: _fused(q, i, t, EPS)
    if impl in ("cce", "cce_filtered"):
        return _cce(None if impl == "cce" else "high")
    if impl == "liger":
        import liger_kernel  # noqa: F401  (fails here, not inside the timing, when missing)

        return _liger
    raise ValueError(impl)


def reference(b: Dict, normalize: bool = False) -> Tuple[torch.Tensor, ...]:
    """Loss, grad_query and grad_items of the chunked loss on the inputs' fp32 values, exact fp32 matmuls
    (with normalize: of F.normalize(items), the gradient of the raw items)."""
    query = b["query"].detach().float().requires_grad_()
    items = b["items"].detach().float().requires_grad_()
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        scored = F.normalize(items, dim=-1, eps=EPS) if normalize else items
        loss = linear_cross_entropy_reference(query, scored, b["targets"], TEMPERATURE)
        return (loss.detach(), *torch.autograd.grad(loss, [query, items]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-12)).item(), 7)


def measure(impl: str, b: Dict, want: Tuple[torch.Tensor, ...]) -> Dict:
    """Timing, memory and error fields of one row; the status says why there are none."""
    empty = dict(fwd_ms=None, fwd_bwd_ms=None, peak_mem_gb=None, loss_rel_err=None, grad_query_rel_err=None,
                 grad_items_rel_err=None)
    try:
        fn = loss_fn(impl)
    except ImportError as exc:
        return dict(empty, status=f"missing ({exc})")
    query, items, targets = b["query"], b["items"], b["targets"]

    def fwd() -> torch.Tensor:
        return fn(query, items, targets)

    def fwd_bwd() -> Tuple[torch.Tensor, ...]:
        loss = fwd()
        return (loss, *torch.autograd.grad(loss, [query, items]))

    try:
        got = [x.detach() for x in fwd_bwd()]
        fwd_ms, fwd_bwd_ms, peak = time_and_peak(fwd, fwd_bwd)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(empty, status="oom")
    except Exception as exc:  # a library that refuses these inputs: record why, time the others
        return dict(empty, status=f"error ({type(exc).__name__}: {exc})"[:300])
    errors = [_rel_err(g, w) for g, w in zip(got, want)]
    return dict(fwd_ms=round(fwd_ms, 4), fwd_bwd_ms=round(fwd_bwd_ms, 4), peak_mem_gb=round(peak, 3),
                loss_rel_err=errors[0], grad_query_rel_err=errors[1], grad_items_rel_err=errors[2], status="ok")


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _common() -> Dict:
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton.__version__, cut_cross_entropy=_version("cut-cross-entropy"),
                liger_kernel=_version("liger-kernel"), temperature=TEMPERATURE)


def _selected(shape_names: Optional[str], dtype_names: Optional[str]) -> Tuple[List[Dict], Dict]:
    shapes = [s for s in SHAPES if shape_names is None or s["name"] in shape_names.split(",")]
    dtypes = {k: v for k, v in DTYPES.items() if dtype_names is None or k in dtype_names.split(",")}
    return shapes, dtypes


def _row(shape: Dict, dtype_name: str) -> Dict:
    return dict(config=shape["name"], L=shape["rows"], C=shape["columns"], D=shape["dim"], dtype=dtype_name,
                tf32=dtype_name == "fp32")


def run(shapes: List[Dict], dtypes: Dict, impls: List[str]) -> List[Dict]:
    common, rows = _common(), []
    for shape in shapes:
        for dtype_name, dtype in dtypes.items():
            b = make_inputs(shape, dtype)
            want = reference(b)
            want_l2 = reference(b, normalize=True) if any(impl in NORMALIZING for impl in impls) else None
            for impl in impls:
                row = dict(impl=impl, **_row(shape, dtype_name), **common)
                row.update(measure(impl, b, want_l2 if impl in NORMALIZING else want))
                print(json.dumps(row), flush=True)
                rows.append(row)
            del b, want, want_l2
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- #
# --blocks: tile sweep of the kernel's three launches
# --------------------------------------------------------------------------- #


def _launches(b: Dict, blocks: Blocks) -> Dict[str, Callable[[], torch.Tensor]]:
    """Each launch of the kernel alone (its host-side combine included), on the prepared inputs: the
    forward with the query gradient's accumulation (as training runs it), and dItems."""
    query, items, targets = b["query"].detach(), b["items"].detach(), b["targets"]
    scale = 1.0 / TEMPERATURE
    _, _, lse_raw, _ = kernel_module._forward(query, items, targets, scale, blocks)
    grad_rows = (targets >= 0).float() / (targets >= 0).sum().clamp(min=1)
    return dict(forward=lambda: kernel_module._forward(query, items, targets, scale, blocks, grad_query=True)[3],
                grad_items=lambda: kernel_module._grad_items(grad_rows, query, items, targets, lse_raw, scale, blocks))


def _time_launch(b: Dict, blocks: Blocks, launch: str, want: torch.Tensor) -> Tuple[Optional[float], str]:
    """(median ms, status) of one launch with these blocks, checked against the default blocks' result."""
    try:
        fn = _launches(b, blocks)[launch]
        err = _rel_err(fn(), want.float())
        ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
    except Exception as exc:  # e.g. triton's OutOfResources: too much shared memory for these tiles
        return None, f"error ({type(exc).__name__})"
    return round(ms, 4), "ok" if err <= 1e-2 else f"wrong (rel err {err})"


def tune(shapes: List[Dict], dtypes: Dict) -> List[Dict]:
    common, rows = _common(), []
    for shape in shapes:
        for dtype_name, dtype in dtypes.items():
            b = make_inputs(shape, dtype)
            default = default_blocks(b["query"].device, dtype, shape["dim"], shape["columns"])
            wants = {name: fn() for name, fn in _launches(b, default).items()}
            best = {}
            for launch in ("forward", "grad_items"):
                timed = []
                for tiles in TILES:
                    blocks = dataclasses.replace(default, **{launch: tiles})
                    ms, status = _time_launch(b, blocks, launch, wants[launch])
                    row = dict(kind="tiles", launch=launch, tiles=dataclasses.astuple(tiles), ms=ms, status=status,
                               **_row(shape, dtype_name), **common)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if status == "ok":
                        timed.append((ms, tiles))
                best[launch] = min(timed, key=lambda t: t[0])[1] if timed else getattr(default, launch)
            tuned = Blocks(best["forward"], best["grad_items"])
            split_times = []
            for splits in SPLITS:
                blocks = dataclasses.replace(tuned, splits=splits)
                ms, status = _time_launch(b, blocks, "forward", wants["forward"])
                row = dict(kind="splits", splits=splits, forward_ms=ms, status=status, **_row(shape, dtype_name),
                           **common)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if status == "ok":
                    split_times.append((ms, splits))
            tuned = dataclasses.replace(tuned, splits=min(split_times, key=lambda t: t[0])[1] if split_times else None)
            print(f"best {shape['name']} {dtype_name} D={shape['dim']}: {tuned}", flush=True)
            rows.append(dict(kind="best", blocks=repr(tuned), **_row(shape, dtype_name), **common))
            del b, wants
            torch.cuda.empty_cache()
    return rows


ROWS_BLOCKS = [(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8, 16)]


def tune_rows(shapes: List[Dict]) -> List[Dict]:
    """--rows_blocks: the per-row kernel alone (with the gradient) on one chunk of fp32 logits per shape."""
    common, rows = _common(), []
    for shape in shapes:
        columns = shape["columns"]
        chunk = min(shape["rows"], max(1, chunked.CHUNK_ELEMENTS // columns))
        gen = torch.Generator(device="cuda").manual_seed(0)
        logits = torch.randn(chunk, columns, device="cuda", generator=gen)
        targets = torch.randint(0, columns, (chunk,), device="cuda", generator=gen)
        scale = torch.full((chunk,), 1.0 / shape["rows"], device="cuda")
        buffer = logits.clone()
        for block, warps in ROWS_BLOCKS:
            def step() -> None:
                buffer.copy_(logits)
                triton_softmax_rows(buffer, targets, scale, 1.0 / TEMPERATURE, True, block, warps)
            try:
                copy_ms = do_bench(lambda: buffer.copy_(logits), warmup=10, rep=50, return_mode="median")
                ms, status = round(do_bench(step, warmup=10, rep=50, return_mode="median") - copy_ms, 4), "ok"
            except Exception as exc:  # e.g. a launch this GPU cannot take: recorded, the others still timed
                ms, status = None, f"error ({type(exc).__name__})"
            row = dict(kind="rows_blocks", block=block, num_warps=warps, chunk_rows=chunk, ms=ms, status=status,
                       chunk_gb=round(logits.numel() * 4 / 1e9, 3), **_row(shape, "fp32"), **common)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del logits, buffer
        torch.cuda.empty_cache()
    return rows


def markdown(path: str) -> None:
    """Markdown table of a results file: one row per shape and dtype, fwd / fwd+bwd ms (peak GB) per impl."""
    rows = [r for r in map(json.loads, open(path)) if "impl" in r]
    keys = list(dict.fromkeys((r["config"], r["L"], r["C"], r["D"], r["dtype"]) for r in rows))
    cell = {}
    for r in rows:
        key = (r["config"], r["L"], r["C"], r["D"], r["dtype"])
        cell[key, r["impl"]] = (f"{r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f} ({r['peak_mem_gb']:.2f} GB)"
                                if r["status"] == "ok" else r["status"].split(" (")[0])
    print("| config | L | C | D | dtype | " + " | ".join(IMPLS) + " |")
    print("|" + " --- |" * (5 + len(IMPLS)))
    for key in keys:
        cells = [str(k) for k in key] + [cell.get((key, impl), "-") for impl in IMPLS]
        print("| " + " | ".join(cells) + " |")
    r0 = rows[0]
    print(f"\nms, forward / forward+backward (peak extra memory of one forward+backward), temperature "
          f"{r0['temperature']}, fp32 with TF32 matmuls; {r0['device']}, torch {r0['torch']}, triton {r0['triton']}, "
          f"cut-cross-entropy {r0['cut_cross_entropy']}, liger-kernel {r0['liger_kernel']}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write JSON lines here")
    parser.add_argument("--blocks", action="store_true", help="sweep the kernel's tiles and splits instead")
    parser.add_argument("--rows_blocks", action="store_true", help="sweep the per-row kernel's blocks instead")
    parser.add_argument("--shapes", default=None, help="comma-separated config names (default: all)")
    parser.add_argument("--dtypes", default=None, help="comma-separated fp32,bf16 (default: both)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated implementations")
    parser.add_argument("--markdown", default=None, help="print a results file as a markdown table and exit")
    args = parser.parse_args()
    if args.markdown:
        return markdown(args.markdown)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer (train_fn.enable_tf32 defaults to True)
    shapes, dtypes = _selected(args.shapes, args.dtypes)
    if args.rows_blocks:
        rows = tune_rows(shapes)
    else:
        rows = tune(shapes, dtypes) if args.blocks else run(shapes, dtypes, args.impls.split(","))
    if args.out:
        write_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
