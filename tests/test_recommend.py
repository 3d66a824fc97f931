"""Using a trained run: recommend.py (top-k per user or session prefix) and export.py (embeddings for faiss),
on tiny CPU runs laid out as the README's commands expect them."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict

import gin
import numpy as np
import pytest
import torch

from generative_recommenders.config import ConfigError
from generative_recommenders.data.samples import DeviceSequences
from generative_recommenders.data.sequence_store import SPLIT_TEST, SequenceData, save_sequences
from generative_recommenders.data.synthetic import generate_synthetic
from generative_recommenders.evaluation.retrieval import Evaluator
from generative_recommenders.export import embeddings
from generative_recommenders.recommend import recommend, session_times
from generative_recommenders.trained_run import TrainedRun, load_run, user_rows
from tiny_config import REPO, cpu_env, train_tiny

DEFAULT_RUN = "exps/synthetic-l50/hstu-default"  # where `python3 main.py` puts its run (the README's example)
SESSION_RUN = "exps/rsc15-100k-l50/gru4rec-full-softmax-sessions"
PREFIX = ["214716935", "214832672"]  # rsc15 item ids, the README's session example
CPU = torch.device("cpu")


def _session_data() -> SequenceData:
    """A tiny session data set under rsc15-100k's name, its items keyed like rsc15's (PREFIX among them)."""
    base = generate_synthetic(num_users=300, num_items=100, min_length=2, max_length=8)
    split = np.random.default_rng(0).choice([0, 0, 0, 1, 2], base.num_users).astype(np.int8)
    keys = np.array(["", *PREFIX, *(str(215000000 + i) for i in range(3, base.max_item_id + 1))])
    return SequenceData(**{**base.__dict__, "name": "rsc15-100k", "user_split": split, "item_keys": keys})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory holding a user run (best epoch 1, last epoch 3) and a session run, at the README's paths.

    Every epoch's hr@1000 is 1.0 on 300 candidates, so selecting by it keeps the first epoch as the best."""
    tmp = tmp_path_factory.mktemp("use")
    train_tiny(tmp, ["train_fn.max_sequence_length = 50", "train_fn.selection_metric = 'hr@1000'"],
               run_name="hstu-default")
    save_sequences(_session_data(), tmp / "tmp/rsc15-100k/sequences.npz")
    train_tiny(tmp, ["train_fn.dataset_name = 'rsc15-100k'", f"train_fn.data_dir = '{tmp}/tmp'",
                     "train_fn.protocol = 'sessions'", "train_fn.selection_metric = 'mrr@20'",
                     "train_fn.main_module = 'GRU4Rec'", "train_fn.max_sequence_length = 50",
                     "train_fn.num_epochs = 1"], run_name="gru4rec-full-softmax-sessions")
    return tmp


@pytest.fixture(scope="module")
def hstu_session_run(tmp_path_factory) -> Path:
    """HSTU (time bias on) trained for an epoch on the tiny session data set."""
    tmp = tmp_path_factory.mktemp("hstu-sessions")
    save_sequences(_session_data(), tmp / "tmp/rsc15-100k/sequences.npz")
    train_tiny(tmp, ["train_fn.dataset_name = 'rsc15-100k'", f"train_fn.data_dir = '{tmp}/tmp'",
                     "train_fn.protocol = 'sessions'", "train_fn.selection_metric = 'mrr@20'",
                     "train_fn.main_module = 'HSTU'", "train_fn.num_epochs = 1"], run_name="hstu-sessions")
    return tmp / "exps/rsc15-100k-l20/hstu-sessions"


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bert")
    train_tiny(tmp, ["train_fn.main_module = 'BERT4Rec'", "train_fn.num_epochs = 2"])
    return tmp / "exps/synthetic-l20/run"


def _load(run_dir: Path, which: str = "best") -> TrainedRun:
    try:
        return load_run(str(run_dir), which, CPU)
    finally:
        gin.clear_config()


def _appended(data: SequenceData, items: np.ndarray) -> SequenceData:
    """Each user's sequence followed by one more item, at the time of their last interaction."""
    ids = [np.append(data.sequence(u), items[u]) for u in range(data.num_users)]
    stamps = [np.append(t, t[-1]) for t in np.split(data.timestamps, data.offsets[1:-1])]
    lengths = np.array([len(s) for s in ids])
    return SequenceData(name="appended", item_ids=np.concatenate(ids).astype(np.int32),
                        ratings=np.ones(lengths.sum(), np.float32), timestamps=np.concatenate(stamps),
                        offsets=np.concatenate([[0], np.cumsum(lengths)]), user_ids=data.user_ids,
                        candidate_ids=data.candidate_ids)


