"""End to end: short CPU trainings on the synthetic data set, single process and 2-process gloo DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_config import TINY, cpu_env, free_port, train_tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["HSTU", "SASRec"])
def test_training_improves_over_first_epoch_and_popularity(tmp_path, module):
    results = train_tiny(tmp_path, [f"train_fn.main_module = '{module}'"])
    epochs = results["per_epoch"]
    assert len(epochs) == 3
    assert epochs[-1]["eval"]["hr@10"] > epochs[0]["eval"]["hr@10"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert results["best"]["eval"]["hr@10"] > 2 * results["most_popular_baseline"]["eval"]["hr@10"]
    saved = json.loads((tmp_path / "exps/synthetic-l20/run/results.json").read_text())
    assert saved["best"]["selected_by"] == "eval/ndcg@10"
    assert list((tmp_path / "exps/synthetic-l20/run").glob("events.out.tfevents.*"))


def test_leave_one_out_reports_test_at_best_validation_epoch(tmp_path):
    results = train_tiny(tmp_path, ["train_fn.protocol = 'leave_one_out'"])
    best = results["best"]
    assert best["selected_by"] == "valid/ndcg@10"
    assert best["valid"]["ndcg@10"] == max(e["valid"]["ndcg@10"] for e in results["per_epoch"])
    assert set(best) >= {"valid", "test", "epoch"}


def test_resume_continues_to_the_same_metrics(tmp_path, on_cpu):
    full = train_tiny(tmp_path, run_name="full")
    train_tiny(tmp_path, ["train_fn.num_epochs = 2"], run_name="split")
    resumed = train_tiny(tmp_path, run_name="split")
    assert [e["eval"] for e in resumed["per_epoch"]] == [e["eval"] for e in full["per_epoch"]]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    train_tiny(tmp_path, ["train_fn.num_epochs = 1"])
    with pytest.raises(ValueError, match="different configuration"):
        train_tiny(tmp_path, ["train_fn.num_epochs = 1", "train_fn.learning_rate = 0.01"])


def test_two_process_gloo_ddp(tmp_path):
    bindings = TINY + ["train_fn.num_epochs = 2", f"train_fn.exp_root = '{tmp_path}/exps'",
                       f"train_fn.ckpt_root = '{tmp_path}/ckpts'"]
    cmd = [sys.executable, "main.py", "--num_processes=2", f"--master_port={free_port()}",
           "--gin_config_file=configs/synthetic/hstu-default.gin"] + [f"--gin_bindings={b}" for b in bindings]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "exps/synthetic-l20/hstu-default/results.json").read_text())
    assert results["world_size"] == 2
    assert len(results["per_epoch"]) == 2
    assert 0.0 < results["best"]["eval"]["hr@10"] <= 1.0
    assert results["per_epoch"][-1]["eval"]["hr@10"] > results["most_popular_baseline"]["eval"]["hr@10"]
