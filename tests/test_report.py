"""generative_recommenders/report.py: tables of runs with different configurations in one group."""

from __future__ import annotations

from typing import Dict

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
