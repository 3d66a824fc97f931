"""scripts/method_loss_table.py: the README's method x loss rows from results files."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tiny_config import REPO

_spec = importlib.util.spec_from_file_location("method_loss_table", REPO / "scripts/method_loss_table.py")
table_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table_script)


def _results(name: str, protocol: str, module: str, loss: str, done: int, planned: int, best: int) -> dict:
    split = "eval" if protocol == "paper" else "test"
    record = lambda e, hr: {"epoch": e, split: {"hr@10": hr, "ndcg@10": hr / 2}}  # noqa: E731
    return {"run_name": name, "dataset": "ml-1m", "protocol": protocol, "main_module": module, "loss_module": loss,
            "config": f"train_fn.num_epochs = {planned}\ntrain_fn.num_negatives = 128\n", "epochs_done": done, "device": "NVIDIA H200",
            "wall_seconds": 10.0, "process_seconds": 12.4, "best": record(best, 0.3), "last": record(done - 1, 0.25)}


def test_converged_rows_replace_the_101_epoch_ones_and_say_how_they_ended(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, name, done, planned in ((old, "bert4rec-full-softmax-final", 101, 101),
                                         (new, "bert4rec-full-softmax-converged", 437, 2000)):
        (folder / "leave_one_out").mkdir(parents=True)
        (folder / "leave_one_out" / f"{name}.json").write_text(
            json.dumps(_results(name, "leave_one_out", "BERT4Rec", "FullSoftmaxLoss", done, planned, done - 21)))
    (old / "paper").mkdir()
    (old / "paper" / "fuxi-sampled-softmax-n128-final.json").write_text(
        json.dumps(_results("fuxi", "paper", "FuXi", "SampledSoftmaxLoss", 101, 101, 99)))
    loo = table_script.table([old, new], "leave_one_out").splitlines()
    assert loo[2:] == ["| BERT4Rec | full softmax | 417 / 437 (early stop) | 0.3000 | 0.1500 | 0.2500 | 0.1250 | 12 "
                       "| H200 | K&V 0.2843 / 0.1537 |"]
    assert table_script.table([old], "leave_one_out").splitlines()[2].startswith("| BERT4Rec | full softmax | 81 / 101 |")
    assert table_script.table([old, new], "paper").splitlines()[2:] == [
        "| FuXi | sampled softmax n128 | 100 / 101 | 0.3000 | 0.1500 | 0.2500 | 0.1250 | 12 | H200 |  |"]


def test_rewrite_replaces_only_the_marked_table():
    text = "intro\n<!-- method-loss-table paper -->\n| a |\n| b |\n\nafter\n"
    assert table_script.rewrite(text, "paper", "| c |") == "intro\n<!-- method-loss-table paper -->\n| c |\n\nafter\n"
    with pytest.raises(SystemExit, match="no line"):
        table_script.rewrite(text, "leave_one_out", "| c |")
