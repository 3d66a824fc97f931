"""Your own interaction log (data/sources/interactions.py): files of each format and column naming -> sequences,
the filters, the messages for bad input, and training, recommending and exporting under the log's own ids."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import gin
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import preprocess_public_data
from generative_recommenders.data.public_datasets import ensure_preprocessed, preprocess_interactions
from generative_recommenders.data.sequence_store import SequenceData, load_sequences
from generative_recommenders.data.sources.interactions import Options, k_core
from generative_recommenders.data.synthetic import generate_synthetic_ratings
from generative_recommenders.export import embeddings
from generative_recommenders.recommend import recommend
from generative_recommenders.trained_run import load_run
from tiny_config import train_tiny

Row = Tuple[str, str, str, str]  # user, item, time, rating as written

# alice's i3 and i2 tie at 100: file order (i3 first) is kept. bob's rows are out of time order.
ROWS: List[Row] = [("alice", "i3", "100", "5"), ("bob", "i1", "60", "3"), ("alice", "i1", "90", "4"),
                   ("alice", "i2", "100", "2"), ("bob", "i3", "50", "5")]
# Sequences as (user key, [item keys], [ratings]): users and items in ascending order of their ids.
EXPECTED = [("alice", ["i1", "i3", "i2"], [4.0, 5.0, 2.0]), ("bob", ["i3", "i1"], [5.0, 3.0])]


def quiet(message: str) -> None:
    pass


def write_text(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]], sep: str = ",") -> Path:
    text = sep.join(header) + "\n" + "".join(sep.join(row) + "\n" for row in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def sequences(data: SequenceData) -> List[Tuple[str, List[str], List[float]]]:
    users = data.user_keys if data.user_keys is not None else data.user_ids.astype(str)
    return [(str(users[u]), data.item_keys[data.sequence(u)].tolist(),
             data.ratings[data.offsets[u]:data.offsets[u + 1]].tolist()) for u in range(data.num_users)]


def build(tmp_path: Path, path: Path, options: Options = Options(), name: str = "log") -> SequenceData:
    return load_sequences(preprocess_interactions(name, path, options, tmp_path / "data", log=quiet))


def cli(tmp_path: Path, *flags: str) -> Tuple[int, str]:
    """preprocess_public_data's run() with --dataset=interactions and these flags; its status and stderr."""
    options: Dict[str, object] = {}
    name = "log"
    for flag in flags:
        key, value = flag.lstrip("-").split("=", 1)
        if key == "name":
            name = value
        else:
            options[key] = {"min_user_interactions": int, "min_item_interactions": int,
                            "min_rating": float}.get(key, str)(value)  # as absl parses them
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = preprocess_public_data.run(["interactions"], None, str(tmp_path / "data"), name,
                                            interaction_options=options)
    return status, stderr.getvalue()


# --------------------------------------------------------------------------------------------------
# Formats and column names


RECBOLE_HEADER = ("user_id:token", "item_id:token", "timestamp:float", "rating:float")
PLAIN_HEADER = ("user_id", "item_id", "timestamp", "rating")


@pytest.mark.parametrize("file_name,header,sep,options", [
    ("log.csv", PLAIN_HEADER, ",", Options()),
    ("log.tsv", PLAIN_HEADER, "\t", Options()),
    ("log.inter", RECBOLE_HEADER, "\t", Options()),  # RecBole's atomic file
    ("log.csv.gz", PLAIN_HEADER, ",", Options()),
    ("log.txt", PLAIN_HEADER, ";", Options(sep=";")),
    ("log.csv", ("customer", "sku", "ts", "stars"), ",",
     Options(user_col="customer", item_col="sku", time_col="ts", rating_col="stars")),
    ("log.inter", ("customer:token", "sku:token", "ts:float", "stars:float"), "\t",  # typed fields match by name
     Options(user_col="customer", item_col="sku", time_col="ts", rating_col="stars")),
])
def test_each_format_and_column_naming_gives_the_same_sequences(tmp_path, file_name, header, sep, options):
    data = build(tmp_path, write_text(tmp_path / file_name, header, ROWS, sep), options)
    assert sequences(data) == EXPECTED
    assert data.user_ids.tolist() == [1, 2] and data.user_keys.tolist() == ["alice", "bob"]
    assert data.item_keys.tolist() == ["", "i1", "i2", "i3"] and data.candidate_ids.tolist() == [1, 2, 3]
    assert data.timestamps.tolist() == [90, 100, 100, 50, 60]


