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


def _ranking_run(module: str, seed: int, auc: float, holdout: int = 10, per_user: bool = True) -> Dict:
    metrics = {"auc": auc, "ne": 0.8, "rmse": 0.9, "accuracy": 0.45, "users_averaged": 2900.0 if per_user else 0.0,
               "liked_rate": 0.57, "candidates": 29600.0}
    if per_user:
        metrics.update({"user_auc": auc - 0.1, "ndcg@10": 0.8})
    record = {"epoch": 3, "full_eval": True, "valid": metrics, "test": metrics}
    config = (f"train_fn.ranking_holdout = {holdout}\ntrain_fn.random_seed = {seed}\n"
              "ranking_objective.liked_weight = 1.0\nranking_objective.rating_weight = 0.0\n"
              "ranking_objective.next_item_weight = 0.0")
    run = {"run_name": f"{module.lower()}-seed{seed}", "task": "ranking", "dataset": "ml-1m", "protocol": "paper",
           "main_module": module, "config": config, "wall_seconds": 30.0, "device": "gpu", "per_epoch": [record],
           "best": {"selected_by": "valid/auc", **record}, "last": record,
           "baselines": {"test": {"user+item-bias": {**metrics, "auc": 0.75}}}}
    if not per_user:
        run["undefined_metrics"] = {m: "no user has two candidates of different labels" for m in ("user_auc", "ndcg@10")}
    return run


def test_ranking_report_spread_differences_timing_and_left_out_metrics():
    from generative_recommenders.report import differences, ranking_notes, seed_spread, timing_table

    runs = [_ranking_run("HSTU", 1, 0.80), _ranking_run("HSTU", 2, 0.82), _ranking_run("SASRec", 1, 0.79),
            _ranking_run("SASRec", 2, 0.79), _ranking_run("HSTU", 1, 0.7, holdout=1, per_user=False)]
    runs[0]["evaluation_timing"] = {"users": 2960, "candidates": 29600,
                                    "per_candidate": {"seconds": 1.0, "candidates_per_second": 29600.0},
                                    "m_falcon": {"seconds": 0.1, "candidates_per_second": 296000.0, "speedup": 10.0,
                                                 "max_abs_diff_liked_prob": 2e-7}}
    one, ten = groups(runs)  # one held-out candidate, then ten: separate tables
    assert len(one) == 1 and len(ten) == 4
    assert "NDCG@10" not in table(one) and "USER_AUC" not in table(one) and "nan" not in table(one).lower()
    notes = ranking_notes(one).splitlines()
    assert notes[1:] == ["USER_AUC is left out: no user has two candidates of different labels.",
                         "NDCG@10 is left out: no user has two candidates of different labels."]
    assert "| USER_AUC | NDCG@10 |" in table(ten)
    assert "average over the 2,900 users" in ranking_notes(ten)
    spread = seed_spread(ten)
    assert "| HSTU | liked x1.0 | 2 runs | 0.8100 ± 0.0141 |" in spread
    diff = differences(ten).splitlines()
    # HSTU - SASRec: 0.81 - 0.79, standard error sqrt(0.0002 / 2 + 0 / 2) = 0.01.
    assert [l for l in diff if l.startswith("| HSTU − SASRec | +0.0200 ± 0.0100 |")], diff
    assert [l for l in diff if l.startswith("| SASRec − user+item-bias baseline | +0.0400 ± 0.0000 |")], diff
    rates = timing_table(ten)
    assert "| HSTU (hstu-seed1) | 2,960 | 29,600 | 29,600 | 296,000 (10.0x) |  | 2.0e-07 | gpu |" in rates
