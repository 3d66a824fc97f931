"""Compares finished runs: markdown tables and per-epoch curves from results.json files.

    python3 -m generative_recommenders.report exps/ml-1m-l200/*/results.json --plot curves.png

Runs are grouped by data set and protocol, one table each. Every run shows
its best epoch (chosen as the run recorded: eval NDCG@10 in "paper" mode,
validation in leave-one-out and session mode, where test metrics are
reported) and its last epoch, beside the published numbers where there are
some: the release's table (REFERENCE.md section 9) for its sampled-softmax
rows, and the full-softmax paper its BERT4Rec / GRU4Rec rows come from
(section 12). Runs of one table that share model and loss (other settings:
their run names carry a hash of them) are told apart by their run name.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app, flags

from generative_recommenders.files import atomic_write, check_writable_dir, os_error_line

COLUMNS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200")
SESSION_COLUMNS = ("hr@20", "mrr@20", "hr@10", "ndcg@10")
RANKING_COLUMNS = ("auc", "ne", "rmse", "accuracy", "ndcg@10")
SESSION_LABELS = {"hr@20": "recall@20"}

# Release README, verified 2024-04-15 (sampled softmax, 128 / 512 negatives): HR@10 NDCG@10 HR@50 NDCG@50 HR@200 NDCG@200.
RELEASE = {
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
# Klenitskiy & Vasilev (RecSys'23), full softmax, leave-one-out (REFERENCE.md section 12): HR@10, NDCG@10.
# The release's table quotes their BERT4Rec and GRU4Rec rows.
FULL_SOFTMAX_PAPER = {
    ("ml-1m", "BERT4Rec"): (0.2843, 0.1537),
    ("ml-1m", "GRU4Rec"): (0.2811, 0.1648),
    ("ml-1m", "SASRec"): (0.3152, 0.1821),
    ("ml-20m", "BERT4Rec"): (0.2816, 0.1703),
    ("ml-20m", "GRU4Rec"): (0.2813, 0.1730),
    ("ml-20m", "SASRec"): (0.2983, 0.1833),
}
MODEL_ORDER = {"SASRec": 0, "HSTU": 1, "HSTU-large": 2, "FuXi": 3, "GRU4Rec": 4, "BERT4Rec": 5}
LOSS_LABELS = {"SampledSoftmaxLoss": "sampled softmax", "FullSoftmaxLoss": "full softmax", "BCELoss": "BCE",
               "BPRLoss": "BPR", "BPRMaxLoss": "BPR-max"}

flags.DEFINE_string("plot", None, "Write the per-epoch curves of each table's first two columns to this PNG.")


def model_label(results: Dict) -> str:
    """The release's row names (SASRec, HSTU, HSTU-large) or the encoder's name."""
    module = results["main_module"]
    return "HSTU-large" if module == "HSTU" and "large" in results["run_name"] else module


def loss_label(results: Dict) -> str:
    if task_of(results) == "ranking":
        weights = [f"{term} x{_config_value(results, f'ranking_objective.{term}_weight') or '?'}"
                   for term in ("liked", "rating", "next_item")]
        return ", ".join(w for w in weights if not w.endswith(" x0.0"))
    loss = results.get("loss_module", "SampledSoftmaxLoss")  # runs before the loss was recorded were sampled
    label = LOSS_LABELS.get(loss, loss)
    if loss in ("SampledSoftmaxLoss", "BPRLoss", "BPRMaxLoss"):
        negatives = _config_value(results, "train_fn.num_negatives")
        label += f" n{negatives}" if negatives else ""
    return label


def config_lines(results: Dict) -> List[str]:
    """The run's gin bindings, one per line (gin wraps long values onto continuation lines)."""
    return re.sub(r"\\\n\s*", "", results.get("config", "")).splitlines()


def _config_value(results: Dict, key: str) -> Optional[str]:
    for line in config_lines(results):
        if line.startswith(key + " ="):
            return line.split("=", 1)[1].strip()
    return None


