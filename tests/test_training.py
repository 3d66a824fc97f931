"""End to end: short CPU trainings on the synthetic data set, single process and 2-process gloo DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_config import DEFAULT_CONFIG, REPO, TINY, cpu_env, free_port, run_name_of, train_tiny


@pytest.mark.parametrize("module", ["HSTU", "SASRec"])
def test_training_improves_over_first_epoch_and_popularity(tmp_path, module):
    results = train_tiny(tmp_path, [f"train_fn.main_module = '{module}'"])
    epochs = results["per_epoch"]
    assert len(epochs) == 3
    assert epochs[-1]["eval"]["hr@10"] > epochs[0]["eval"]["hr@10"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert results["best"]["eval"]["hr@10"] > 2 * results["baselines"]["eval"]["most-popular"]["hr@10"]
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
           f"--gin_config_file={DEFAULT_CONFIG}"] + [f"--gin_bindings={b}" for b in bindings]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / f"exps/synthetic-l20/{run_name_of(bindings)}/results.json").read_text())
    assert results["world_size"] == 2
    assert len(results["per_epoch"]) == 2
    assert 0.0 < results["best"]["eval"]["hr@10"] <= 1.0
    assert results["per_epoch"][-1]["eval"]["hr@10"] > results["baselines"]["eval"]["most-popular"]["hr@10"]
    # The trainer compares the ranks' weights after every epoch and stops if they differ (as they would
    # without DistributedDataParallel's gradient averaging); both epochs passed that check.
    assert "hold different weights" not in proc.stderr


def test_resume_refuses_another_number_of_processes(tmp_path):
    import gin

    from generative_recommenders.config import ConfigError
    from generative_recommenders.trainer import train_fn

    train_tiny(tmp_path, ["train_fn.num_epochs = 1"])
    gin.parse_config(TINY + [f"train_fn.exp_root = '{tmp_path}/exps'", f"train_fn.ckpt_root = '{tmp_path}/ckpts'",
                             "train_fn.run_name = 'run'", "train_fn.num_epochs = 2"])
    try:
        with pytest.raises(ConfigError, match="written by 1 process\\(es\\), this run has 2"):
            train_fn(0, 2)  # refused before any process group is needed
    finally:
        gin.clear_config()


def test_books_rule_full_evaluation_every_nth_and_last_epoch():
    from generative_recommenders.config import TrainConfig
    from generative_recommenders.trainer import eval_samples, is_full_eval

    config = TrainConfig(num_epochs=201, full_eval_every_n=5)
    full = [e for e in range(201) if is_full_eval(e, config)]
    assert full == list(range(0, 201, 5)) and len(full) == 41
    assert [is_full_eval(e, TrainConfig(num_epochs=7, full_eval_every_n=5)) for e in range(7)] == \
        [True, False, False, False, False, True, True]
    samples = np.stack([np.arange(100), np.full(100, 5)], axis=1)
    # A full evaluation covers every sample once across ranks; a partial one a shuffled share per epoch.
    shares = [eval_samples(samples, 3, 42, rank, 2, True) for rank in range(2)]
    assert sorted(np.concatenate(shares)[:, 0].tolist()) == list(range(100))
    first, second = eval_samples(samples, 1, 42, 0, 1, False), eval_samples(samples, 2, 42, 0, 1, False)
    assert sorted(first[:, 0].tolist()) == list(range(100)) and first[:, 0].tolist() != second[:, 0].tolist()


def test_partial_epochs_evaluate_the_configured_batches_and_never_select_the_best(tmp_path, monkeypatch):
    from generative_recommenders.tasks.retrieval import RetrievalTask

    calls = []
    original = RetrievalTask.evaluate

    def spy(self, samples, max_batches=None):
        calls.append((samples.shape[0], max_batches))
        return original(self, samples, max_batches)

    monkeypatch.setattr(RetrievalTask, "evaluate", spy)
    results = train_tiny(tmp_path, ["train_fn.num_epochs = 4", "train_fn.full_eval_every_n = 3",
                                    "train_fn.partial_eval_num_batches = 2", "train_fn.eval_batch_size = 16"])
    assert [e["full_eval"] for e in results["per_epoch"]] == [True, False, False, True]
    num_eval = calls[0][0]
    assert calls == [(num_eval, None), (num_eval, 2), (num_eval, 2), (num_eval, None)]
    assert results["best"]["full_eval"] is True


def test_linear_warmup_of_the_learning_rate(tmp_path):
    from generative_recommenders.config import TrainConfig
    from generative_recommenders.trainer import warmup_lr

    config = TrainConfig(learning_rate=1e-3, num_warmup_steps=10)
    assert [warmup_lr(config, s) for s in (0, 4, 9, 50)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3])
    assert warmup_lr(TrainConfig(num_warmup_steps=0), 0) == 1e-3
    results = train_tiny(tmp_path, ["train_fn.num_epochs = 2", "train_fn.num_warmup_steps = 1000"])
    steps_per_epoch = -(-results["data"]["users"] // 64)  # every tiny user has a training sample
    assert [e["lr"] for e in results["per_epoch"]] == pytest.approx(
        [1e-3 * steps_per_epoch / 1000, 1e-3 * 2 * steps_per_epoch / 1000])


class _PlantsAMarker:
    """Unpickling this runs os.system: what a shared, malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_garbage_checkpoint_is_refused_without_advising_unsafe_loading(tmp_path):
    from generative_recommenders.config import ConfigError

    ckpt = tmp_path / "ckpts/synthetic-l20/run/last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(ConfigError, match="cannot be loaded safely") as info:
        train_tiny(tmp_path)
    assert "weights_only" not in str(info.value) and "--fresh" in str(info.value)


