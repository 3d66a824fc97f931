"""Reliability: killed runs resume to the same answer, bad configs fail early and clearly,
non-finite losses stop the run, a dying DDP rank does not hang the others, same seed = same numbers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from tiny_config import TINY, cpu_env, free_port, train_tiny

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
RUN = "exps/synthetic-l20/hstu-default/results.json"


def _cmd(tmp: Path, extra: List[str] = (), processes: int = 1) -> List[str]:
    bindings = TINY + [f"train_fn.num_epochs = {EPOCHS}", f"train_fn.exp_root = '{tmp}/exps'",
                       f"train_fn.ckpt_root = '{tmp}/ckpts'", *extra]
    return [sys.executable, "main.py", "--gin_config_file=configs/synthetic/hstu-default.gin",
            f"--num_processes={processes}", f"--master_port={free_port()}"] + [f"--gin_bindings={b}" for b in bindings]


def _run(tmp: Path, fault: Optional[str] = None, extra: List[str] = (), processes: int = 1,
         timeout: float = 300) -> subprocess.CompletedProcess:
    env = cpu_env()  # the guarantees tested here are the CPU's (deterministic mode)
    env.pop("GR_FAULT", None)
    if fault:
        env["GR_FAULT"] = fault
    return subprocess.run(_cmd(tmp, extra, processes), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _metrics(tmp: Path) -> List[Dict]:
    results = json.loads((tmp / RUN).read_text())
    return [{k: e[k] for k in ("epoch", "train_loss", "eval")} for e in results["per_epoch"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> List[Dict]:
    tmp = tmp_path_factory.mktemp("reference")
    proc = _run(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(tmp)


@pytest.mark.parametrize("fault", ["train@1", "eval@2", "checkpoint@1", "checkpoint@3"])
def test_sigkill_then_rerun_gives_the_same_results(tmp_path, reference, fault):
    killed = _run(tmp_path, fault)
    assert killed.returncode == -signal.SIGKILL
    ckpt = tmp_path / "ckpts/synthetic-l20/hstu-default/last.pt"
    if fault.startswith("checkpoint"):
        # The checkpoint being written when the process died must not be taken for a complete one.
        epoch = int(fault.split("@")[1])
        done = torch.load(ckpt, weights_only=True)["state"]["epochs_done"] if ckpt.exists() else 0
        assert done == epoch
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert _metrics(tmp_path) == reference


def test_sigkill_at_a_random_moment(tmp_path, reference):
    """Killed at a moment drawn from the run's own progress: after a random epoch's line, a random share of
    that epoch's duration later (another epoch always follows, so the kill lands mid-run)."""
    rng = random.Random(os.getpid())
    after_epoch = rng.randint(1, EPOCHS - 1)
    proc = subprocess.Popen(_cmd(tmp_path), cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith(f"epoch {after_epoch}/{EPOCHS} "):
            epoch_seconds = float(line.rsplit("|", 1)[1].strip().rstrip("s"))
            break
    else:
        pytest.fail(f"the run ended without printing epoch {after_epoch}")
    time.sleep(rng.uniform(0.0, 0.8) * epoch_seconds)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill: nothing was tested"
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert _metrics(tmp_path) == reference


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = _run(tmp_path, "nan@2")
    assert proc.returncode != 0
    assert "non-finite training loss in epoch 3" in proc.stderr
    assert "last good checkpoint" in proc.stderr and "after epoch 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt = torch.load(tmp_path / "ckpts/synthetic-l20/hstu-default/last.pt", weights_only=True)
    assert ckpt["state"]["epochs_done"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_loss_in_the_first_epoch_says_no_checkpoint_exists(tmp_path):
    proc = _run(tmp_path, "nan@0")
    assert proc.returncode != 0
    assert "non-finite training loss in epoch 1" in proc.stderr and "no checkpoint was written yet" in proc.stderr
    assert not (tmp_path / "ckpts/synthetic-l20/hstu-default/last.pt").exists()


@pytest.mark.parametrize(
    "binding, message",
    [
        ("train_fn.no_such_parameter = 1", "no_such_parameter"),
        ("train_fn.dataset_name = 'ml-1m'\ntrain_fn.data_dir = '/nonexistent'", "preprocess_public_data.py"),
        ("train_fn.main_module = 'SASRec'\nsasrec_encoder.num_heads = 3", "divisible"),
        ("train_fn.protocol = 'last_two'", "protocol"),
        ("train_fn.main_module = 'GRU'", "main_module"),
    ],
)
def test_configuration_faults_fail_early_with_a_clear_message(tmp_path, binding, message):
    start = time.time()
    proc = _run(tmp_path, extra=binding.split("\n"), timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpts").exists()
    assert time.time() - start < 60


def test_a_dying_rank_stops_the_others(tmp_path):
    start = time.time()
    proc = _run(tmp_path, "train@1@1", processes=2, timeout=240)
    assert proc.returncode != 0
    assert time.time() - start < 180


def test_same_seed_same_numbers_on_cpu(tmp_path, on_cpu):
    runs = [train_tiny(tmp_path / name) for name in "ab"]
    assert [e["eval"] for e in runs[0]["per_epoch"]] == [e["eval"] for e in runs[1]["per_epoch"]]