def test_columns_in_another_order_and_extra_columns_are_fine(tmp_path):
    rows = [(time, "x", item, user) for user, item, time, _ in ROWS]
    data = build(tmp_path, write_text(tmp_path / "log.csv", ("timestamp", "note", "item_id", "user_id"), rows))
    assert [(user, items) for user, items, _ in sequences(data)] == [(u, i) for u, i, _ in EXPECTED]
    assert set(data.ratings.tolist()) == {1.0}  # no rating column: every interaction counts 1


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="Parquet needs pyarrow")
def test_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(ROWS, columns=PLAIN_HEADER).astype({"timestamp": "int64", "rating": "float64"})
    frame.to_parquet(tmp_path / "log.parquet", index=False)
    assert sequences(build(tmp_path, tmp_path / "log.parquet")) == EXPECTED


def test_integer_ids_keep_their_values_and_sort_numerically(tmp_path):
    rows = [("10", "200", "5", "1"), ("9", "30", "6", "1"), ("10", "1000", "4", "1")]
    data = build(tmp_path, write_text(tmp_path / "log.csv", PLAIN_HEADER, rows))
    assert data.user_ids.tolist() == [9, 10] and data.user_keys is None  # the ids recommend.py takes and shows
    assert data.item_keys.tolist() == ["", "30", "200", "1000"]  # numeric order, not text order
    assert sequences(data) == [("9", ["30"], [1.0]), ("10", ["1000", "200"], [1.0, 1.0])]


def test_fractional_times_sort_exactly_and_are_stored_whole(tmp_path):
    rows = [("u", "a", "10.75", "1"), ("u", "b", "10.25", "1")]
    data = build(tmp_path, write_text(tmp_path / "log.csv", PLAIN_HEADER, rows))
    assert sequences(data)[0][1] == ["b", "a"] and data.timestamps.tolist() == [10, 10]


# --------------------------------------------------------------------------------------------------
# Filters


# min 2 per user and per item: D goes (1 row), then i3 has 1 row left so C's i3 goes, then C has 1 row left
# so C's i1 goes; A and B remain. One pass of both rules would keep C.
KCORE_ROWS = [("A", "i1", "1"), ("A", "i2", "2"), ("B", "i1", "1"), ("B", "i2", "2"), ("C", "i3", "1"),
              ("C", "i1", "2"), ("D", "i3", "3")]


def test_k_core_is_applied_to_a_fixed_point(tmp_path):
    path = write_text(tmp_path / "log.csv", PLAIN_HEADER[:3], KCORE_ROWS)
    data = build(tmp_path, path, Options(min_user_interactions=2, min_item_interactions=2))
    assert [(user, items) for user, items, _ in sequences(data)] == [("A", ["i1", "i2"]), ("B", ["i1", "i2"])]
    assert data.item_keys.tolist() == ["", "i1", "i2"]  # ids 1..n over the items left
    users, items = (np.array([ord(r[0][0]) for r in KCORE_ROWS]), np.array([int(r[1][1]) for r in KCORE_ROWS]))
    keep, rounds = k_core(users, items, 2, 2)
    assert keep.tolist() == [0, 1, 2, 3] and rounds == 3
    only_users = build(tmp_path, path, Options(min_user_interactions=2), name="users-only")
    assert [user for user, _, _ in sequences(only_users)] == ["A", "B", "C"]


def test_min_rating_comes_before_the_k_core(tmp_path):
    rows = [("A", "i1", "1", "5"), ("A", "i2", "2", "1"), ("B", "i1", "1", "4"), ("B", "i2", "2", "4")]
    data = build(tmp_path, write_text(tmp_path / "log.csv", PLAIN_HEADER, rows),
                 Options(min_rating=4, min_item_interactions=2))
    assert [(user, items) for user, items, _ in sequences(data)] == [("A", ["i1"]), ("B", ["i1"])]


DUPLICATE_ROWS = [("u", "a", "10", "5"), ("u", "a", "10", "3"), ("u", "b", "10", "4"), ("u", "a", "11", "2")]


def test_duplicates_are_kept_unless_dropped_and_then_the_first_stays(tmp_path):
    path = write_text(tmp_path / "log.csv", PLAIN_HEADER, DUPLICATE_ROWS)
    assert sequences(build(tmp_path, path)) == [("u", ["a", "a", "b", "a"], [5.0, 3.0, 4.0, 2.0])]
    dropped = build(tmp_path, path, Options(drop_duplicates=True), name="dropped")
    assert sequences(dropped) == [("u", ["a", "b", "a"], [5.0, 4.0, 2.0])]  # the same item at another time stays