def test_loading_a_checkpoint_never_runs_code_from_it(tmp_path):
    import torch

    from generative_recommenders.config import ConfigError

    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "ckpts/synthetic-l20/run/last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "state": {"payload": _PlantsAMarker(marker)}}, ckpt)
    with pytest.raises(ConfigError, match="cannot be loaded safely") as info:
        train_tiny(tmp_path)
    assert "weights_only" not in str(info.value)  # torch's advice to load it unsafely is never passed on
    assert not marker.exists()
    # The same file through plain pickle would have run the command: the test's bait is real.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loss", ["SampledSoftmaxLoss", "BCELoss", "FullSoftmaxLoss", "BPRLoss", "BPRMaxLoss"])
@pytest.mark.parametrize("module", ["HSTU", "SASRec", "GRU4Rec", "BERT4Rec", "FuXi"])
def test_every_encoder_trains_and_evaluates_with_every_loss(tmp_path, module, loss):
    extra = ["train_fn.temperature = 1.0"] if loss == "BCELoss" else []
    results = train_tiny(tmp_path, [f"train_fn.main_module = '{module}'", f"train_fn.loss_module = '{loss}'",
                                    "train_fn.num_epochs = 1", "synthetic_data.num_users = 200", *extra])
    epoch = results["per_epoch"][0]
    assert np.isfinite(epoch["train_loss"]) and epoch["train_loss"] > 0
    assert 0.0 <= epoch["eval"]["hr@10"] <= epoch["eval"]["hr@50"] <= 1.0
    assert results["loss_module"] == loss and results["main_module"] == module


def test_session_data_trains_and_evaluates_every_test_event(tmp_path):
    from generative_recommenders.data.sequence_store import SequenceData, save_sequences
    from generative_recommenders.data.synthetic import generate_synthetic

    base = generate_synthetic(num_users=300, num_items=100, min_length=2, max_length=8)
    split = np.random.default_rng(0).choice([0, 0, 0, 1, 2], base.num_users).astype(np.int8)
    save_sequences(SequenceData(**{**base.__dict__, "name": "tiny-sessions", "user_split": split}),
                   tmp_path / "data/tiny-sessions/sequences.npz")
    results = train_tiny(tmp_path, ["train_fn.dataset_name = 'tiny-sessions'", f"train_fn.data_dir = '{tmp_path}/data'",
                                    "train_fn.protocol = 'sessions'", "train_fn.selection_metric = 'mrr@20'",
                                    "train_fn.num_epochs = 2", "train_fn.main_module = 'GRU4Rec'"])
    assert results["best"]["selected_by"] == "valid/mrr@20"
    assert set(results["per_epoch"][0]) >= {"valid", "test"}
    assert 0.0 < results["best"]["test"]["hr@20"] <= 1.0


