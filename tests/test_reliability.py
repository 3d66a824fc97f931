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
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from tiny_config import DEFAULT_CONFIG, REPO, TINY, cpu_env, free_port, run_name_of, train_tiny

EPOCHS = 4
RUN_NAME = run_name_of(TINY + [f"train_fn.num_epochs = {EPOCHS}"])  # where main.py puts the runs below
RUN = f"exps/synthetic-l20/{RUN_NAME}/results.json"
CKPT = f"ckpts/synthetic-l20/{RUN_NAME}"


def _cmd(tmp: Path, extra: List[str] = (), processes: int = 1) -> List[str]:
    bindings = TINY + [f"train_fn.num_epochs = {EPOCHS}", f"train_fn.exp_root = '{tmp}/exps'",
                       f"train_fn.ckpt_root = '{tmp}/ckpts'", *extra]
    return [sys.executable, "main.py", f"--gin_config_file={DEFAULT_CONFIG}",
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


def _best_checkpoint(tmp: Path) -> Tuple[int, Dict[str, torch.Tensor]]:
    payload = torch.load(tmp / CKPT / "best.pt", weights_only=True)
    return payload["epoch"], payload["model"]


def _assert_same_as_reference(tmp: Path, reference: Path) -> None:
    """Same per-epoch metrics, and best.pt holds the same best epoch's weights (never another epoch's)."""
    assert _metrics(tmp) == _metrics(reference)
    epoch, weights = _best_checkpoint(tmp)
    reference_epoch, reference_weights = _best_checkpoint(reference)
    assert epoch == json.loads((tmp / RUN).read_text())["best"]["epoch"] == reference_epoch
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    proc = _run(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.mark.parametrize("fault", ["train@1", "eval@2", "checkpoint@1", "checkpoint@3", "best@1"])
def test_sigkill_then_rerun_gives_the_same_results(tmp_path, reference, fault):
    killed = _run(tmp_path, fault)
    assert killed.returncode == -signal.SIGKILL
    ckpt = tmp_path / CKPT / "last.pt"
    if fault.startswith("checkpoint"):
        # The checkpoint being written when the process died must not be taken for a complete one.
        epoch = int(fault.split("@")[1])
        done = torch.load(ckpt, weights_only=True)["state"]["epochs_done"] if ckpt.exists() else 0
        assert done == epoch
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    results = json.loads((tmp_path / RUN).read_text())
    assert results["sessions"] == 2  # both processes' time is counted, not only the last one's
    assert results["process_seconds"] >= results["train_seconds"] > 0
    # Killed after last.pt of the best epoch 2 and before its best.pt: the resumed run restores best.pt.
    assert ("best.pt lacked epoch 2" in resumed.stdout) == (fault == "best@1")
    _assert_same_as_reference(tmp_path, reference)


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
    _assert_same_as_reference(tmp_path, reference)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = _run(tmp_path, "nan@2")
    assert proc.returncode != 0
    assert "non-finite training loss in epoch 3" in proc.stderr
    assert "last good checkpoint" in proc.stderr and "after epoch 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt = torch.load(tmp_path / CKPT / "last.pt", weights_only=True)
    assert ckpt["state"]["epochs_done"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_weights_with_a_finite_loss_stop_the_run(tmp_path):
    """A NaN written into a weight after the epoch's last step: the loss is finite, only the weights check sees it."""
    proc = _run(tmp_path, "nan_weights@1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite weights after the last update in epoch 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt = torch.load(tmp_path / CKPT / "last.pt", weights_only=True)
    assert ckpt["state"]["epochs_done"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_second_training_of_the_same_run_is_refused_naming_the_first(tmp_path):
    long = ["train_fn.num_epochs = 1000"]  # still training when the second starts
    first = subprocess.Popen(_cmd(tmp_path, long), cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if line.startswith("epoch 1/"):  # training: the lock is held
                break
        second = _run(tmp_path, extra=long, timeout=120)
        assert first.poll() is None, "the first run finished before the second started: nothing was tested"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path}/exps/synthetic-l20/{RUN_NAME} is being trained by another process (pid {first.pid})")
    # The OS released the killed run's lock: the run now resumes (for one more epoch).
    done = torch.load(tmp_path / CKPT / "last.pt", weights_only=True)["state"]["epochs_done"]
    resumed = _run(tmp_path, extra=[f"train_fn.num_epochs = {done + 1}"])
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-3000:]


def test_fewer_epochs_than_done_says_so_and_exits(reference):
    proc = _run(reference, extra=["train_fn.num_epochs = 2"])
    assert proc.returncode == 1
    assert f"has trained {EPOCHS} epochs already, more than train_fn.num_epochs = 2" in proc.stderr


def test_a_positional_argument_is_refused_with_the_usage_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "configs/ml-1m/hstu-sampled-softmax-n128-final.gin"],
                          cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "python3 main.py --gin_config_file=" in proc.stderr  # the usage lines
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "unexpected arguments: configs/ml-1m/hstu-sampled-softmax-n128-final.gin")
    assert list(tmp_path.iterdir()) == []  # nothing trained


def test_non_finite_loss_in_the_first_epoch_says_no_checkpoint_exists(tmp_path):
    proc = _run(tmp_path, "nan@0")
    assert proc.returncode != 0
    assert "non-finite training loss in epoch 1" in proc.stderr and "no checkpoint was written yet" in proc.stderr
    assert not (tmp_path / CKPT / "last.pt").exists()


@pytest.mark.parametrize(
    "binding, message",
    [
        ("train_fn.no_such_parameter = 1", "no_such_parameter"),
        ("train_fn.dataset_name = 'ml-1m'\ntrain_fn.data_dir = '/nonexistent'", "preprocess_public_data.py"),
        ("train_fn.main_module = 'SASRec'\nsasrec_encoder.num_heads = 3", "divisible"),
        ("train_fn.protocol = 'last_two'", "protocol"),
        ("train_fn.main_module = 'GRU'", "main_module"),
        ("train_fn.selection_metric = 'ndcg@7'", "train_fn.selection_metric must be one of"),
        ("train_fn.num_epochs = 2.5", "train_fn.num_epochs must be an integer, got 2.5"),
        ("hstu_encoder.num_heads = 0", "hstu_encoder.num_heads must be a positive integer, got 0"),
        ("train_fn.local_batch_size = 100000", "exceeds the 600 training samples"),
    ],
)
def test_configuration_faults_fail_early_with_a_clear_message(tmp_path, binding, message):
    start = time.time()
    proc = _run(tmp_path, extra=binding.split("\n"), timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert "In call to configurable" not in proc.stderr  # gin's addition to a message: one line only
    assert not (tmp_path / "ckpts").exists()
    assert time.time() - start < 60


SASREC, GRU, BERT = ("train_fn.main_module = 'SASRec'", "train_fn.main_module = 'GRU4Rec'",
                     "train_fn.main_module = 'BERT4Rec'")
# Every value a user can set wrongly, with (part of) the one line that must name it.
INVALID_VALUES = [
    *[([f"train_fn.{name} = 0"], f"train_fn.{name} must be a positive integer, got 0")
      for name in ("max_sequence_length", "item_embedding_dim", "num_negatives", "local_batch_size",
                   "eval_batch_size", "full_eval_every_n", "partial_eval_num_batches", "num_epochs")],
    *[([f"train_fn.{name} = -1"], f"train_fn.{name} must be a finite number >= 0, got -1")
      for name in ("num_warmup_steps", "gr_output_length", "early_stopping_patience",
                   "weight_decay", "bpr_max_regularization", "random_seed")],
    *[([f"train_fn.{name} = 0.0"], f"train_fn.{name} must be a positive number, got 0.0")
      for name in ("learning_rate", "temperature", "l2_norm_eps")],
    (["train_fn.learning_rate = inf"], "--gin_bindings='train_fn.learning_rate = inf': gin reads values as Python"),
    (["train_fn.weight_decay = 1e999"], "train_fn.weight_decay must be a finite number >= 0, got inf"),
    (["train_fn.dropout_rate = 1.0"], "train_fn.dropout_rate must be a number in [0, 1), got 1.0"),
    (["train_fn.mask_prob = 0.0"], "train_fn.mask_prob must be in (0, 1)"),
    (["train_fn.num_epochs = 2.5"], "train_fn.num_epochs must be an integer, got 2.5"),
    (["train_fn.learning_rate = '1e-3'"], "train_fn.learning_rate must be a number, got '1e-3'"),
    (["train_fn.resume = 'no'"], "train_fn.resume must be True or False, got 'no'"),
    (["train_fn.max_sequence_length = True"], "train_fn.max_sequence_length must be an integer, got True"),
    (["train_fn.run_name = ''"], "train_fn.run_name must be a plain directory name"),
    (["train_fn.run_name = '../elsewhere'"], "train_fn.run_name must be a plain directory name"),
    (["train_fn.protocol = 'last_two'"], "train_fn.protocol must be one of paper, leave_one_out, sessions"),
    (["train_fn.protocol = 'sessions'"], "holds users: set train_fn.protocol = paper or leave_one_out"),
    (["train_fn.task = 'classification'"], "train_fn.task must be one of"),
    (["train_fn.main_module = 'GRU'"], "train_fn.main_module must be one of HSTU, SASRec, GRU4Rec, BERT4Rec"),
    (["train_fn.loss_module = 'Softmax'"], "train_fn.loss_module must be one of"),
    (["train_fn.loss_module = 'BCELoss'"], "set train_fn.temperature = 1.0"),
    (["train_fn.sampling_strategy = 'global'"], "train_fn.sampling_strategy must be one of local, in-batch"),
    (["train_fn.user_embedding_norm = 'batch_norm'"], "train_fn.user_embedding_norm must be one of l2_norm"),
    (["train_fn.selection_metric = 'ndcg@7'"], "train_fn.selection_metric must be one of"),
    (["train_fn.early_stopping_patience = 2"], "early_stopping_patience needs a validation split"),
    (["train_fn.local_batch_size = 601"], "train_fn.local_batch_size = 601 x 1 process(es) exceeds the 600"),
    (["train_fn.dataset_name = 'ml-1m'", "train_fn.data_dir = '/nonexistent'"], "preprocess_public_data.py"),
    *[([f"hstu_encoder.{name} = 0"], f"hstu_encoder.{name} must be a positive integer, got 0")
      for name in ("num_blocks", "num_heads", "dqk", "dv")],
    (["hstu_encoder.linear_dropout_rate = 2.0"], "hstu_encoder.linear_dropout_rate must be a number in [0, 1)"),
    (["hstu_encoder.normalization = 'relu'"], "hstu_encoder.normalization must be one of silu, softmax"),
    (["hstu_encoder.attention_kernel = 'cuda'"], "hstu_encoder.attention_kernel must be one of auto"),
    *[([SASREC, f"sasrec_encoder.{name} = 0"], f"sasrec_encoder.{name} must be a positive integer, got 0")
      for name in ("num_blocks", "num_heads", "ffn_hidden_dim")],
    ([SASREC, "sasrec_encoder.num_heads = 3"], "item_embedding_dim 16 must be divisible by sasrec_encoder.num_heads"),
    ([SASREC, "sasrec_encoder.ffn_dropout_rate = -0.1"], "sasrec_encoder.ffn_dropout_rate must be a number in"),
    ([SASREC, "sasrec_encoder.ffn_activation_fn = 'tanh'"], "sasrec_encoder.ffn_activation_fn must be one of"),
    ([GRU, "gru4rec_encoder.num_layers = 0"], "gru4rec_encoder.num_layers must be a positive integer, got 0"),
    ([GRU, "gru4rec_encoder.hidden_dim = 0"], "gru4rec_encoder.hidden_dim must be a positive integer, got 0"),
    ([GRU, "gru4rec_encoder.dropout_rate = 1.0"], "gru4rec_encoder.dropout_rate must be a number in [0, 1)"),
    *[([BERT, f"bert4rec_encoder.{name} = 0"], f"bert4rec_encoder.{name} must be a positive integer, got 0")
      for name in ("num_blocks", "num_heads", "ffn_hidden_dim")],
    ([BERT, "bert4rec_encoder.num_heads = 3"], "must be divisible by bert4rec_encoder.num_heads"),
    ([BERT, "bert4rec_encoder.dropout_rate = 1.0"], "bert4rec_encoder.dropout_rate must be a number in [0, 1)"),
    *[([f"synthetic_data.{name} = 0"], f"synthetic_data.{name} must be a positive integer, got 0")
      for name in ("num_users", "num_items", "num_topics", "min_length", "max_length")],
    (["synthetic_data.num_topics = 1"], "synthetic_data.num_topics must be >= 2"),
    (["synthetic_data.min_length = 100"], "synthetic_data.min_length (100) must be <= max_length (60)"),
    (["synthetic_data.follow_prob = 1.5"], "synthetic_data.follow_prob must be in [0, 1]"),
    (["synthetic_data.seed = -1"], "synthetic_data.seed must be >= 0"),
]


def _launch_in_process(tmp: Path, bindings: List[str]) -> str:
    """main.py's launch, in this process (no interpreter start per case); returns the message it exits with."""
    import gin

    import main

    where = [f"train_fn.exp_root = '{tmp}/exps'", f"train_fn.ckpt_root = '{tmp}/ckpts'"]
    try:
        with pytest.raises(SystemExit) as stop:
            main.launch(str(REPO / DEFAULT_CONFIG), bindings + where, 1, free_port(), fresh=False)
    finally:
        gin.clear_config()
    return stop.value.code


@pytest.mark.parametrize("bindings, message", INVALID_VALUES, ids=lambda v: v[-1] if isinstance(v, list) else "")
def test_every_invalid_value_stops_before_training_with_one_line(tmp_path, bindings, message):
    code = _launch_in_process(tmp_path, TINY + bindings)
    # sys.exit with a message: printed alone on stderr, exit status 1 (the subprocess test above shows it).
    assert isinstance(code, str) and code.startswith("error") and "\n" not in code
    assert message in code
    assert not (tmp_path / "exps").exists() and not (tmp_path / "ckpts").exists()


def test_missing_encoder_settings_name_the_file_to_start_from(tmp_path):
    code = _launch_in_process(tmp_path, ["train_fn.main_module = 'SASRec'", "synthetic_data.num_users = 600"])
    assert code.startswith("error") and "\n" not in code
    assert "needs its encoder's settings" in code and "configs/synthetic/sasrec-default.gin" in code


def test_a_dying_rank_stops_the_others(tmp_path):
    start = time.time()
    proc = _run(tmp_path, "train@1@1", processes=2, timeout=240)
    assert proc.returncode != 0
    assert time.time() - start < 180


def test_same_seed_same_numbers_on_cpu(tmp_path, on_cpu):
    runs = [train_tiny(tmp_path / name) for name in "ab"]
    assert [e["eval"] for e in runs[0]["per_epoch"]] == [e["eval"] for e in runs[1]["per_epoch"]]