def _evaluator_top_hit_rate(run: TrainedRun, data: SequenceData, filter_history: bool) -> float:
    """HR@1 of the evaluation (the trainer's Evaluator) with each sequence's last item as its target."""
    evaluator = Evaluator(run.task.model, run.task.objective.query, DeviceSequences(data, CPU), run.task.index,
                          run.config.max_sequence_length, run.config.eval_batch_size, filter_history=filter_history)
    samples = np.stack([np.arange(data.num_users), data.lengths], axis=1)
    return evaluator(samples)["hr@1"]


@pytest.mark.parametrize("model", ["HSTU", "BERT4Rec"])  # a causal query and a [MASK] query
def test_every_users_top_item_is_the_one_the_evaluator_ranks_first(workdir, bert_run, model):
    run = _load(workdir / DEFAULT_RUN if model == "HSTU" else bert_run)
    table = recommend(run, k=1)
    assert table.user_id.tolist() == run.data.user_ids.tolist()
    assert _evaluator_top_hit_rate(run, _appended(run.data, table.item_id.to_numpy()), True) == 1.0


def test_history_items_are_removed_as_in_evaluation_and_scores_decrease(workdir):
    run = _load(workdir / DEFAULT_RUN)
    candidates = run.task.index.num_candidates
    table = recommend(run, k=candidates, user_ids=[3, 1, 2])
    assert table.user_id.unique().tolist() == [3, 1, 2]
    for user, row in zip([3, 1, 2], user_rows(run.data, [3, 1, 2])):
        items = table[table.user_id == user]
        window = set(run.data.sequence(row)[-run.config.max_sequence_length:].tolist())  # what the model read
        assert not window & set(items.item_id)
        assert len(items) == candidates - len(window)  # every other candidate is ranked
        assert items["rank"].tolist() == list(range(1, len(items) + 1))
        assert (np.diff(items.score.to_numpy()) <= 0).all() and items.score.iloc[0] > items.score.iloc[-1]


def test_exported_embeddings_reproduce_the_recommended_order(workdir):
    run = _load(workdir / DEFAULT_RUN)
    arrays = embeddings(run)
    items, users = arrays["item_embeddings"], arrays["user_embeddings"]
    for matrix in (items, users):  # what faiss takes as it is
        assert matrix.dtype == np.float32 and matrix.flags.c_contiguous
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)
    assert arrays["item_ids"].tolist() == run.data.candidate_ids.tolist()
    assert arrays["user_ids"].tolist() == run.data.user_ids.tolist() and users.shape[0] == run.data.num_users
    k = 10
    recommended = recommend(run, k).item_id.to_numpy().reshape(-1, k)
    scores = users @ items.T
    for row in range(run.data.num_users):  # remove what recommend.py removes: the history the model read
        seen = run.data.sequence(row)[-run.config.max_sequence_length:]
        scores[row, np.searchsorted(arrays["item_ids"], seen)] = -np.inf
    columns = np.searchsorted(arrays["item_ids"], recommended)
    chosen = np.take_along_axis(scores, columns, axis=1)
    assert (np.diff(chosen, axis=1) <= 1e-6).all()  # the dot products put them in the recommended order
    np.put_along_axis(scores, columns, -np.inf, axis=1)
    assert (chosen[:, -1] >= scores.max(axis=1) - 1e-6).all()  # and nothing else ranks above the k-th


def test_best_and_last_epochs_read_their_own_checkpoints(workdir, tmp_path):
    best, last = _load(workdir / DEFAULT_RUN, "best"), _load(workdir / DEFAULT_RUN, "last")
    assert (best.epoch, best.checkpoint.name, last.epoch, last.checkpoint.name) == (0, "best.pt", 2, "last.pt")
    for run in (best, last):
        saved = torch.load(run.checkpoint, weights_only=True)["model"]
        assert all(torch.equal(run.task.model.state_dict()[name], saved[name]) for name in saved)
    assert not np.allclose(recommend(best, 5, [1]).score, recommend(last, 5, [1]).score)