def test_ties_keep_file_order(tmp_path):
    rows = [("u", item, "7", "1") for item in ("z", "x", "y")] + [("u", "w", "3", "1")]
    assert sequences(build(tmp_path, write_text(tmp_path / "log.csv", PLAIN_HEADER, rows)))[0][1] == \
        ["w", "z", "x", "y"]


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, the line and the column; nothing written


@pytest.mark.parametrize("header,rows,flags,message", [
    (("user_id", "item", "timestamp"), [("1", "2", "3")], (),
     r"log.csv, line 1 \(the header\): no item column 'item_id:token or item_id' among 'user_id', 'item', "
     r"'timestamp'; name it with --item_col"),
    (PLAIN_HEADER, [("1", "2", "3", "4")], ("--time_col=ts",), r"log.csv, line 1 \(the header\): no time column 'ts'"),
    (PLAIN_HEADER[:3], [("1", "2", "3")], ("--min_rating=4",), r"log.csv, line 1 \(the header\): no rating column"),
    (PLAIN_HEADER[:3], [("1", "2", "3"), ("1", "3", "yesterday")], (),
     r"log.csv, line 3, column 'timestamp': non-numeric timestamp 'yesterday' \(expected a number"),
    (PLAIN_HEADER, [("1", "2", "3", "4"), ("1", "3", "4", "five")], (),
     r"log.csv, line 3, column 'rating': non-numeric rating 'five'"),
    (PLAIN_HEADER[:3], [("1", "2", "3"), ("1", "3", "inf")], (),
     r"log.csv, line 3, column 'timestamp': timestamp 'inf' is not a finite number"),
    (PLAIN_HEADER[:3], [("1", "2", "3"), ("", "3", "4")], (), r"log.csv, line 3, column 'user_id': empty user id"),
    (PLAIN_HEADER[:3], [("u1", "2", "3"), ("u2", "3", "")], (),
     r"log.csv, line 3, column 'timestamp': empty timestamp"),
    (PLAIN_HEADER[:3], [("1", "2", "3"), ("1", "3")], (), r"log.csv, line 3, column 'timestamp': empty timestamp"),
    (PLAIN_HEADER[:3], [("1", "2", "3"), ("1", "3", "4", "5")], (),
     r"log.csv: could not parse the file \(Error tokenizing data. C error: Expected 3 fields in line 3, saw 4\)"),
    (PLAIN_HEADER[:3], [], (), r"log.csv: the file has a header but no rows"),
    (PLAIN_HEADER[:3], [("1", "2", "3")], ("--min_user_interactions=2",),
     r"log.csv: no interactions left after the 2/1-core"),
    (PLAIN_HEADER, [("1", "2", "3", "2")], ("--min_rating=4", "--min_user_interactions=2"),
     r"log.csv: no interactions left after --min_rating=4 then the 2/1-core"),
])
def test_bad_input_gets_one_line_naming_the_place_and_writes_nothing(tmp_path, header, rows, flags, message):
    path = write_text(tmp_path / "log.csv", header, rows)
    status, stderr = cli(tmp_path, "--name=log", f"--input={path}", *flags)
    assert status == 1 and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr), stderr
    assert str(path) in stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("content,message", [(b"", "the file is empty"), (None, "no such file")])
def test_an_empty_or_missing_file(tmp_path, content, message):
    path = tmp_path / "log.csv"
    if content is not None:
        path.write_bytes(content)
    status, stderr = cli(tmp_path, f"--input={path}")
    assert status == 1 and stderr == f"ERROR: {path}: {message}\n"


def test_an_unknown_extension_needs_sep_and_flags_need_their_dataset(tmp_path, capsys):
    path = write_text(tmp_path / "log.dat", PLAIN_HEADER, ROWS)
    status, stderr = cli(tmp_path, f"--input={path}")
    assert status == 1 and "cannot tell the separator from the extension '.dat'" in stderr and "--sep" in stderr
    status, stderr = cli(tmp_path, "--min_user_interactions=0", f"--input={path}")
    assert status == 1 and "--min_user_interactions=0: must be at least 1" in stderr
    assert preprocess_public_data.run(["ml-1m"], None, str(tmp_path), None, interaction_options={"input": "x"}) == 1
    assert capsys.readouterr().err == "ERROR: --input: only for --dataset=interactions\n"


# --------------------------------------------------------------------------------------------------
# Preprocess then read back: every user's items in time order (stable), nothing lost


rows_strategy = st.lists(st.tuples(st.sampled_from(["u1", "u2", "10", "x y", "é"]),
                                   st.sampled_from(["a", "b", "7", "c,d"]), st.integers(0, 5)),
                         min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy)