@pytest.mark.parametrize("module", ["HSTU", "SASRec"])
def test_generative_ranking_trains_and_reports_auc_beside_its_baselines(tmp_path, module):
    results = train_tiny(tmp_path, ["train_fn.task = 'ranking'", "train_fn.dataset_name = 'synthetic-ratings'",
                                    "synthetic_ratings.num_users = 300", f"train_fn.main_module = '{module}'",
                                    "train_fn.num_epochs = 2", "ranking_objective.next_item_weight = 1.0"])
    assert results["task"] == "ranking" and results["best"]["selected_by"] == "valid/auc"
    best = results["best"]["test"]
    assert 0.0 <= best["auc"] <= 1.0 and best["ne"] > 0 and best["candidates"] > 0
    assert set(results["baselines"]["test"]) == {"item-mean", "user+item-bias"}
    assert np.isfinite(results["per_epoch"][-1]["train_loss"])


RANKING = ["train_fn.task = 'ranking'", "train_fn.dataset_name = 'synthetic-ratings'",
           "synthetic_ratings.num_users = 200", "train_fn.num_epochs = 1"]


def _metric_records(results: dict) -> list:
    records = [e[s] for e in results["per_epoch"] for s in ("valid", "test")]
    return records + [m for split in results["baselines"].values() for m in split.values()]


def test_ranking_results_leave_undefined_metrics_out_and_say_why_once(tmp_path):
    """One candidate per user: no per-user metric is defined; results.json leaves them out (no NaN, no null)
    and gives the reason once; selecting by one of them is refused."""
    from generative_recommenders.config import ConfigError

    train_tiny(tmp_path, RANKING)

    def no_constants(token: str):
        raise AssertionError(f"non-strict JSON token {token}")

    saved = json.loads((tmp_path / "exps/synthetic-ratings-l20/run/results.json").read_text(),
                       parse_constant=no_constants)
    assert set(saved["undefined_metrics"]) == {"user_auc", "ndcg@10"}
    assert "no user has two candidates of different labels" in saved["undefined_metrics"]["ndcg@10"]
    for record in _metric_records(saved):
        assert "ndcg@10" not in record and "user_auc" not in record and record["users_averaged"] == 0
        assert all(isinstance(v, float) and np.isfinite(v) for v in record.values())
    with pytest.raises(ConfigError, match="'ndcg@10' is undefined here"):
        train_tiny(tmp_path / "b", RANKING + ["train_fn.selection_metric = 'ndcg@10'"])


def test_ranking_holdout_reports_per_user_metrics_and_the_evaluation_timing(tmp_path):
    results = train_tiny(tmp_path, RANKING + ["train_fn.ranking_holdout = 3", "train_fn.ranking_timing_users = 50",
                                              "train_fn.selection_metric = 'user_auc'"])
    assert "undefined_metrics" not in results and results["best"]["selected_by"] == "valid/user_auc"
    for record in _metric_records(results):
        assert 0 <= record["user_auc"] <= 1 and 0 < record["ndcg@10"] <= 1
        assert 0 < record["users_averaged"] <= record["candidates"] / 3
    timing = results["evaluation_timing"]
    assert timing["users"] == 50 and timing["candidates"] == 150
    assert timing["m_falcon"]["speedup"] > 0 and timing["m_falcon"]["max_abs_diff_liked_prob"] < 1e-5


