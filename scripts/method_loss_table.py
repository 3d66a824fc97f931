"""Renders the README's ml-1m method x loss tables (one per protocol) from the committed results files.

    python3 scripts/method_loss_table.py                          # print both tables
    python3 scripts/method_loss_table.py --readme README.md       # rewrite them in place
    python3 scripts/method_loss_table.py --results results/ml-1m --results <more>/results/ml-1m

A later --results directory wins over an earlier one for the same file. Each
table lies in the README between `<!-- method-loss-table PROTOCOL -->` and the
next blank line. Under leave-one-out the BERT4Rec rows are the runs to
convergence (`*-converged.json`, early stopping) when they exist.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generative_recommenders.files import atomic_write  # noqa: E402
from generative_recommenders.report import (  # noqa: E402
    FULL_SOFTMAX_PAPER, RELEASE, _cells, loss_label, model_label, reported_split,
)

flags.DEFINE_multi_string("results", ["results/ml-1m"], "Folders holding <protocol>/<config>.json.")
flags.DEFINE_string("readme", None, "Rewrite the tables in this file (between their markers) instead of printing.")
FLAGS = flags.FLAGS

PROTOCOLS = ("leave_one_out", "paper")
# Row order; a tuple lists the files to try, first found wins.
ROWS = ("sasrec-sampled-softmax-n128-final", "sasrec-full-softmax-final", "hstu-sampled-softmax-n128-final",
        "hstu-full-softmax-final", "hstu-sampled-softmax-n128-large-final", "fuxi-sampled-softmax-n128-final",
        "fuxi-full-softmax-final", "gru4rec-sampled-softmax-n128-final", "gru4rec-full-softmax-final",
        ("bert4rec-sampled-softmax-n128-converged", "bert4rec-sampled-softmax-n128-final"),
        ("bert4rec-full-softmax-converged", "bert4rec-full-softmax-final"))
HEADER = ("| model | loss | best epoch / run | HR@10 | NDCG@10 | last HR@10 | NDCG@10 | s | device | published |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def find(folders: Sequence[Path], protocol: str, names) -> Optional[Dict]:
    """The results of the first of `names` found, from the last folder holding it."""
    for name in (names,) if isinstance(names, str) else names:
        for folder in reversed(folders):
            path = folder / protocol / f"{name}.json"
            if path.is_file():
                return json.loads(path.read_text())
    return None


def epochs_cell(results: Dict) -> str:
    """'best / epochs run', with the stop reason when early stopping ended the run before num_epochs."""
    done = results["epochs_done"]
    planned = re.search(r"train_fn\.num_epochs = (\d+)", results["config"])
    stopped = " (early stop)" if planned and done < int(planned.group(1)) else ""
    return f"{results['best']['epoch'] + 1} / {done}{stopped}"


def published_cell(results: Dict) -> str:
    """The README's published column: the release's sampled-softmax rows (paper protocol), K&V's
    full-softmax leave-one-out rows (which the release quoted for GRU4Rec and BERT4Rec)."""
    key = (results["dataset"], model_label(results))
    sampled = results.get("loss_module", "SampledSoftmaxLoss") == "SampledSoftmaxLoss"
    if results["protocol"] == "paper" and sampled and key in RELEASE:
        source, values = "release", RELEASE[key]
    elif results["protocol"] == "paper" and sampled and key in FULL_SOFTMAX_PAPER and key[1] != "SASRec":
        source, values = "release (quoting K&V)", FULL_SOFTMAX_PAPER[key]
    elif results["protocol"] == "leave_one_out" and not sampled and key in FULL_SOFTMAX_PAPER:
        source, values = "K&V" + (" (SASRec+)" if key[1] == "SASRec" else ""), FULL_SOFTMAX_PAPER[key]
    else:
        return ""
    return f"{source} {values[0]:.4f} / {values[1]:.4f}"


def row(results: Dict) -> str:
    split = reported_split(results)
    best, last = results["best"][split], results["last"][split]
    device = results["device"].replace("NVIDIA ", "").split(" ")[0]
    cells = [model_label(results), loss_label(results), epochs_cell(results),
             *_cells(best, ("hr@10", "ndcg@10")), *_cells(last, ("hr@10", "ndcg@10")),
             f"{results.get('process_seconds', results['wall_seconds']):.0f}", device, published_cell(results)]
    return "| " + " | ".join(cells) + " |"


def table(folders: Sequence[Path], protocol: str) -> str:
    runs = [find(folders, protocol, names) for names in ROWS]
    return "\n".join([HEADER, *(row(r) for r in runs if r is not None and "epoch" in r.get("best", {}))])


def rewrite(text: str, protocol: str, new_table: str) -> str:
    """text with the table after the protocol's marker replaced by new_table."""
    marker = f"<!-- method-loss-table {protocol} -->\n"
    if marker not in text:
        raise SystemExit(f"error: no line '{marker.strip()}' in the README")
    head, tail = text.split(marker, 1)
    rest = tail.split("\n\n", 1)[1] if "\n\n" in tail else ""
    return f"{head}{marker}{new_table}\n\n{rest}"


def main(argv: List[str]) -> None:
    del argv
    folders = [Path(f) for f in FLAGS.results]
    tables = {protocol: table(folders, protocol) for protocol in PROTOCOLS}
    if FLAGS.readme is None:
        for protocol, text in tables.items():
            print(f"{protocol}:\n{text}\n")
        return
    text = Path(FLAGS.readme).read_text()
    for protocol, new_table in tables.items():
        text = rewrite(text, protocol, new_table)
    atomic_write(Path(FLAGS.readme), lambda tmp: tmp.write_text(text))


if __name__ == "__main__":
    app.run(main)
