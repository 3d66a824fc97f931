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

Ranking runs are grouped by their number of held-out candidates too. Their
tables leave out the metrics no run defines (the reason, from results.json's
"undefined_metrics", is written once below), compare the models' seed means
with each other and with the baselines, and list the evaluation's measured
scoring rates (M-FALCON against one pass per candidate) where runs timed them.
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
RANKING_COLUMNS = ("auc", "ne", "rmse", "accuracy", "user_auc", "ndcg@10")
TIMED_PATHS = {"per_candidate": "one pass per candidate", "m_falcon": "M-FALCON, fused pass",
               "cached": "M-FALCON, cached history"}
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


def group_columns(group: Sequence[Dict]) -> Tuple[str, ...]:
    """The group's columns; for ranking only those some run or baseline has a value of (the others are
    undefined on the data: ranking_notes says why)."""
    columns = columns_of(group[0])
    if task_of(group[0]) != "ranking":
        return columns
    records = [r[w].get(reported_split(r), {}) for r in group for w in ("best", "last")]
    records += list(group[0].get("baselines", {}).get(reported_split(group[0]), {}).values())
    return tuple(c for c in columns if any(_finite(m.get(c)) for m in records))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def ranking_notes(group: Sequence[Dict]) -> str:
    """Ranking: how many candidates and users the metrics cover; each metric left out of the group's table
    and why (written once, from the runs' results.json)."""
    if task_of(group[0]) != "ranking":
        return ""
    shown, split = group_columns(group), reported_split(group[0])
    lines = []
    metrics = next((r["best"][split] for r in group if split in r["best"]), None)
    if metrics is not None:
        per_user = [c.upper() for c in ("user_auc", "ndcg@10") if c in shown]
        lines.append(f"{split} split: {metrics['candidates']:,.0f} candidates" + (
            f"; {' and '.join(per_user)} average over the {metrics['users_averaged']:,.0f} users whose "
            f"candidates have both labels" if per_user else "") + ".")
    reasons: Dict[str, str] = {}
    for r in group:
        for metric, reason in r.get("undefined_metrics", {}).items():
            if metric in columns_of(r) and metric not in shown:
                reasons.setdefault(metric, reason)
    lines += [f"{metric.upper()} is left out: {reason}." for metric, reason in reasons.items()]
    return "\n".join(lines)


def ranking_title(results: Dict) -> str:
    holdout = _config_value(results, "train_fn.ranking_holdout") or "1"
    return f"ranking, {holdout} held-out candidate(s) per user and split"


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
    columns = group_columns(runs)
    header = ["model", "loss", "epoch", *(SESSION_LABELS.get(c, c).upper() for c in columns), "s", "device"]
    title = ranking_title(runs[0]) if task_of(runs[0]) == "ranking" else f"protocol {runs[0]['protocol']}"
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


def seed_rows(group: Sequence[Dict]) -> List[Tuple[str, str, List[Dict]]]:
    """(model, loss, runs) for each set of two or more runs whose configurations differ only in the seed."""
    rows: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in group:
        if reported_split(r) in r["best"]:  # runs with a finished (full) evaluation only
            rows.setdefault((*_row_key(r), _config_but_seed(r)), []).append(r)
    return [(model, loss, runs) for (model, loss, _), runs in rows.items() if len(runs) >= 2]


def _best_values(runs: Sequence[Dict], metric: str):
    """(runs,) array of the metric at each run's best epoch, NaN where a run has none."""
    import numpy as np

    values = [r["best"][reported_split(r)].get(metric) for r in runs]
    return np.array([v if _finite(v) else math.nan for v in values], dtype=float)


def seed_spread(group: Sequence[Dict]) -> str:
    """Mean and standard deviation over runs whose configurations differ only in the seed, best epochs."""
    columns = group_columns(group)
    lines = []
    for model, loss, runs in seed_rows(group):
        cells = []
        for c in columns:
            values = _best_values(runs, c)
            cells.append(f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if all(map(math.isfinite, values)) else "")
        seconds = sum(r.get("process_seconds", r["wall_seconds"]) for r in runs) / len(runs)
        lines.append(f"| {model} | {loss} | {len(runs)} runs | " + " | ".join(cells) + f" | {seconds:.0f} |")
    if not lines:
        return ""
    header = ["model", "loss", "runs", *(c.upper() for c in columns), "mean s"]
    return "\n".join(["mean ± std over runs that differ only in the seed (best epochs):", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])