def test_read_back_gives_every_users_items_in_time_order(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("prop")
    lines = ["user_id,item_id,timestamp"] + [f"{user},\"{item}\",{t}" for user, item, t in rows]
    (tmp / "log.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = build(tmp, tmp / "log.csv")
    expected: Dict[str, List[Tuple[int, str]]] = {}
    for user, item, t in rows:
        expected.setdefault(user, []).append((t, item))
    got = {user: (items, data.timestamps[data.offsets[u]:data.offsets[u + 1]].tolist())
           for u, (user, items, _) in enumerate(sequences(data))}
    assert sorted(got) == sorted(expected)  # "10" is text here: the column also holds "u1"
    for user, pairs in expected.items():
        ordered = sorted(pairs, key=lambda pair: pair[0])  # Python's sort is stable: ties keep file order
        assert got[user] == ([item for _, item in ordered], [t for t, _ in ordered])


# --------------------------------------------------------------------------------------------------
# Training on the log, and recommendations and embeddings under its own ids


def synthetic_log(path: Path, num_users: int = 200) -> Path:
    """generate_synthetic_ratings' interactions as a log with text ids (user u -> "user-u", item i -> "sku-i")."""
    data = generate_synthetic_ratings(num_users=num_users, num_items=100)
    rows = [(f"user-{data.user_ids[u]}", f"sku-{item}", str(t), f"{r:g}") for u in range(data.num_users)
            for item, t, r in zip(data.sequence(u), data.timestamps[data.offsets[u]:data.offsets[u + 1]],
                                  data.ratings[data.offsets[u]:data.offsets[u + 1]])]
    return write_text(path, RECBOLE_HEADER, rows[::-1], "\t")  # newest first: the sort must restore the order


TRAININGS = {
    **{module: [f"train_fn.main_module = '{module}'"] for module in ("HSTU", "SASRec", "GRU4Rec", "BERT4Rec")},
    **{loss: [f"train_fn.loss_module = '{loss}'"] + (["train_fn.temperature = 1.0"] if loss == "BCELoss" else [])
       for loss in ("BCELoss", "FullSoftmaxLoss", "BPRLoss", "BPRMaxLoss")},
    "leave_one_out": ["train_fn.protocol = 'leave_one_out'"],
    "ranking": ["train_fn.task = 'ranking'", "ranking_objective.next_item_weight = 1.0"],
}


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("own")
    preprocess_interactions("shop", synthetic_log(tmp / "shop.inter"), data_dir=tmp / "data", log=quiet)
    return tmp


@pytest.mark.parametrize("setting", list(TRAININGS))
def test_every_encoder_loss_protocol_and_task_trains_on_the_log(tmp_path, log_dir, setting):
    results = train_tiny(tmp_path, ["train_fn.dataset_name = 'shop'", f"train_fn.data_dir = '{log_dir}/data'",
                                    "train_fn.num_epochs = 1", *TRAININGS[setting]])
    epoch = results["per_epoch"][0]
    assert np.isfinite(epoch["train_loss"])
    metrics = results["best"]["test"] if setting == "ranking" else epoch["eval" if "eval" in epoch else "test"]
    assert 0.0 <= metrics["auc" if setting == "ranking" else "hr@10"] <= 1.0


def test_recommend_and_export_show_the_logs_own_ids(tmp_path, log_dir):
    assert ensure_preprocessed("shop", log_dir / "data")
    train_tiny(tmp_path, ["train_fn.dataset_name = 'shop'", f"train_fn.data_dir = '{log_dir}/data'",
                          "train_fn.num_epochs = 2"], run_name="shop-run")
    try:
        run = load_run(str(tmp_path / "exps/shop-l20/shop-run"), "best", torch.device("cpu"))
    finally:
        gin.clear_config()
    table = recommend(run, k=5, user_ids=["user-7", "user-3"])
    assert table.user_id.unique().tolist() == ["user-7", "user-3"]
    assert table.item_id.str.match(r"sku-\d+\Z").all()
    history = set(run.data.item_keys[run.data.sequence(run.data.user_keys.tolist().index("user-7"))].tolist())
    assert not history & set(table[table.user_id == "user-7"].item_id)  # history items are removed
    arrays = embeddings(run)
    assert arrays["user_keys"].tolist() == [f"user-{u}" for u in sorted(range(1, 201), key=str)]
    assert all(key.startswith("sku-") for key in arrays["item_keys"].tolist())
    with pytest.raises(ValueError, match=r"unknown user id\(s\) nobody in shop \(its ids are text, e\.g\. user-1, "):
        recommend(run, k=5, user_ids=["nobody"])
