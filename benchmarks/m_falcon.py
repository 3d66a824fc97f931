"""M-FALCON candidate scoring throughput (issue 12): candidates scored per second.

    python3 benchmarks/m_falcon.py --out benchmarks/results/m_falcon_h100.jsonl
    python3 benchmarks/m_falcon.py --quick          # CPU, tiny sizes: checks that it runs

For one user (`--users`), a history of n interleaved tokens (n / 2 items and
their actions) and m candidates, an HSTU ranking model (D=256, 3 layers,
4 heads of 64, bf16 on the GPU: about the paper's ranking setting) scores
every candidate by each of:

* m_falcon_cached: inference/m_falcon.py with the history's per-layer keys
  and values computed once; ceil(m / b_m) microbatches of b_m candidates,
  each O(b_m n) attention per layer.
* m_falcon: the same microbatches as full passes over [history, b_m
  candidates] under the M-FALCON mask (the fused Triton kernel's
  `num_targets` on the GPU), O((n + b_m)^2) each.
* per_candidate: one sequence [history, candidate] per candidate, batched
  `--per-candidate-batch` sequences per forward pass; only the first
  `--per-candidate-cap` candidates are timed (the cost is linear in m).
* appended: one pass over [history, all m candidates] under the plain causal
  mask (candidates see each other, so the scores are not the per-candidate
  ones): the speed of skipping the mask trick.

Times are the median of `--reps` runs after a warm-up, GPU-synchronised. Each
JSON line records the device, torch and Triton versions, the shape, the
largest |liked logit - per_candidate's| over the timed candidates (M-FALCON
must score exactly as one pass per candidate), and the speed-up over
per_candidate. Target: m_falcon(_cached) >= 20x per_candidate at m=1024, n=1000.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import gin  # noqa: E402
import torch  # noqa: E402

from generative_recommenders.data.ranking import RankingBatch  # noqa: E402
from generative_recommenders.inference.m_falcon import MFalconScorer, append_candidates  # noqa: E402
from generative_recommenders.modeling.ranking_model import RankingModel  # noqa: E402

NUM_ITEMS = 100_000


def _versions() -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def build_model(args, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> RankingModel:
    gin.clear_config()
    gin.parse_config([f"hstu_encoder.num_blocks = {args.layers}", f"hstu_encoder.num_heads = {args.heads}",
                      f"hstu_encoder.dqk = {args.head_dim}", f"hstu_encoder.dv = {args.head_dim}"])
    torch.manual_seed(0)
    model = RankingModel("HSTU", NUM_ITEMS, max_seq_len, args.dim, dropout_rate=0.0)
    gin.clear_config()
    return model.to(device=device, dtype=dtype).eval()


def history_batch(users: int, tokens: int, device: torch.device, seed: int) -> RankingBatch:
    """`users` histories of `tokens` interleaved tokens (item, action, ...), time-ordered."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(tokens)
    items = torch.randint(1, NUM_ITEMS + 1, (users, tokens), generator=gen)
    actions = torch.randint(1, 6, (users, tokens), generator=gen)
    gaps = torch.exp(torch.randn(users, tokens // 2, generator=gen) * 2 + 8).long()
    stamps = (torch.cumsum(gaps, 1) + 1_000_000_000).repeat_interleave(2, dim=1)
    on = dict(device=device)
    return RankingBatch(
        item_ids=torch.where(pos % 2 == 0, items, 0).to(**on),
        action_ids=torch.where(pos % 2 == 1, actions, 0).to(**on),
        timestamps=stamps.to(**on), lengths=torch.full((users,), tokens, **on), num_targets=None,
        ratings=torch.zeros(users, tokens, **on), next_item=torch.zeros(users, tokens, dtype=torch.long, **on),
        total=users * tokens)


def repeat_history(history: RankingBatch, times: int) -> RankingBatch:
    """Each history `times` times in a row (one sequence per candidate)."""
    rep = lambda t: t.repeat_interleave(times, dim=0)  # noqa: E731
    return RankingBatch(rep(history.item_ids), rep(history.action_ids), rep(history.timestamps), rep(history.lengths),
                        None, rep(history.ratings), rep(history.next_item), history.total * times)


def per_candidate_logits(model: RankingModel, history: RankingBatch, item_ids: torch.Tensor,
                         timestamps: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, c) liked logits, every candidate in its own sequence, `batch` sequences per pass."""
    users, count = item_ids.shape
    out = []
    for start in range(0, count, batch):
        chunk = min(batch, count - start)
        sequences = append_candidates(repeat_history(history, chunk), item_ids[:, start:start + chunk].reshape(-1, 1),
                                      timestamps[:, start:start + chunk].reshape(-1, 1))
        flat, offsets = model(sequences)
        out.append(model.heads(flat[offsets[1:] - 1])["liked"].view(users, chunk))
    return torch.cat(out, dim=1)


def appended_logits(model: RankingModel, history: RankingBatch, item_ids: torch.Tensor,
                    timestamps: torch.Tensor) -> torch.Tensor:
    """(B, m) liked logits of one causal pass over [history, all candidates] (no M-FALCON mask)."""
    sequences = dataclasses.replace(append_candidates(history, item_ids, timestamps), num_targets=None)
    flat, offsets = model(sequences)
    positions = offsets[:-1, None] + history.lengths[:, None] + torch.arange(item_ids.shape[1], device=flat.device)
    return model.heads(flat[positions])["liked"]


def timed(fn: Callable[[], torch.Tensor], reps: int, device: torch.device):
    """(median seconds, last result) after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = fn()
    sync()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


@torch.no_grad()
def run_shape(model: RankingModel, args, n: int, m: int, device: torch.device) -> List[Dict]:
    history = history_batch(args.users, n, device, seed=n)
    gen = torch.Generator().manual_seed(m)
    item_ids = torch.randint(1, NUM_ITEMS + 1, (args.users, m), generator=gen).to(device)
    timestamps = (history.timestamps[:, -1:] + torch.randint(1, 10**5, (args.users, m), generator=gen).to(device))
    capped = min(m, args.per_candidate_cap)
    seconds, reference = timed(lambda: per_candidate_logits(model, history, item_ids[:, :capped],
                                                            timestamps[:, :capped], args.per_candidate_batch),
                               args.reps, device)
    rows = [dict(method="per_candidate", b_m=1, timed_candidates=capped, seconds=seconds, max_abs_diff=0.0)]
    for b_m in args.microbatch:
        for method, cache in (("m_falcon_cached", True), ("m_falcon", False)):
            scorer = MFalconScorer(model, b_m, use_cache=cache)
            seconds, scores = timed(lambda: scorer(history, item_ids, timestamps)["liked"], args.reps, device)
            diff = (scores[:, :capped].float() - reference.float()).abs().max().item()
            rows.append(dict(method=method, b_m=b_m, timed_candidates=m, seconds=seconds, max_abs_diff=diff))
    seconds, _ = timed(lambda: appended_logits(model, history, item_ids, timestamps), args.reps, device)
    rows.append(dict(method="appended", b_m=m, timed_candidates=m, seconds=seconds, max_abs_diff=None))
    base_rate = capped * args.users / rows[0]["seconds"]
    for row in rows:
        row["candidates_per_s"] = row["timed_candidates"] * args.users / row["seconds"]
        row["speedup_vs_per_candidate"] = row["candidates_per_s"] / base_rate
        row.update(n=n, m=m, ms=1000 * row.pop("seconds"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSONL file to append results to")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (checks the script runs)")
    parser.add_argument("--candidates", default="64,256,1024,4096")
    parser.add_argument("--history", default="200,1000,4000", help="history lengths in tokens (items + actions)")
    parser.add_argument("--microbatch", default="64,256,1024", help="b_m values, comma-separated")
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--per-candidate-batch", type=int, default=64)
    parser.add_argument("--per-candidate-cap", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    if args.quick:
        args.candidates, args.history, args.microbatch = "4,16", "8,32", "4"
        args.per_candidate_batch, args.per_candidate_cap, args.reps = 4, 8, 2
        args.dim, args.layers, args.heads, args.head_dim = 16, 2, 2, 8
    candidates = [int(x) for x in args.candidates.split(",")]
    histories = [int(x) for x in args.history.split(",")]
    args.microbatch = [int(x) for x in args.microbatch.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Room for the longest appended pass; positions and the 1/N scale are the same for every method.
    model = build_model(args, max(histories) + max(candidates), device, dtype)
    meta = dict(device=_device_name(device), **_versions(), dtype=str(dtype).replace("torch.", ""), users=args.users,
                dim=args.dim, layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                kernel="triton" if model.encoder.uses_triton(device) else "torch",
                per_candidate_batch=args.per_candidate_batch)
    out = open(args.out, "a") if args.out else None
    print(f"{'n':>5} {'m':>5} {'method':>16} {'b_m':>5} {'ms':>9} {'cand/s':>11} {'x per_cand':>10} {'max|diff|':>9}")
    for n in histories:
        for m in candidates:
            for row in run_shape(model, args, n, m, device):
                row = {**row, **meta}
                diff = "" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
                print(f"{n:>5} {m:>5} {row['method']:>16} {row['b_m']:>5} {row['ms']:>9.2f} "
                      f"{row['candidates_per_s']:>11.0f} {row['speedup_vs_per_candidate']:>10.1f} {diff:>9}",
                      flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    if out:
        out.close()


if __name__ == "__main__":
    main()