def differences(group: Sequence[Dict]) -> str:
    """Ranking: each model's seed mean minus each other model's and each baseline's, ± the standard error of
    the difference from the seeds' spread (the baselines have none: they are fit without a seed)."""
    if task_of(group[0]) != "ranking":
        return ""
    columns = group_columns(group)
    rows = [(model, {c: _best_values(runs, c) for c in columns}) for model, _, runs in seed_rows(group)]
    baselines = group[0].get("baselines", {}).get(reported_split(group[0]), {})
    lines = []
    for i, (model, values) in enumerate(rows):
        others = rows[:i] + [(f"{name} baseline", {c: [m.get(c, math.nan)] for c in columns})
                             for name, m in baselines.items()]
        for other, other_values in others:
            cells = [_difference_cell(values[c], other_values[c]) for c in columns]
            lines.append(f"| {model} − {other} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    header = ["difference", *(c.upper() for c in columns)]
    return "\n".join(["difference of the means ± its standard error over the seeds (best epochs):", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])


def _difference_cell(a, b) -> str:
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return ""
    variance = sum(x.var(ddof=1) / x.size for x in (a, b) if x.size > 1)
    return f"{a.mean() - b.mean():+.4f} ± {math.sqrt(variance):.4f}"


def timing_table(group: Sequence[Dict]) -> str:
    """The runs' measured evaluation rates (results.json "evaluation_timing"): candidates per second of each
    scoring path, and M-FALCON's speed-up over one pass per candidate."""
    timed = [(label, r) for label, r in zip(row_labels(group), group) if "evaluation_timing" in r]
    if not timed:
        return ""
    header = ["run", "users", "candidates", *(f"{name} (cand/s)" for name in TIMED_PATHS.values()),
              "max abs diff of liked prob to one pass per candidate (fused / cached)", "device"]
    lines = []
    for label, r in timed:
        timing = r["evaluation_timing"]
        cells = []
        for path in TIMED_PATHS:
            rate = timing.get(path)
            speedup = f" ({rate['speedup']:.1f}x)" if rate and "speedup" in rate else ""
            cells.append(f"{rate['candidates_per_second']:,.0f}{speedup}" if rate else "")
        gap = " / ".join(f"{timing[p]['max_abs_diff_liked_prob']:.1e}" for p in TIMED_PATHS
                         if "max_abs_diff_liked_prob" in timing.get(p, {}))
        lines.append(f"| {label} | {timing['users']:,} | {timing['candidates']:,} | " + " | ".join(cells)
                     + f" | {gap} | {r['device']} |")
    return "\n".join(["evaluation scoring rates (test split, after training; speed-up over one pass per "
                      "candidate):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])


def groups(runs: Sequence[Dict]) -> List[List[Dict]]:
    """Runs grouped by (data set, task, protocol), each group ordered by model then loss."""
    keyed: Dict[Tuple[str, str, str, str], List[Dict]] = {}
    for r in runs:
        holdout = (_config_value(r, "train_fn.ranking_holdout") or "1") if task_of(r) == "ranking" else ""
        keyed.setdefault((r["dataset"], task_of(r), r["protocol"], holdout), []).append(r)
    return [sorted(group, key=lambda r: (MODEL_ORDER.get(model_label(r), 9), loss_label(r), r["run_name"]))
            for _, group in sorted(keyed.items())]


def plot_curves(runs: Sequence[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(runs)
    fig, axes = plt.subplots(len(grouped), 2, figsize=(11, 4 * len(grouped)), squeeze=False)
    for row, group in zip(axes, grouped):
        for ax, metric in zip(row, group_columns(group)[:2]):
            for label, r in zip(row_labels(group), group):
                split = reported_split(r)
                epochs = [e for e in r["per_epoch"] if e["full_eval"]]
                ax.plot([e["epoch"] + 1 for e in epochs], [e[split].get(metric, math.nan) for e in epochs],
                        label=f"{label}, {loss_label(r)}")
                for _, values in published(r)[:1]:
                    if r["protocol"] != "sessions":
                        ax.axhline(values[COLUMNS.index(metric)], ls="--", lw=0.8, color=ax.lines[-1].get_color())
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{SESSION_LABELS.get(metric, metric).upper()} ({split})")
            kind = ranking_title(group[0]) if task_of(group[0]) == "ranking" else f"protocol {group[0]['protocol']}"
            ax.set_title(f"{group[0]['dataset']}, {kind} (dashed: published)", fontsize=9)
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
    sections = (table, ranking_notes, seed_spread, differences, timing_table)
    print("\n\n".join("\n\n".join(filter(None, (section(group) for section in sections))) for group in groups(runs)))
    if flags.FLAGS.plot:
        plot_curves(runs, Path(flags.FLAGS.plot))
        print(f"\nwrote {flags.FLAGS.plot}")


if __name__ == "__main__":
    app.run(main)
