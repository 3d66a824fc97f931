"""Every gin config under configs/ parses and gives a valid TrainConfig; so do the committed runs' configs."""

from __future__ import annotations

import gin
import pytest

from tiny_config import REPO

from generative_recommenders.config import TrainConfig
from generative_recommenders.runs import parse_config

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.gin"))


def test_the_configs_are_found():
    assert len(CONFIGS) >= 40


@pytest.mark.parametrize("config_file", CONFIGS)
def test_config_parses(config_file):
    try:
        parse_config(str(REPO / config_file), [])
        config = TrainConfig()
        config.validate()
        assert config.dataset_name
    finally:
        gin.clear_config()


RESULTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "results").rglob("*.json"))


def test_committed_runs_configs_parse():
    """recommend/export rebuild a run from results.json's "config": the committed runs' still parse."""
    import json

    from generative_recommenders import tasks  # noqa: F401  (registers the model and objective configurables)
    from generative_recommenders.data import datasets  # noqa: F401  (registers the synthetic data's)

    configs = [r["config"] for r in (json.loads((REPO / p).read_text()) for p in RESULTS)
               if isinstance(r, dict) and "config" in r]
    assert configs
    for config in configs:
        try:
            gin.parse_config(config)
        finally:
            gin.clear_config()