def row_labels(runs: Sequence[Dict]) -> List[str]:
    """Model labels, with the run name where runs of one table share model and loss (e.g. other settings)."""
    keys = [_row_key(r) for r in runs]
    return [f"{model} ({r['run_name']})" if keys.count((model, loss)) > 1 else model
            for r, (model, loss) in zip(runs, keys)]


def reported_split(results: Dict) -> str:
    """The split whose metrics are reported: eval in retrieval's paper mode, test otherwise."""
    return "eval" if results["protocol"] == "paper" and task_of(results) == "retrieval" else "test"


def task_of(results: Dict) -> str:
    return results.get("task", "retrieval")


def columns_of(results: Dict) -> Tuple[str, ...]:
    if task_of(results) == "ranking":
        return RANKING_COLUMNS
    return SESSION_COLUMNS if results["protocol"] == "sessions" else COLUMNS


def published(results: Dict) -> List[Tuple[str, Tuple[float, ...]]]:
    """(source, values in COLUMNS order, possibly fewer) of the published numbers for this run's row."""
    key = (results["dataset"], model_label(results))
    loss = results.get("loss_module", "SampledSoftmaxLoss")
    rows = []
    if task_of(results) != "retrieval":
        return rows
    if loss == "SampledSoftmaxLoss" and key in RELEASE and results["protocol"] == "paper":
        rows.append(("release", RELEASE[key]))
    if key in FULL_SOFTMAX_PAPER and (loss == "FullSoftmaxLoss" or key[1] != "SASRec"):
        rows.append(("K&V'23 (full CE, LOO)", FULL_SOFTMAX_PAPER[key]))
    return rows


def _cells(metrics: Dict[str, Optional[float]], columns: Sequence[str]) -> List[str]:
    # null: a metric undefined on the data (results.json writes NaN so); older files may hold NaN itself.
    return [f"{metrics[c]:.4f}" if c in metrics and metrics[c] is not None and math.isfinite(metrics[c]) else ""
            for c in columns]


def seconds_cell(results: Dict) -> str:
    """Process seconds summed over every process that trained the run, and how many there were when > 1."""
    seconds = f"{results.get('process_seconds', results['wall_seconds']):.0f}"
    sessions = results.get("sessions", 1)
    return seconds if sessions <= 1 else f"{seconds} ({sessions} sessions)"


