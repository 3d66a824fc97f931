"""Run names (main.py): config stem + protocol + a hash of the changed settings; the same command resumes,
a changed setting starts a new run, --fresh starts the run over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import gin

import main
from tiny_config import DEFAULT_CONFIG, REPO, TINY, free_port, run_name_of


def test_the_name_is_the_config_stem_plus_what_the_bindings_change():
    assert run_name_of([]) == "hstu-default"
    assert run_name_of(["train_fn.learning_rate = 1e-3"]) == "hstu-default"  # the file's own value
    changed = run_name_of(["train_fn.learning_rate = 3e-3"])
    assert changed.startswith("hstu-default-") and len(changed) == len("hstu-default-") + 6
    assert run_name_of(["train_fn.learning_rate = 0.003"]) == changed  # values, not their spelling
    assert run_name_of(["train_fn.learning_rate = 3e-3", "train_fn.dropout_rate = 0.3"]) == \
        run_name_of(["train_fn.dropout_rate = 0.3", "train_fn.learning_rate = 3e-3"])
    assert run_name_of(["train_fn.learning_rate = 3e-3", "train_fn.dropout_rate = 0.3"]) != changed
    # Where the run is written and what it may change while resuming do not name it.
    assert run_name_of(["train_fn.num_epochs = 3", "train_fn.exp_root = '/x'", "train_fn.ckpt_root = '/y'",
                        "train_fn.resume = False", "train_fn.run_name = 'mine'"]) == "hstu-default"
    assert run_name_of(["train_fn.protocol = 'leave_one_out'"]) == "hstu-default-leave-one-out"
    assert run_name_of(["train_fn.protocol = 'leave_one_out'", "train_fn.learning_rate = 3e-3"]) == \
        f"hstu-default-leave-one-out-{changed.rsplit('-', 1)[1]}"
    # The protocol a config file sets names its runs too.
    assert run_name_of([], "configs/rsc15-100k/gru4rec-full-softmax.gin") == "gru4rec-full-softmax-sessions"


def _launch(tmp: Path, bindings: List[str], fresh: bool = False) -> None:
    where = [f"train_fn.exp_root = '{tmp}/exps'", f"train_fn.ckpt_root = '{tmp}/ckpts'"]
    try:
        main.launch(str(REPO / DEFAULT_CONFIG), TINY + where + bindings, 1, free_port(), fresh)
    finally:
        gin.clear_config()


def _epochs(tmp: Path, bindings: List[str]) -> int:
    results = json.loads((tmp / "exps/synthetic-l20" / run_name_of(TINY + bindings) / "results.json").read_text())
    return len(results["per_epoch"])


def test_same_command_resumes_a_changed_setting_starts_a_new_run_and_fresh_restarts(tmp_path, capsys):
    one, two, other = ["train_fn.num_epochs = 1"], ["train_fn.num_epochs = 2"], ["train_fn.learning_rate = 3e-3"]
    _launch(tmp_path, one)
    _launch(tmp_path, one)
    assert "resuming" in capsys.readouterr().out
    _launch(tmp_path, two)  # more epochs: the same run, continued
    assert "resuming" in capsys.readouterr().out and _epochs(tmp_path, one) == 2
    _launch(tmp_path, one + other)
    assert "resuming" not in capsys.readouterr().out and _epochs(tmp_path, one + other) == 1
    names = {run_name_of(TINY + one), run_name_of(TINY + one + other)}
    assert len(names) == 2
    assert {p.name for p in (tmp_path / "exps/synthetic-l20").iterdir()} == names
    assert {p.name for p in (tmp_path / "ckpts/synthetic-l20").iterdir()} == names
    _launch(tmp_path, one, fresh=True)
    out = capsys.readouterr().out
    assert "--fresh: removed" in out and "resuming" not in out
    assert _epochs(tmp_path, one) == 1  # started over: the two earlier epochs are gone
    assert _epochs(tmp_path, one + other) == 1  # the other run is untouched


def test_an_explicit_run_name_wins_and_fresh_removes_that_run(tmp_path, capsys):
    named = ["train_fn.num_epochs = 1", "train_fn.run_name = 'mine'"]
    _launch(tmp_path, named)
    _launch(tmp_path, named, fresh=True)
    out = capsys.readouterr().out
    assert f"--fresh: removed {tmp_path}/exps/synthetic-l20/mine" in out
    assert [p.name for p in (tmp_path / "exps/synthetic-l20").iterdir()] == ["mine"]


def test_the_readme_names_its_example_runs_as_main_py_does():
    import re
    import shlex

    section = (REPO / "README.md").read_text().split("## Using a trained model", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"^(python3 main\.py.*?)\s+# .*?(hstu-default[\w-]*)", section, flags=re.M)
    assert len(examples) == 4
    for command, name in examples:
        bindings = [arg.split("=", 1)[1] for arg in shlex.split(command) if arg.startswith("--gin_bindings=")]
        assert run_name_of(bindings) == name, command