def test_report_tables_of_every_kind_of_run(tmp_path):
    from generative_recommenders.report import groups, seed_spread, table

    runs = [train_tiny(tmp_path / "a", ["train_fn.num_epochs = 1"]),
            train_tiny(tmp_path / "b", ["train_fn.num_epochs = 1", "train_fn.random_seed = 7"], run_name="seed7"),
            train_tiny(tmp_path / "c", ["train_fn.num_epochs = 1", "train_fn.task = 'ranking'",
                                        "train_fn.dataset_name = 'synthetic-ratings'",
                                        "synthetic_ratings.num_users = 200"])]
    grouped = groups(runs)
    assert [len(g) for g in grouped] == [2, 1]  # synthetic retrieval, then synthetic-ratings ranking
    retrieval, ranking = (table(g) for g in grouped)
    assert "AUC" in ranking and "item-mean baseline" in ranking
    assert "HR@10" in retrieval and "(seed7)" in retrieval and "best 1" in retrieval
    assert "2 runs" in seed_spread(grouped[0])


def test_early_stopping_ends_the_run_after_patience_epochs_without_a_better_validation_metric(tmp_path):
    from generative_recommenders.config import ConfigError, TrainConfig

    # A learning rate too small to move the model: validation stalls, the run stops after the patience.
    results = train_tiny(tmp_path, ["train_fn.protocol = 'leave_one_out'", "train_fn.num_epochs = 20",
                                    "train_fn.early_stopping_patience = 2", "train_fn.learning_rate = 1e-9"])
    epochs = [e["epoch"] for e in results["per_epoch"]]
    best = results["best"]["epoch"]
    assert len(epochs) < 20 and epochs[-1] - best == 2
    with pytest.raises(ConfigError, match="validation split"):
        TrainConfig(early_stopping_patience=3).validate()  # the paper protocol has none


def test_hyperparameters_and_best_metrics_reach_the_hparams_tab_of_the_run_itself(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    results = train_tiny(tmp_path, ["train_fn.num_epochs = 2", "train_fn.main_module = 'SASRec'"])
    run_dir = tmp_path / "exps/synthetic-l20/run"
    assert not [p for p in run_dir.iterdir() if p.is_dir()]  # no sub-run splitting the run in TensorBoard
    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = {tag: HParamsPluginData.FromString(data) for tag, data in events.PluginTagToContent("hparams").items()}
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    hparams = content["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["model"].string_value == "SASRec" and hparams["loss"].string_value == "SampledSoftmaxLoss"
    assert hparams["dataset"].string_value == "synthetic" and hparams["protocol"].string_value == "paper"
    assert (hparams["dim"].number_value, hparams["negatives"].number_value) == (16, 32)
    assert hparams["lr"].number_value == pytest.approx(1e-3) and hparams["dropout"].number_value == pytest.approx(0.2)
    tags = [m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos]
    assert "best/eval/ndcg@10" in tags and "best/eval/hr@10" in tags
    for tag in tags:  # the tab shows each metric's latest value: the best epoch's
        assert events.Scalars(tag)[-1].value == pytest.approx(results["best"]["eval"][tag.split("/")[-1]])


def test_progress_lines_come_at_most_every_interval(monkeypatch):
    import re

    import torch

    from generative_recommenders import progress as progress_module

    clock = iter([0.0, 1.0, 5.0, 10.5, 12.0, 19.0, 21.0, 30.0, 45.0])  # the start, then one reading per step
    monkeypatch.setattr(progress_module.time, "time", lambda: next(clock))
    lines = []
    progress = progress_module.Progress("epoch 1/3", 8, lines.append)
    for step in range(1, 9):
        progress.update(step, torch.device("cpu"))
    assert [re.match(r"  epoch 1/3: (\d+)/8 steps, [\d.]+ steps/s, ETA \d+s$", l).group(1) for l in lines] == ["3", "6"]


def test_long_epochs_print_progress_and_short_ones_only_their_line(tmp_path, monkeypatch, capsys):
    from generative_recommenders import progress

    train_tiny(tmp_path / "short", ["train_fn.num_epochs = 1"])
    assert "steps/s" not in capsys.readouterr().out  # 10 steps in well under PROGRESS_EVERY_S
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # every step is "long enough"
    train_tiny(tmp_path / "long", ["train_fn.num_epochs = 1"])
    progress = [l for l in capsys.readouterr().out.splitlines() if "steps/s" in l]
    assert [l.split(",")[0] for l in progress] == [f"  epoch 1/1: {i}/10 steps" for i in range(1, 10)]