def table(runs: Sequence[Dict]) -> str:
    """Markdown table of runs sharing a data set and protocol: best and last epoch, and published rows."""
    columns = columns_of(runs[0])
    header = ["model", "loss", "epoch", *(SESSION_LABELS.get(c, c).upper() for c in columns), "s", "device"]
    title = "ranking" if task_of(runs[0]) == "ranking" else f"protocol {runs[0]['protocol']}"
    lines = [f"{runs[0]['dataset']}, {title} ({reported_split(runs[0])} split)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in zip(row_labels(runs), runs):
        split, common = reported_split(r), [label, loss_label(r)]
        for which, extra in (("best", [seconds_cell(r), r["device"]]), ("last", ["", ""])):
            record = r[which]
            if "epoch" not in record:  # no (full) evaluation finished yet
                continue
            lines.append("| " + " | ".join(common + [f"{which} {record['epoch'] + 1}", *_cells(record[split], columns),
                                                     *extra]) + " |")
        for source, values in published(r):
            cells = [f"{v:.4f}" for v in values] + [""] * (len(columns) - len(values))
            lines.append("| " + " | ".join(common + [source, *cells, "", ""]) + " |")
    # The baselines, fit on the same training interactions: ranking's non-sequential ones, and on sessions
    # most-popular, SR, AR and V-SKNN (the strong non-neural rows of that field).
    if task_of(runs[0]) == "ranking" or runs[0]["protocol"] == "sessions":
        for name, metrics in runs[0].get("baselines", {}).get(reported_split(runs[0]), {}).items():
            lines.append("| " + " | ".join([f"{name} baseline", "", "", *_cells(metrics, columns), "", ""]) + " |")
    return "\n".join(lines)


def _row_key(results: Dict) -> Tuple[str, str]:
    return model_label(results), loss_label(results)


def _config_but_seed(results: Dict) -> str:
    return "\n".join(l for l in config_lines(results)
                     if not l.startswith(("train_fn.random_seed", "train_fn.run_name", "train_fn.exp_root",
                                          "train_fn.ckpt_root", "train_fn.resume")))


def seed_spread(group: Sequence[Dict]) -> str:
    """Mean and standard deviation over runs whose configurations differ only in the seed, best epochs."""
    import numpy as np

    rows: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in group:
        if reported_split(r) in r["best"]:  # runs with a finished (full) evaluation only
            rows.setdefault((*_row_key(r), _config_but_seed(r)), []).append(r)
    columns = columns_of(group[0])
    lines = []
    for (model, loss, _), runs in rows.items():
        if len(runs) < 2:
            continue
        split = reported_split(runs[0])
        cells = []
        for c in columns:
            values = np.array([r["best"][split][c] for r in runs], dtype=float)
            cells.append(f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if np.isfinite(values).all() else "")
        seconds = np.array([r.get("process_seconds", r["wall_seconds"]) for r in runs])
        lines.append(f"| {model} | {loss} | {len(runs)} runs | " + " | ".join(cells) + f" | {seconds.mean():.0f} |")
    if not lines:
        return ""
    header = ["model", "loss", "runs", *(c.upper() for c in columns), "mean s"]
    return "\n".join(["mean ± std over runs that differ only in the seed (best epochs):", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])


def groups(runs: Sequence[Dict]) -> List[List[Dict]]:
    """Runs grouped by (data set, task, protocol), each group ordered by model then loss."""
    keyed: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in runs:
        keyed.setdefault((r["dataset"], task_of(r), r["protocol"]), []).append(r)
    return [sorted(group, key=lambda r: (MODEL_ORDER.get(model_label(r), 9), loss_label(r), r["run_name"]))
            for _, group in sorted(keyed.items())]


def plot_curves(runs: Sequence[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(runs)
    fig, axes = plt.subplots(len(grouped), 2, figsize=(11, 4 * len(grouped)), squeeze=False)
    for row, group in zip(axes, grouped):
        for ax, metric in zip(row, columns_of(group[0])[:2]):
            for label, r in zip(row_labels(group), group):
                split = reported_split(r)
                epochs = [e for e in r["per_epoch"] if e["full_eval"]]
                ax.plot([e["epoch"] + 1 for e in epochs], [e[split][metric] for e in epochs],
                        label=f"{label}, {loss_label(r)}")
                for _, values in published(r)[:1]:
                    if r["protocol"] != "sessions":
                        ax.axhline(values[COLUMNS.index(metric)], ls="--", lw=0.8, color=ax.lines[-1].get_color())
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{SESSION_LABELS.get(metric, metric).upper()} ({split})")
            ax.set_title(f"{group[0]['dataset']}, protocol {group[0]['protocol']} (dashed: published)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    # The temporary's name ends in .tmp: the format is the target's.
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))


def load(paths: Sequence[str]) -> List[Dict]:
    runs = []
    for p in dict.fromkeys(paths):  # a file matched by two globs counts once
        try:
            runs.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise app.UsageError(f"{p}: not a readable results.json ({exc})")
    return runs


def main(argv: List[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more results.json files")
    try:
        if flags.FLAGS.plot:
            check_writable_dir(Path(flags.FLAGS.plot).parent)  # before reading and tabulating the runs
        _report(paths)
    except OSError as exc:
        sys.exit(f"error: {os_error_line(exc)}")


def _report(paths: Sequence[str]) -> None:
    runs = load(paths)
    print("\n\n".join("\n\n".join(filter(None, (table(group), seed_spread(group)))) for group in groups(runs)))
    if flags.FLAGS.plot:
        plot_curves(runs, Path(flags.FLAGS.plot))
        print(f"\nwrote {flags.FLAGS.plot}")


if __name__ == "__main__":
    app.run(main)