def test_a_checkpoint_of_another_epoch_or_configuration_is_refused(workdir, tmp_path):
    import shutil

    train_tiny(tmp_path, ["train_fn.num_epochs = 2", "train_fn.selection_metric = 'hr@1000'"])  # best 1, last 2
    run_dir, ckpt = tmp_path / "exps/synthetic-l20/run", tmp_path / "ckpts/synthetic-l20/run"
    shutil.copy(workdir / "ckpts/synthetic-l50/hstu-default/best.pt", ckpt / "best.pt")  # epoch 1 too
    with pytest.raises(ConfigError, match="best.pt belongs to another configuration or data set than"):
        _load(run_dir, "best")
    shutil.copy(ckpt / "last.pt", ckpt / "best.pt")
    with pytest.raises(ConfigError, match="best.pt holds epoch 2, but .* records 1 as the best epoch"):
        _load(run_dir, "best")


def test_a_session_prefix_gets_its_next_items_with_nothing_removed(workdir):
    run = _load(workdir / SESSION_RUN)
    candidates = run.task.index.num_candidates
    table = recommend(run, k=candidates, session=PREFIX)
    assert "user_id" not in table and len(table) == candidates  # the prefix's own items are ranked too
    assert set(PREFIX) <= set(table.item_id) and table["rank"].tolist() == list(range(1, candidates + 1))
    assert (np.diff(table.score.to_numpy()) <= 0).all()
    # The top item is what the session evaluation (nothing removed) ranks first after this prefix.
    ids = {key: item for item, key in enumerate(run.data.item_keys.tolist())}
    session = np.array([ids[PREFIX[0]], ids[PREFIX[1]], ids[table.item_id.iloc[0]]], dtype=np.int32)
    data = SequenceData(name="prefix", item_ids=session, ratings=np.ones(3, np.float32),
                        timestamps=np.zeros(3, np.int64), offsets=np.array([0, 3]), user_ids=np.zeros(1, np.int64),
                        candidate_ids=run.data.candidate_ids)
    assert _evaluator_top_hit_rate(run, data, False) == 1.0
    with pytest.raises(ConfigError, match="item key\\(s\\) 999 are not items of rsc15-100k"):
        recommend(run, 3, session=["999"])
    with pytest.raises(ConfigError, match="--session needs a run on session data"):
        recommend(_load(workdir / DEFAULT_RUN), 3, session=PREFIX)


def test_a_timed_session_prefix_is_ranked_as_the_evaluation_ranks_it(hstu_session_run):
    """The clicks at their times and the request at the target's: the evaluation's scores of that event."""
    run = _load(hstu_session_run)
    data, candidates = run.data, run.task.index.num_candidates
    session = int(np.flatnonzero((data.user_split == SPLIT_TEST) & (data.lengths >= 4))[0])
    end = int(data.lengths[session])  # the event: the session's last click after the ones before it
    rows = data.offsets[session] + np.arange(end)
    keys = data.item_keys[data.item_ids[rows[:-1]]].tolist()
    table = recommend(run, k=candidates, session=keys, times=data.timestamps[rows].tolist())
    batch = DeviceSequences(data, CPU).batch(np.array([[session, end]]), run.config.max_sequence_length,
                                             run.task.model.max_seq_len)
    with torch.no_grad():
        run.task.evaluator.refresh_candidates()
        values, columns = run.task.evaluator.score(batch)[1].topk(candidates, dim=1)
    assert table.item_id.tolist() == data.item_keys[run.task.index.candidate_ids[columns[0]]].tolist()
    np.testing.assert_allclose(table.score.to_numpy(), values[0].numpy(), rtol=1e-6)
    # HSTU's time bias reads the times: every click at time 0 (the old behaviour) scores otherwise.
    untimed = recommend(run, k=candidates, session=keys)
    assert not np.allclose(untimed.sort_values("item_id").score, table.sort_values("item_id").score)


def test_session_times_stamp_clicks_and_the_request():
    assert [t.tolist() if isinstance(t, np.ndarray) else t for t in session_times(3, gap=60.5)] == [[0, 60, 121], 181]
    clicks, request = session_times(2, [100.7, 160.2])
    assert clicks.tolist() == [100, 160] and request == 160  # the request defaults to the last click's time
    assert session_times(2, [100, 160, 400])[1] == 400
    assert session_times(2)[0].tolist() == [0, 0]
    with pytest.raises(ConfigError, match="3 times for 1 clicks"):
        session_times(1, [1, 2, 3])
    with pytest.raises(ConfigError, match="must not decrease"):
        session_times(2, [5, 1])
    with pytest.raises(ConfigError, match="not both"):
        session_times(2, [1, 2], 60)


