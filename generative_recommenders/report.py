"""Compares finished runs: a markdown table and a per-epoch curves PNG from results.json files.

    python3 -m generative_recommenders.report exps/ml-1m-l200/*/results.json --plot curves.png

Each row shows the best epoch (chosen as the run recorded: eval NDCG@10 in
"paper" mode, validation NDCG@10 in leave-one-out mode, where test metrics
are reported) and the last epoch, beside the paper's numbers (REFERENCE.md
section 9) when the data set and model are one of the table's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from absl import app, flags

COLUMNS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200")

# Release README, verified 2024-04-15: HR@10, NDCG@10, HR@50, NDCG@50, HR@200, NDCG@200.
PAPER = {
    ("ml-1m", "SASRec"): (0.2853, 0.1603, 0.5474, 0.2185, 0.7528, 0.2498),
    ("ml-1m", "HSTU"): (0.3097, 0.1720, 0.5754, 0.2307, 0.7716, 0.2606),
    ("ml-1m", "HSTU-large"): (0.3294, 0.1893, 0.5935, 0.2481, 0.7839, 0.2771),
    ("ml-20m", "SASRec"): (0.2889, 0.1621, 0.5503, 0.2199, 0.7661, 0.2527),
    ("ml-20m", "HSTU"): (0.3273, 0.1895, 0.5889, 0.2473, 0.7952, 0.2787),
    ("ml-20m", "HSTU-large"): (0.3556, 0.2098, 0.6143, 0.2671, 0.8074, 0.2965),
    ("amzn-books", "SASRec"): (0.0306, 0.0164, 0.0754, 0.0260, 0.1431, 0.0362),
    ("amzn-books", "HSTU"): (0.0416, 0.0227, 0.0957, 0.0344, 0.1735, 0.0461),
    ("amzn-books", "HSTU-large"): (0.0478, 0.0262, 0.1082, 0.0393, 0.1908, 0.0517),
}

flags.DEFINE_string("plot", None, "Write the HR@10 / NDCG@10 per-epoch curves to this PNG.")


def model_label(results: Dict) -> str:
    """SASRec, HSTU or HSTU-large (the release's row names), from the run name."""
    if results["main_module"] == "SASRec":
        return "SASRec"
    return "HSTU-large" if "large" in results["run_name"] else results["main_module"]


def reported_split(results: Dict) -> str:
    """The split whose metrics are reported: eval in paper mode, test in leave-one-out."""
    return "eval" if results["protocol"] == "paper" else "test"


def _cells(metrics: Dict[str, float]) -> List[str]:
    return [f"{metrics[c]:.4f}" for c in COLUMNS]


def table(runs: Sequence[Dict]) -> str:
    """Markdown table: best and last epoch of each run, and the paper's row."""
    header = ["data", "protocol", "model", "epoch", *(c.upper() for c in COLUMNS), "s from start", "device"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        split, label = reported_split(r), model_label(r)
        common = [r["dataset"], r["protocol"], label]
        best, last = r["best"], r["last"]
        lines.append("| " + " | ".join(common + [f"best {best['epoch'] + 1}", *_cells(best[split]), f"{r.get('process_seconds', r['wall_seconds']):.0f}", r["device"]]) + " |")
        lines.append("| " + " | ".join(common + [f"last {last['epoch'] + 1}", *_cells(last[split]), "", ""]) + " |")
        paper = PAPER.get((r["dataset"], label))
        if paper is not None:
            lines.append("| " + " | ".join(common + ["paper", *(f"{v:.4f}" for v in paper), "", ""]) + " |")
    return "\n".join(lines)


def plot_curves(runs: Sequence[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("hr@10", "ndcg@10")):
        for r in runs:
            split = reported_split(r)
            epochs = [e for e in r["per_epoch"] if e["full_eval"]]
            ax.plot([e["epoch"] + 1 for e in epochs], [e[split][metric] for e in epochs], label=model_label(r))
            paper = PAPER.get((r["dataset"], model_label(r)))
            if paper is not None:
                ax.axhline(paper[COLUMNS.index(metric)], ls="--", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric.upper()} ({split})")
        ax.grid(alpha=0.3)
        ax.legend()
    first = runs[0]
    fig.suptitle(f"{first['dataset']}, protocol {first['protocol']} (dashed: paper)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def load(paths: Sequence[str]) -> List[Dict]:
    runs = []
    for p in paths:
        runs.append(json.loads(Path(p).read_text()))
    order = {"SASRec": 0, "HSTU": 1, "HSTU-large": 2}
    return sorted(runs, key=lambda r: (r["dataset"], r["protocol"], order.get(model_label(r), 3)))


def main(argv: List[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more results.json files")
    runs = load(paths)
    print(table(runs))
    if flags.FLAGS.plot:
        plot_curves(runs, Path(flags.FLAGS.plot))
        print(f"wrote {flags.FLAGS.plot}")


if __name__ == "__main__":
    app.run(main)
