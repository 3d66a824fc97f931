"""generative_recommenders/report.py: tables of runs with different configurations in one group."""

from __future__ import annotations

import subprocess
import sys
from typing import Dict

from tiny_config import REPO, cpu_env, train_tiny

from generative_recommenders.report import groups, table


def _run(name: str, module: str = "HSTU", loss: str = "SampledSoftmaxLoss", epochs: int = 2) -> Dict:
    per_epoch = [{"epoch": e, "full_eval": True, "eval": {"hr@10": 0.1 * (e + 1), "ndcg@10": 0.05 * (e + 1)}}
                 for e in range(epochs)]
    return {"run_name": name, "dataset": "ml-1m", "protocol": "paper", "main_module": module, "loss_module": loss,
            "config": "train_fn.num_negatives = 128", "wall_seconds": 10.0, "device": "cpu",
            "per_epoch": per_epoch, "best": {"selected_by": "eval/ndcg@10", **(per_epoch[-1] if epochs else {})},
            "last": per_epoch[-1] if epochs else {}}


def test_runs_sharing_model_and_loss_are_told_apart_by_run_name():
    runs = [_run("hstu-default-3f9a1c"), _run("sasrec-default", "SASRec"), _run("hstu-default")]
    (group,) = groups(runs)
    rows = [line for line in table(group).splitlines() if line.startswith("| HSTU") or line.startswith("| SASRec")]
    assert {row.split(" | ")[0] for row in rows} == {"| HSTU (hstu-default)", "| HSTU (hstu-default-3f9a1c)",
                                                     "| SASRec"}


def test_a_run_without_a_finished_evaluation_gets_no_epoch_rows():
    lines = table([_run("new", epochs=0), _run("done")]).splitlines()
    assert not [line for line in lines if line.startswith("| HSTU (new) | sampled softmax n128 | best")]
    assert [line for line in lines if line.startswith("| HSTU (done) | sampled softmax n128 | best 2 |")]


def test_the_report_of_real_training_output(tmp_path):
    """The command over the results.json files the trainer writes: one table, the seed spread, the curves."""
    runs = [train_tiny(tmp_path, ["train_fn.num_epochs = 2", f"train_fn.random_seed = {seed}"], run_name=f"seed{seed}")
            for seed in (1, 2)]
    paths = [str(tmp_path / f"exps/synthetic-l20/seed{seed}/results.json") for seed in (1, 2)]
    proc = subprocess.run([sys.executable, "-m", "generative_recommenders.report", *paths,
                           f"--plot={tmp_path / 'curves.png'}"], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "synthetic, protocol paper (eval split)"
    for seed, results in zip((1, 2), runs):
        best = results["best"]
        row = f"| HSTU (seed{seed}) | sampled softmax n32 | best {best['epoch'] + 1} | {best['eval']['hr@10']:.4f} |"
        assert [line for line in lines if line.startswith(row)], (row, proc.stdout)
    assert [line for line in lines if line.startswith("| HSTU | sampled softmax n32 | 2 runs |")], proc.stdout
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_undefined_metrics_are_null_in_strict_json_and_empty_cells(tmp_path):
    """results.json is strict JSON (no NaN token, which other tools reject): an undefined metric is null,
    and the report leaves its cell empty; a resumed run's seconds say how many processes they sum."""
    import json
    import math

    from generative_recommenders.runs import RunState, write_results

    run = _run("undefined")
    run["per_epoch"][-1]["eval"]["ndcg@10"] = math.nan
    state = RunState(epochs_done=2, process_seconds=593.0, sessions=3,
                     history=[{**e, "train_seconds": 1.0} for e in run["per_epoch"]])
    summary = {k: v for k, v in run.items() if k not in ("per_epoch", "best", "last", "wall_seconds")}
    write_results(tmp_path / "results.json", {**summary, "selected_by": "eval/hr@10"}, state, state.history[-1])

    def no_constants(token: str):
        raise AssertionError(f"non-strict JSON token {token}")

    written = json.loads((tmp_path / "results.json").read_text(), parse_constant=no_constants)
    assert written["best"]["eval"]["ndcg@10"] is None and written["sessions"] == 3
    row = next(line for line in table([written]).splitlines() if line.startswith("| HSTU | sampled softmax n128 | best"))
    assert row.split(" | ")[3:5] == ["0.2000", ""] and " | 593 (3 sessions) | cpu |" in row