def _readme_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("## Using a trained model", 1)[1].split("\n## ", 1)[0]


def _fake_faiss() -> types.ModuleType:
    """faiss.IndexFlatIP's contract, for machines without faiss: float32, C-contiguous rows of its dimension."""
    def check(x: np.ndarray, d: int) -> None:
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 2 and x.shape[1] == d

    class IndexFlatIP:
        def __init__(self, d: int) -> None:
            self.d, self.vectors = d, np.zeros((0, d), np.float32)

        def add(self, x: np.ndarray) -> None:
            check(x, self.d)
            self.vectors = np.concatenate([self.vectors, x])

        def search(self, x: np.ndarray, k: int):
            check(x, self.d)
            scores = x @ self.vectors.T
            rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, rows, axis=1), rows

    return types.SimpleNamespace(IndexFlatIP=IndexFlatIP)


def test_readme_commands_run_as_written(workdir, monkeypatch):
    section = _readme_section().replace("\\\n", " ")
    commands = [line.strip() for line in section.splitlines()
                if line.strip().startswith("python3 -m generative_recommenders.")]
    assert {re.match(r"python3 -m generative_recommenders\.(\w+)", c).group(1) for c in commands} == \
        {"recommend", "export"}
    assert any("--session=" in c for c in commands)
    env = {**cpu_env(), "PYTHONPATH": str(REPO)}
    for command in commands:
        proc = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(workdir)
    try:
        import faiss  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "faiss", _fake_faiss())
    namespace: Dict[str, object] = {}
    exec(snippet, namespace)
    assert namespace["rows"].shape == (3, 10)


@pytest.mark.parametrize("args, message", [
    (["--users=1,999999"], "unknown user id(s) 999999 in synthetic"),
    (["--users=1", "--all"], "give exactly one of --users"),
    (["--all", "--out=recs.json"], "--out must end in .csv or .parquet"),
    (["--all", "--epoch=last", "--run_dir=exps/none"], "exps/none/results.json not found"),
])
def test_command_line_faults_are_one_line_errors(workdir, args, message):
    proc = subprocess.run([sys.executable, "-m", "generative_recommenders.recommend", f"--run_dir={DEFAULT_RUN}",
                           *args], cwd=workdir, env={**cpu_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in proc.stderr


def _recommend_cli(workdir: Path, args, fault: str = "") -> subprocess.CompletedProcess:
    env = {**cpu_env(), "PYTHONPATH": str(REPO), "GR_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "generative_recommenders.recommend", f"--run_dir={DEFAULT_RUN}",
                           *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def test_a_full_disk_leaves_the_old_output_and_no_partial_file(workdir, tmp_path):
    """The write fails as on a full disk (ENOSPC through faults.fill_disk_if, after the temporary is written):
    one line naming the file, status 1, the earlier recs.csv untouched and no temporary left beside it."""
    out = tmp_path / "recs.csv"
    out.write_text("user_id,rank,item_id,score\n")
    proc = _recommend_cli(workdir, ["--all", f"--out={out}"], fault="enospc@recs.csv")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {out}: No space left on device"
    assert out.read_text() == "user_id,rank,item_id,score\n"
    assert [p.name for p in tmp_path.iterdir()] == ["recs.csv"]


@pytest.mark.parametrize("tool", ["recommend", "export"])
def test_an_output_in_a_missing_directory_is_refused_before_the_work(workdir, tmp_path, tool):
    """recommend and export alike: a missing directory is named, not created, before the run is loaded."""
    out = tmp_path / "missing" / ("x.csv" if tool == "recommend" else "x.npz")
    args = ["--all"] if tool == "recommend" else []
    proc = subprocess.run([sys.executable, "-m", f"generative_recommenders.{tool}", f"--run_dir={DEFAULT_RUN}",
                           *args, f"--out={out}"], cwd=workdir, env={**cpu_env(), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {out.parent}: no such directory")
    assert not out.parent.exists() and "Traceback" not in proc.stderr


def test_parquet_is_written_with_pyarrow_and_refused_clearly_without(workdir, tmp_path):
    import importlib.util

    import pandas as pd

    from generative_recommenders.recommend import check_output, write_table

    path = str(tmp_path / "recs.parquet")
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(ConfigError, match="writing .parquet needs pyarrow"):
            check_output(path)
        return
    check_output(path)
    table = recommend(_load(workdir / DEFAULT_RUN), 3, [1, 2])
    write_table(table, path)
    pd.testing.assert_frame_equal(pd.read_parquet(path), table)
