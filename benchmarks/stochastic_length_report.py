"""The Stochastic Length sweep's table and plot (README "Stochastic Length") from its results.json files.

    python3 benchmarks/stochastic_length_report.py results/stochastic_length \
        --plot results/stochastic_length/quality_vs_cost.png

Reads `<dir>/<data set>/*.json` (one run each, as benchmarks/stochastic_length_runs.sh writes
them) and prints one markdown table per data set: alpha, N^(alpha/2), history positions trained
per epoch (mean over epochs, and as a share of the run without SL), the median step time over
epochs 2.. (the first compiles kernels and captures CUDA graphs), training seconds, the run's
wall seconds (process start to results.json), and the best epoch's HR@10 / NDCG@10 (selected
by eval NDCG@10). The plot puts the best NDCG@10 against the training seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

from generative_recommenders.data.samples import stochastic_length_cap


def _max_length(run: Dict) -> int:
    for line in run["config"].splitlines():
        if line.startswith("train_fn.max_sequence_length = "):
            return int(line.split(" = ")[1])
    raise ValueError(f"{run['run_name']}: no train_fn.max_sequence_length in its config")


def summarize(run: Dict) -> Dict:
    """One table row of a results.json."""
    epochs = run["per_epoch"]
    later = epochs[1:] or epochs
    alpha = run.get("stochastic_length_alpha")
    best = run["best"].get("eval", {})
    return {
        "alpha": alpha,
        "cap": None if alpha is None else stochastic_length_cap(_max_length(run), alpha),
        "epochs": len(epochs),
        "tokens": statistics.mean(e["train_tokens"] for e in epochs),
        "step_ms": 1000 * statistics.median(e["train_seconds"] / e["train_steps"] for e in later),
        "epoch_train_s": statistics.median(e["train_seconds"] for e in later),
        "train_s": run["train_seconds"],
        "wall_s": run["process_seconds"],
        "best_epoch": run["best"].get("epoch"),
        "hr@10": best.get("hr@10"),
        "ndcg@10": best.get("ndcg@10"),
        "device": run["device"],
    }


def load_rows(directory: Path) -> Dict[str, List[Dict]]:
    """Data set directory name -> its runs' rows, SL off first, then by alpha."""
    tables = {}
    for dataset in sorted(p for p in directory.iterdir() if p.is_dir()):
        rows = [summarize(json.loads(f.read_text())) for f in sorted(dataset.glob("*.json"))]
        if rows:
            tables[dataset.name] = sorted(rows, key=lambda r: -1.0 if r["alpha"] is None else r["alpha"])
    return tables


def _cell(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(name: str, rows: List[Dict]) -> str:
    off = next((r for r in rows if r["alpha"] is None), None)
    lines = [f"{name} ({rows[0]['device']}):", "",
             "| alpha | N^(alpha/2) | epochs | tokens / epoch | of SL off | step ms | train s / epoch | train s "
             "| wall s | best epoch | HR@10 | NDCG@10 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "" if off is None else f"{r['tokens'] / off['tokens']:.0%}"
        lines.append(
            f"| {'off' if r['alpha'] is None else r['alpha']} | {r['cap'] or ''} | {r['epochs']} | "
            f"{r['tokens']:,.0f} | {share} | {r['step_ms']:.1f} | {r['epoch_train_s']:.3f} | {r['train_s']:.1f} | "
            f"{r['wall_s']:.1f} | {'' if r['best_epoch'] is None else r['best_epoch'] + 1} | "
            f"{_cell(r['hr@10'], 4)} | {_cell(r['ndcg@10'], 4)} |")
    return "\n".join(lines)


def plot(tables: Dict[str, List[Dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items()):
        xs, ys = [r["epoch_train_s"] for r in rows], [r["ndcg@10"] for r in rows]
        ax.plot(xs, ys, "o")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate("off" if r["alpha"] is None else f"{r['alpha']}", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set(title=name, xlabel="training seconds per epoch (median, epochs 2..)", ylabel="best NDCG@10")
        ax.grid(alpha=0.3)
    fig.suptitle("Stochastic Length: quality against training cost (labels: alpha)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="PNG to write (needs matplotlib)")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"{args.directory} is not a directory of <data set>/*.json results", file=sys.stderr)
        return 1
    tables = load_rows(args.directory)
    if not tables:
        print(f"no <data set>/*.json results under {args.directory}", file=sys.stderr)
        return 1
    print("\n\n".join(markdown(name, rows) for name, rows in tables.items()))
    if args.plot:
        try:
            plot(tables, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot written", file=sys.stderr)
            return 1
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
