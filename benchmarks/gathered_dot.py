"""Scoring sampled negatives: the gathered-dot kernel against the two PyTorch paths it replaces.

    python3 benchmarks/gathered_dot.py --out benchmarks/results/gathered_dot_h100.jsonl

For L queries, R negatives per query drawn uniformly from P items and an
L2-normalised embedding table (as losses.negative_logits computes them), times
forward and forward+backward (gradients of the queries and the embedding
weight; median of triton.testing.do_bench, eager calls) of
* impl=kernel:   normalise the whole table once, then
                 ops.triton.gathered_dot.triton_gathered_dot of the sampled columns
                 (the path negative_logits takes on CUDA when L * R >= P);
* impl=kernel_norm: triton_gathered_dot of the raw embedding rows (row
                 offset 1), each normalised inside the kernel (the path
                 negative_logits takes when the candidates are consecutive ids,
                 as in every data set here: no normalised table exists);
* impl=per_id:   embedding gather of the (L, R) sampled ids, normalise the
                 (L, R, D) rows, einsum with the queries (the large-pool path);
* impl=dense:    normalise the whole table, (L, P) scores by one matmul, gather
                 the sampled columns (the small-pool path; skipped where its
                 (L, P) scores and their gradient would not fit).
Shapes: Amazon Books (P=695,762, D=64, L=6,400, R=512) and ml-20m (P=26,744,
D=256, L=18,000, R=128). fp32 (TF32 matmuls on, as the trainer sets them) and
bf16 (table and queries stored in bf16; the kernel still accumulates in fp32).
One JSON line per measurement, with the device and versions; max_rel_err is
the largest |logit - per_id logit| over the largest |per_id logit| (about 1e-3
in fp32 rows: per_id's einsum and the dense matmul round inputs to TF32, the
kernel does not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch
import torch.nn.functional as F
import triton

from benchmarks.timing import time_and_peak, write_jsonl
from ops.triton.gathered_dot import triton_gathered_dot

SHAPES = [
    dict(name="amzn-books", items=695_762, dim=64, rows=6_400, negatives=512),
    dict(name="ml-20m", items=26_744, dim=256, rows=18_000, negatives=128),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("per_id", "kernel", "kernel_norm", "dense")  # per_id first: the others' logits are compared with its
DENSE_LIMIT_BYTES = 40 * 2**30  # the (L, P) scores and their gradient


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


def make_inputs(shape: Dict, dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Embedding (id 0 = padding, candidates 1..P), queries, sampled columns and an upstream gradient."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    items, dim, rows = shape["items"], shape["dim"], shape["rows"]
    embedding = torch.nn.Embedding(items + 1, dim).to("cuda", dtype)
    query = _normalize(torch.randn(rows, dim, device="cuda", generator=gen)).to(dtype).requires_grad_()
    pool = torch.arange(1, items + 1, device="cuda")
    columns = torch.randint(0, items, (rows, shape["negatives"]), device="cuda", generator=gen)
    grad = torch.randn(rows, shape["negatives"], device="cuda", generator=gen)
    return dict(embedding=embedding, query=query, pool=pool, columns=columns, grad=grad)


def scorer(impl: str, b: Dict) -> Callable[[], torch.Tensor]:
    """The (L, R) negative logits of one implementation, from the embedding weight on."""
    embedding, query, pool, columns = b["embedding"], b["query"], b["pool"], b["columns"]
    if impl == "kernel":
        return lambda: triton_gathered_dot(query, _normalize(embedding(pool)), columns)
    if impl == "kernel_norm":
        return lambda: triton_gathered_dot(query, embedding.weight, columns, 1, 1e-6)
    if impl == "per_id":
        return lambda: torch.einsum("ld,lrd->lr", query, _normalize(embedding(pool[columns])))
    if impl == "dense":
        return lambda: (query @ _normalize(embedding(pool)).T).gather(1, columns)
    raise ValueError(impl)


def time_impl(impl: str, b: Dict) -> Tuple[float, float, float, torch.Tensor]:
    """(fwd_ms, fwd_bwd_ms, peak_mem_gb, logits) of one implementation."""
    fn = scorer(impl, b)
    params = [b["query"], b["embedding"].weight]

    def fwd_bwd() -> None:
        out = fn()
        torch.autograd.grad(out, params, b["grad"].to(out.dtype))

    logits = fn().detach().float()
    return (*time_and_peak(fn, fwd_bwd), logits)


def measure(impl: str, b: Dict, shape: Dict, dtype: torch.dtype, reference: Optional[torch.Tensor]) -> Dict:
    """The timing fields of one row (and the logits, for the per_id reference); skipped where it cannot fit."""
    skipped = dict(fwd_ms=None, fwd_bwd_ms=None, peak_mem_gb=None, max_rel_err=None, status="oom/skipped")
    if impl == "dense" and 2 * shape["rows"] * shape["items"] * dtype.itemsize > DENSE_LIMIT_BYTES:
        return skipped
    try:
        fwd, fwd_bwd, peak, logits = time_impl(impl, b)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return skipped
    err = None
    if reference is not None:
        err = round(((logits - reference).abs().max() / reference.abs().max().clamp(min=1e-12)).item(), 6)
    return dict(fwd_ms=round(fwd, 4), fwd_bwd_ms=round(fwd_bwd, 4), peak_mem_gb=round(peak, 3),
                max_rel_err=err, status="ok", logits=logits)


def run(out_path: Optional[str]) -> None:
    common = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                  triton=triton.__version__)
    torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer (train_fn.enable_tf32 defaults to True)
    rows: List[Dict] = []
    for shape in SHAPES:
        for dtype_name, dtype in DTYPES.items():
            b = make_inputs(shape, dtype)
            reference: Optional[torch.Tensor] = None
            for impl in IMPLS:
                row = dict(impl=impl, config=shape["name"], P=shape["items"], D=shape["dim"], L=shape["rows"],
                           R=shape["negatives"], dtype=dtype_name, tf32=dtype == torch.float32, **common)
                row.update(measure(impl, b, shape, dtype, reference))
                if impl == "per_id":
                    reference = row.pop("logits", None)
                row.pop("logits", None)
                print(json.dumps(row), flush=True)
                rows.append(row)
            del b, reference
            torch.cuda.empty_cache()
    if out_path:
        write_jsonl(out_path, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write JSON lines here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    run(args.out)


if __name__ == "__main__":
    main()
