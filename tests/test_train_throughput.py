"""benchmarks/train_throughput.py on CPU: every kind of frozen config it meets in an all-configs run."""

from __future__ import annotations

import gin
import pytest
import torch

from benchmarks import train_throughput as bench_mod


@pytest.fixture
def small_ml1m(monkeypatch):
    """Tiny ml-1m-shaped random data and one step of each kind, so a config takes seconds on CPU."""
    monkeypatch.setitem(bench_mod.SHAPES, "ml-1m", (64, 300, 280, 12.0, 40))
    flags = bench_mod.FLAGS
    if not flags.is_parsed():
        flags(["train_throughput"])
    values = dict(steps=1, warmup=1, eval_batches=1,
                  binding=["train_fn.max_sequence_length = 20", "train_fn.local_batch_size = 8",
                           "train_fn.eval_batch_size = 8"])
    saved = {name: getattr(flags, name) for name in values}
    for name, value in values.items():  # absl flags: set and restore by value (monkeypatch would delete them)
        setattr(flags, name, value)
    yield
    for name, value in saved.items():
        setattr(flags, name, value)
    gin.clear_config()


@pytest.mark.parametrize("config", ["configs/ml-1m/hstu-sampled-softmax-n128-final.gin",
                                    "configs/ml-1m/bert4rec-full-softmax-converged.gin"])
def test_paper_and_leave_one_out_configs_are_timed(small_ml1m, config):
    result = bench_mod.bench(config, torch.device("cpu"))
    assert result["steps_per_s"] > 0 and result["eval_batches_per_s"] > 0
    assert result["projected_recipe_minutes"] > 0


def test_ranking_configs_are_skipped_with_a_note(small_ml1m):
    result = bench_mod.bench("configs/ml-1m/hstu-ranking-final.gin", torch.device("cpu"))
    assert "skipped" in result and "ranking" in result["skipped"]
