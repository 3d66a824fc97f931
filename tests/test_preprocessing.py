"""Preprocessing of the public data sets, on tiny raw files in each format written here."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from generative_recommenders.data import download as download_mod
from generative_recommenders.data import public_datasets as pd_mod
from generative_recommenders.data.download import Checksum, download
from generative_recommenders.data.public_datasets import PreprocessingError, ensure_preprocessed, preprocess
from generative_recommenders.data.sequence_store import load_sequences
from generative_recommenders.data.sources import amazon

REPO = Path(__file__).resolve().parents[1]
SHARED_ML_1M = Path(__file__).resolve().parents[2] / "shared/data/ml-1m.zip"

ML_1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"
ML_1M_MOVIES = ("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n"
                "10::GoldenEye (1995)::Action\n20::Caf\xe9 Society (1995)::Drama\n")
# User 3's rows come first in the file; user 1 has a timestamp tie (items 10 and 1 at t=100).
ML_1M_RATINGS = ("3::2::4::300\n3::1::2::200\n"
                 "1::10::5::100\n1::2::3::50\n1::1::4::100\n"
                 "2::20::1::7\n2::10::2::7\n2::1::3::5\n")


def _zip(path: Path, members: Dict[str, bytes], stored: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def ml_1m_zip(path: Path, ratings: str = ML_1M_RATINGS, movies: str = ML_1M_MOVIES, users: str = ML_1M_USERS,
              drop: Optional[str] = None, stored: bool = False) -> Path:
    members = {"ml-1m/ratings.dat": ratings.encode("latin-1"), "ml-1m/movies.dat": movies.encode("latin-1"),
               "ml-1m/users.dat": users.encode("latin-1"), "ml-1m/README": b"tiny"}
    members.pop(f"ml-1m/{drop}", None)
    return _zip(path, members, stored)


ML_20M_RATINGS = ("userId,movieId,rating,timestamp\n"
                  "7,3,3.5,1112486027\n7,29,4.0,1112484676\n7,3,5.0,1112484580\n"
                  "2,131262,0.5,974820889\n2,1,4.5,974820889\n")
ML_20M_MOVIES = ('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                 '3,"American President, The (1995)",Comedy|Drama|Romance\n29,"City of Lost Children, The (1995)",'
                 'Adventure\n131262,Innocence (2014),Adventure|Fantasy|Horror\n')


def ml_20m_zip(path: Path, ratings: str = ML_20M_RATINGS, movies: str = ML_20M_MOVIES) -> Path:
    return _zip(path, {"ml-20m/ratings.csv": ratings.encode(), "ml-20m/movies.csv": movies.encode()})


# Raw Amazon rows (user, item, rating, timestamp), in file order. Raw counts: items B9 7, B10 5, A5 5,
# Z1 5, E7 5, rare 1; users u_a, u_b, u_c 5, u_d 6, u_short 5, u_tiny 2.
# - u_short has 5 raw rows, one on "rare" (dropped by the item rule): 4 left -> dropped afterwards.
# - E7 has exactly 5 raw rows, one from u_tiny (dropped by the user rule): counts are taken before
#   filtering, so E7 is kept.
# - Dense codes follow the sorted id strings: A5 0, B10 1, B9 2, E7 3, Z1 4 (cache: + 1).
AMAZON_ROWS = [
    ("u_d", "B9", 5.0, 10), ("u_d", "B10", 4.0, 20),
    ("u_short", "B9", 3.0, 1),
    ("u_a", "B9", 5.0, 5), ("u_a", "B10", 4.0, 3), ("u_a", "A5", 3.0, 3), ("u_a", "Z1", 2.0, 1),
    ("u_a", "E7", 1.0, 9),
    ("u_tiny", "E7", 5.0, 1),
    ("u_short", "B10", 3.0, 2), ("u_short", "A5", 3.0, 3), ("u_short", "Z1", 3.0, 4), ("u_short", "rare", 3.0, 5),
    ("u_c", "Z1", 1.0, 50), ("u_c", "E7", 2.0, 40), ("u_c", "A5", 3.0, 30), ("u_c", "B10", 4.0, 20),
    ("u_c", "B9", 5.0, 10),
    ("u_d", "A5", 3.0, 30), ("u_d", "Z1", 2.0, 30), ("u_d", "E7", 1.0, 5), ("u_d", "B9", 5.0, 40),
    ("u_b", "A5", 4.0, 7), ("u_b", "B9", 4.0, 7), ("u_b", "B10", 4.0, 7), ("u_b", "Z1", 4.0, 7), ("u_b", "E7", 4.0, 7),
    ("u_tiny", "B9", 1.0, 2),
]


def amazon_csv(path: Path, rows=AMAZON_ROWS) -> Path:
    path.write_text("".join(f"{u},{i},{r:.1f},{t}\n" for u, i, r, t in rows))
    return path


def naive_amazon(rows) -> List[List[int]]:
    """Straightforward reference of the Amazon rules: per user (sorted), item codes + 1 in time order."""
    items, users = Counter(r[1] for r in rows), Counter(r[0] for r in rows)
    kept = [r for r in rows if items[r[1]] >= 5 and users[r[0]] >= 5]
    item_code = {item: code for code, item in enumerate(sorted({r[1] for r in kept}))}
    sequences = []
    for user in sorted({r[0] for r in kept}):
        mine = sorted((r for r in kept if r[0] == user), key=lambda r: r[3])  # Python's sort is stable
        if len(mine) >= 5:
            sequences.append([item_code[r[1]] + 1 for r in mine])
    return sequences


def quiet(message: str) -> None:
    pass


def files_under(path: Path) -> List[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def as_lists(data) -> List[List[int]]:
    return [data.sequence(u).tolist() for u in range(data.num_users)]


# --------------------------------------------------------------------------------------------------
# The three formats


def test_ml_1m_sequences_features_and_csv(tmp_path):
    archive = ml_1m_zip(tmp_path / "ml-1m.zip")
    path = preprocess("ml-1m", tmp_path / "data", archive)
    data = load_sequences(path)
    assert data.user_ids.tolist() == [1, 2, 3]
    # Stable sort: user 1's tie at t=100 keeps file order (10 before 1); user 2's at t=7 (20 before 10).
    assert as_lists(data) == [[2, 10, 1], [1, 20, 10], [1, 2]]
    assert data.ratings.tolist() == [3, 5, 4, 3, 1, 2, 2, 4]
    assert data.timestamps.tolist() == [50, 100, 100, 5, 7, 7, 200, 300]
    assert data.candidate_ids.tolist() == [1, 2, 10, 20]  # every movie of movies.dat, rated or not
    assert data.max_item_id == 20
    # Categorical codes: sex F<M; age 1<25<56; occupation 10<15<16; zip codes in string order.
    assert {k: v.tolist() for k, v in data.user_features.items()} == {
        "sex": [0, 1, 1], "age_group": [0, 2, 1], "occupation": [0, 2, 1], "zip_code": [0, 2, 1]}
    rows = list(csv.DictReader(open(tmp_path / "data/ml-1m/sasrec_format.csv")))
    assert list(rows[0]) == ["index", "user_id", "sequence_item_ids", "sequence_ratings", "sequence_timestamps",
                             "sex", "age_group", "occupation", "zip_code"]
    assert rows[0]["sequence_item_ids"] == "2,10,1" and rows[0]["sequence_ratings"] == "3,5,4"
    assert rows[2]["user_id"] == "3" and rows[2]["sequence_timestamps"] == "200,300" and rows[2]["age_group"] == "1"
    assert '"2,10,1","3,5,4","50,100,100"' in (tmp_path / "data/ml-1m/sasrec_format.csv").read_text()
    assert ensure_preprocessed("ml-1m", str(tmp_path / "data")) == path
    assert files_under(tmp_path / "data") == ["ml-1m/sasrec_format.csv", "ml-1m/sequences.npz"]
    # Per item id 0..20: the movie id as a string and the title (latin-1 decoded); "" where there is no movie.
    named = {i: (data.item_keys[i], data.item_titles[i]) for i in range(21) if data.item_keys[i] or data.item_titles[i]}
    assert named == {1: ("1", "Toy Story (1995)"), 2: ("2", "Jumanji (1995)"), 10: ("10", "GoldenEye (1995)"),
                     20: ("20", "Caf\xe9 Society (1995)")}


def test_duplicated_rows_are_counted_in_a_warning(tmp_path):
    messages: List[str] = []
    ratings = "1::1::5::100\n" * 4 + "1::2::4::100\n2::1::3::200\n"
    preprocess("ml-1m", tmp_path, ml_1m_zip(tmp_path / "ml-1m.zip", ratings=ratings), log=messages.append)
    assert [m for m in messages if "WARNING" in m and "3 rows of" in m and "repeat an earlier row exactly" in m]


def test_count_mismatch_warning_names_each_count(tmp_path, capsys):
    preprocess("ml-1m", tmp_path, ml_1m_zip(tmp_path / "ml-1m.zip"))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    for text in ("users: 3 here, 6,040", "rated items: 4 here, 3,706", "max item id: 20 here, 3,952",
                 "ratings: 8 here, 1,000,209", "candidate items: 4 here, 3,883"):
        assert any(text in line for line in warnings), (text, out)
    assert len(warnings) == 6  # the five counts, and the archive that is not the official one
    assert "ml-1m.zip differs from the official archive ml-1m.zip" in warnings[0]


def test_ml_20m_quoted_titles_half_stars(tmp_path):
    path = preprocess("ml-20m", tmp_path, ml_20m_zip(tmp_path / "ml-20m.zip"), log=quiet)
    data = load_sequences(path)
    assert data.user_ids.tolist() == [2, 7]
    assert as_lists(data) == [[131262, 1], [3, 29, 3]]  # user 2: tie at 974820889 keeps file order
    assert data.ratings.tolist() == [0.5, 4.5, 5.0, 4.0, 3.5]
    assert data.candidate_ids.tolist() == [1, 3, 29, 131262]
    text = (tmp_path / "ml-20m/sasrec_format.csv").read_text().splitlines()
    assert text[0] == "index,user_id,sequence_item_ids,sequence_ratings,sequence_timestamps"
    assert text[1] == '0,2,"131262,1","0.5,4.5","974820889,974820889"'
    assert data.item_keys.shape == data.item_titles.shape == (131263,)
    assert {i: str(data.item_titles[i]) for i in np.flatnonzero(data.item_titles)} == {
        1: "Toy Story (1995)", 3: "American President, The (1995)", 29: "City of Lost Children, The (1995)",
        131262: "Innocence (2014)"}
    assert np.flatnonzero(data.item_keys).tolist() == [1, 3, 29, 131262] and data.item_keys[131262] == "131262"


def test_rated_movie_missing_from_the_movies_file(tmp_path):
    lines: List[str] = []
    data = load_sequences(preprocess("ml-1m", tmp_path, ml_1m_zip(tmp_path / "ml-1m.zip", ratings="1::7::5::100\n"),
                                     log=lines.append))
    assert any("1 rated movie ids are missing from" in line and "[7]" in line for line in lines)
    assert data.candidate_ids.tolist() == [1, 2, 7, 10, 20]
    assert (data.item_keys[7], data.item_titles[7]) == ("7", "")  # a movie id without a title


def test_amazon_one_pass_filter_and_sorted_string_ids(tmp_path, capsys):
    source = amazon_csv(tmp_path / "ratings_Books.csv")
    path = preprocess("amzn-books", tmp_path / "data", source)
    data = load_sequences(path)
    # Users u_a, u_b, u_c, u_d (codes 0..3); u_short (code 4) lost "rare" and was dropped afterwards.
    assert data.user_ids.tolist() == [0, 1, 2, 3]
    assert as_lists(data) == [
        [5, 2, 1, 3, 4],  # u_a: Z1(1) B10(3) A5(3, tie: file order) B9(5) E7(9)
        [1, 3, 2, 5, 4],  # u_b: all at t=7, file order
        [3, 2, 1, 4, 5],  # u_c
        [4, 3, 2, 1, 5, 3],  # u_d: E7(5) B9(10) B10(20) A5(30) Z1(30) B9(40)
    ]
    assert as_lists(data) == naive_amazon(AMAZON_ROWS)
    assert data.candidate_ids.tolist() == [1, 2, 3, 4, 5]  # E7 kept: 5 raw rows, counted before filtering
    out = capsys.readouterr().out
    assert "kept 25 of 28 rows; dropped 1 rows of items with < 5 rows and 2 rows of users with < 5 rows" in out
    assert "dropped 1 users left with < 5 items (4 rows)" in out
    assert "raw rows: 28 here, 22,507,155" in out
    # The CSV keeps the release's 0-based item codes.
    rows = list(csv.DictReader(open(tmp_path / "data/amzn-books/sasrec_format.csv")))
    assert rows[0]["user_id"] == "0" and rows[0]["sequence_item_ids"] == "4,1,0,2,3"
    assert rows[0]["sequence_ratings"] == "2.0,4.0,3.0,5.0,1.0"
    assert data.item_keys.tolist() == ["", "A5", "B10", "B9", "E7", "Z1"]  # the original ids ("rare" dropped)


def test_amazon_matches_naive_reference_on_random_rows(tmp_path):
    rng = np.random.default_rng(3)
    rows = [(f"U{rng.integers(0, 40)}", f"I{rng.integers(0, 60)}", float(rng.integers(1, 6)), int(rng.integers(0, 20)))
            for _ in range(1500)]
    data = load_sequences(preprocess("amzn-books", tmp_path, amazon_csv(tmp_path / "r.csv", rows), log=quiet))
    assert as_lists(data) == naive_amazon(rows)


def test_amazon_chunked_parsing_and_string_order(tmp_path):
    source = amazon_csv(tmp_path / "r.csv")
    whole, users, items = amazon.parse_amazon_ratings(source)
    chunked, *ids = amazon.parse_amazon_ratings(source, chunk_rows=4)
    assert users.tolist() == [b"u_a", b"u_b", b"u_c", b"u_d", b"u_short", b"u_tiny"]
    assert items.tolist() == [b"A5", b"B10", b"B9", b"E7", b"Z1", b"rare"]
    for a, b in zip([*whole, users, items], [*chunked, *ids]):
        np.testing.assert_array_equal(a, b)
    # Codes follow Python's string order (code points), also for non-ASCII ids.
    ids = ["zed", "\xe9clair", "Zeta", "apple", "zed", "B10", "B9"]
    coder = amazon.SortedIdCoder()
    assert coder.add(np.array(ids[:3], dtype=object)) and coder.add(np.array(ids[3:], dtype=object))
    codes, distinct = coder.finish()
    ranks = {v: i for i, v in enumerate(sorted(set(ids)))}
    assert [v.decode() for v in distinct] == sorted(set(ids)) and codes.tolist() == [ranks[v] for v in ids]
    # An error in a later chunk still names its line.
    bad = tmp_path / "bad.csv"
    bad.write_text(source.read_text() + "u_x,B9,x,3\n")
    with pytest.raises(PreprocessingError, match="line 29: non-numeric rating 'x'"):
        amazon.parse_amazon_ratings(bad, chunk_rows=4)


# --------------------------------------------------------------------------------------------------
# Malformed input: one clear error naming the file and line; nothing written


def _expect_error(tmp_path: Path, name: str, archive: Path, *fragments: str) -> str:
    data_dir = tmp_path / "data"
    with pytest.raises(PreprocessingError) as info:
        preprocess(name, data_dir, archive, log=quiet)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not data_dir.exists() or files_under(data_dir) == []
    return message


@pytest.mark.parametrize("ratings, fragments", [
    ("1::1::5::100\n2,2,3,200\n", ["line 2", "wrong separator", "','"]),
    ("1::1::5::100\n1::2::5::100\n1::3::5\n", ["line 3", "wrong number of fields", "found 3"]),
    ("1::1::5::100\n1::2::5::100::7\n", ["line 2", "wrong number of fields", "found 5"]),
    ("1::1::5::100\n1::x1::5::100\n", ["line 2", "non-numeric MovieID 'x1'"]),
    ("1::1::5::100\n1::1::4.5::100\n", ["line 2", "non-numeric Rating '4.5'"]),
    ("1::1::5::100\n1:: 2::4::100\n", ["line 2", "non-numeric MovieID ' 2'"]),
    ("1::1::5::100\n+1::2::4::100\n", ["line 2", "non-numeric UserID '+1'"]),
    ("0::1::5::100\n", ["line 1", "UserID 0 is not a positive integer"]),
    ("1::1::5::100\n1::-4::5::100\n", ["line 2", "MovieID -4 is not a positive integer"]),
    ("1::1::5::100\n\n1::2::5::100\n", ["line 2", "empty line"]),
    ("1::1::5::100\n1::2::5::" + "1" + "0" * 20 + "\n", ["line 2", "Timestamp 1" + "0" * 20 + " is too large"]),
    ("", ["the file is empty"]),
])
def test_ml_1m_malformed_ratings(tmp_path, ratings, fragments):
    archive = ml_1m_zip(tmp_path / "ml-1m.zip", ratings=ratings)
    _expect_error(tmp_path, "ml-1m", archive, "ml-1m.zip:ml-1m/ratings.dat", *fragments)


def test_ml_1m_malformed_metadata(tmp_path):
    archive = ml_1m_zip(tmp_path / "a.zip", movies="1::Toy Story (1995)::Animation\n2::Jumanji (1995)\n")
    _expect_error(tmp_path, "ml-1m", archive, "ml-1m/movies.dat, line 2", "wrong number of fields")
    archive = ml_1m_zip(tmp_path / "b.zip", users="1::F::1::10::48067\n2::M::old::16::70072\n")
    _expect_error(tmp_path, "ml-1m", archive, "ml-1m/users.dat, line 2", "non-numeric Age 'old'")


def test_missing_member_truncated_and_corrupt_zip(tmp_path):
    _expect_error(tmp_path, "ml-1m", ml_1m_zip(tmp_path / "m.zip", drop="users.dat"),
                  "m.zip", "missing member ml-1m/users.dat")
    whole = ml_1m_zip(tmp_path / "whole.zip").read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(whole[: len(whole) // 2])
    _expect_error(tmp_path, "ml-1m", truncated, "truncated.zip", "not a valid zip archive")
    # One byte of the stored ratings.dat changed: the CRC check catches it.
    stored = ml_1m_zip(tmp_path / "stored.zip", stored=True).read_bytes()
    at = stored.index(b"1::10::5::100")
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(stored[:at] + b"7" + stored[at + 1:])
    _expect_error(tmp_path, "ml-1m", corrupt, "corrupt.zip:ml-1m/ratings.dat", "corrupt")


@pytest.mark.parametrize("ratings, movies, fragments", [
    ("userId;movieId;rating;timestamp\n1;2;3.5;4\n", ML_20M_MOVIES, ["ratings.csv, line 1", "expected the header"]),
    ("userId,movieId,rating,timestamp\n1,2,3.5,4\n1\t2\t3.5\t4\n", ML_20M_MOVIES,
     ["ratings.csv, line 3", "wrong separator", "'\\t'"]),
    ("userId,movieId,rating,timestamp\n1,2,3.5,4\n1,2,3.5\n", ML_20M_MOVIES, ["ratings.csv, line 3", "found 3"]),
    ("userId,movieId,rating,timestamp\n1,2,3.5,4\n1,2,abc,4\n", ML_20M_MOVIES,
     ["ratings.csv, line 3", "non-numeric rating 'abc'"]),
    ("userId,movieId,rating,timestamp\n1,2,3.5,4\n1,0,3.5,4\n", ML_20M_MOVIES,
     ["ratings.csv, line 3", "movieId 0 is not a positive integer"]),
    ("userId,movieId,rating,timestamp\n", ML_20M_MOVIES, ["ratings.csv", "no ratings"]),
    ("userId,movieId,rating,timestamp\n1,2,3.5,4\n1,2, 3.5,4\n", ML_20M_MOVIES, ["ratings.csv, line 3", "spaces"]),
    ("", ML_20M_MOVIES, ["ratings.csv", "empty"]),
    (ML_20M_RATINGS, 'movieId,title,genres\n1,Toy Story,Comedy\n3,American President, The (1995),Comedy\n',
     ["movies.csv, line 3", "found 4"]),
])
def test_ml_20m_malformed(tmp_path, ratings, movies, fragments):
    _expect_error(tmp_path, "ml-20m", ml_20m_zip(tmp_path / "ml-20m.zip", ratings, movies), *fragments)


@pytest.mark.parametrize("text, fragments", [
    ("a,x,4.0,1\nb,y,4.0,2,9\n", ["line 2", "found 5"]),
    ("a,x,4.0,1\nb,y,4.0\n", ["line 2", "found 3"]),
    ("a,x,4.0,1\nb\ty\t4.0\t2\n", ["line 2", "wrong separator"]),
    ("a,x,4.0,1\nb,y,4.0,2pm\n", ["line 2", "non-numeric timestamp '2pm'"]),
    ("a,x,4.0,1\nb,y,good,2\n", ["line 2", "non-numeric rating 'good'"]),
    ("a,x,4.0,1\n,y,4.0,2\n", ["line 2", "empty user"]),
    ("", ["the file is empty"]),
])
def test_amazon_malformed(tmp_path, text, fragments):
    source = tmp_path / "ratings_Books.csv"
    source.write_text(text)
    _expect_error(tmp_path, "amzn-books", source, "ratings_Books.csv", *fragments)


def test_failure_while_writing_leaves_no_files(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd_mod, "write_sasrec_csv", fail)
    with pytest.raises(OSError):
        preprocess("ml-1m", tmp_path / "data", ml_1m_zip(tmp_path / "ml-1m.zip"), log=quiet)
    assert files_under(tmp_path / "data") == []


KILLED_WHILE_WRITING = """
import os, signal, sys
import numpy as np
from generative_recommenders.data.public_datasets import preprocess

real_savez = np.savez
def savez_then_die(file, **arrays):  # the cache's bytes written (and flushed), then SIGKILL before the rename
    real_savez(file, **arrays)
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
np.savez = savez_then_die
preprocess("ml-1m", sys.argv[1], sys.argv[2], log=lambda message: None)
"""


def test_a_process_killed_while_writing_the_cache_leaves_no_cache_and_a_rerun_cleans_up(tmp_path):
    archive = ml_1m_zip(tmp_path / "ml-1m.zip")
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(tmp_path), str(archive)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = tmp_path / "ml-1m"
    left = files_under(out)
    assert "sequences.npz" not in left and "sasrec_format.csv" not in left  # nothing complete-looking
    assert left, "the kill came before any temporary was written: nothing was tested"
    with pytest.raises(PreprocessingError, match="has not been preprocessed"):
        ensure_preprocessed("ml-1m", str(tmp_path))
    preprocess("ml-1m", tmp_path, archive, log=quiet)
    assert files_under(out) == ["sasrec_format.csv", "sequences.npz"]  # the killed run's temporaries removed


# --------------------------------------------------------------------------------------------------
# Archives, downloads, cache checks, CLI


def test_archive_in_data_dir_is_used_without_download(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    ml_1m_zip(tmp_path / "ml-1m.zip")
    assert load_sequences(preprocess("ml-1m", tmp_path, log=quiet)).num_users == 3


def test_extracted_folder_as_archive(tmp_path):
    with zipfile.ZipFile(ml_1m_zip(tmp_path / "ml-1m.zip")) as zf:
        zf.extractall(tmp_path / "extracted")
    from_zip = load_sequences(preprocess("ml-1m", tmp_path / "a", tmp_path / "ml-1m.zip", log=quiet))
    from_folder = load_sequences(preprocess("ml-1m", tmp_path / "b", tmp_path / "extracted", log=quiet))
    assert as_lists(from_folder) == as_lists(from_zip)


def test_download_verifies_and_renames(tmp_path):
    source = ml_1m_zip(tmp_path / "source.zip")
    lines: List[str] = []
    dest = download(source.as_uri(), tmp_path / "dl/ml-1m.zip", expected_size=source.stat().st_size,
                    check=download_mod.check_zip, log=lines.append)
    assert dest.read_bytes() == source.read_bytes()
    assert any("downloaded" in line and "MiB" in line for line in lines)
    with pytest.raises(PreprocessingError, match="sha256"):
        download(source.as_uri(), tmp_path / "dl2/ml-1m.zip", expected_checksum=Checksum("sha256", "0" * 64), log=quiet)
    assert files_under(tmp_path / "dl2") == []


def _official(monkeypatch, archive: Path, size_delta: int = 0, md5: Optional[str] = None) -> None:
    """Makes `archive` (or a variant of it) the official ml-1m archive of the spec."""
    spec = pd_mod.DATASETS["ml-1m"]
    remote = download_mod.RemoteFile(archive.as_uri(), size=archive.stat().st_size + size_delta,
                                     checksum=Checksum("md5", md5 or hashlib.md5(archive.read_bytes()).hexdigest()))
    monkeypatch.setitem(pd_mod.DATASETS, "ml-1m", dataclasses.replace(spec, remote=remote))


def test_archive_on_disk_is_checked_against_the_published_size_and_md5(tmp_path, monkeypatch):
    archive = ml_1m_zip(tmp_path / "ml-1m.zip")
    lines: List[str] = []
    _official(monkeypatch, archive)
    preprocess("ml-1m", tmp_path / "a", archive, log=lines.append)
    assert f"{archive}: size and md5 match the official archive" in lines
    _official(monkeypatch, archive, md5="0" * 32)
    path = preprocess("ml-1m", tmp_path / "b", archive, log=lines.append)
    assert (f"WARNING: {archive} differs from the official archive ml-1m.zip: its md5 is "
            f"{hashlib.md5(archive.read_bytes()).hexdigest()}, the official one {'0' * 32}; using it anyway") in lines
    assert load_sequences(path).num_users == 3  # used anyway
    _official(monkeypatch, archive, size_delta=1)
    monkeypatch.setattr(download_mod, "file_digest", None)  # a file of the wrong size is not hashed
    preprocess("ml-1m", tmp_path / "c", archive, log=lines.append)
    size = archive.stat().st_size
    assert (f"WARNING: {archive} differs from the official archive ml-1m.zip: it has {size:,} bytes, the official "
            f"one {size + 1:,}; using it anyway") in lines


def test_download_fails_on_a_published_checksum_mismatch(tmp_path, monkeypatch):
    (tmp_path / "server").mkdir()
    source = ml_1m_zip(tmp_path / "server/ml-1m.zip")
    _official(monkeypatch, source)
    assert load_sequences(preprocess("ml-1m", tmp_path / "ok", log=quiet)).num_users == 3  # downloaded, md5 checked
    assert (tmp_path / "ok/ml-1m.zip").read_bytes() == source.read_bytes()
    _official(monkeypatch, source, md5="0" * 32)
    with pytest.raises(PreprocessingError, match=r"md5 \w+ differs from the known 0+; the download is corrupt"):
        preprocess("ml-1m", tmp_path / "bad", log=quiet)
    assert files_under(tmp_path / "bad") == []


def test_download_failure_says_how_to_supply_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(download_mod.time, "sleep", lambda s: None)
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # a closed local port must fail at once
    spec = pd_mod.DATASETS["ml-1m"]
    remote = dataclasses.replace(spec.remote, url="http://127.0.0.1:9/ml-1m.zip")
    monkeypatch.setitem(pd_mod.DATASETS, "ml-1m", dataclasses.replace(spec, remote=remote))
    lines: List[str] = []
    with pytest.raises(PreprocessingError) as info:
        preprocess("ml-1m", tmp_path, log=lines.append)
    message = str(info.value)
    assert "after 3 attempts" in message and "--archive=/path/to/ml-1m.zip" in message
    assert str(tmp_path / "ml-1m.zip") in message
    assert sum("retrying" in line for line in lines) == 2
    assert files_under(tmp_path) == []


def test_ensure_preprocessed_errors(tmp_path):
    with pytest.raises(PreprocessingError, match=r"preprocess_public_data.py --dataset=ml-1m --data_dir="):
        ensure_preprocessed("ml-1m", str(tmp_path))
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m/sequences.npz").write_bytes(b"half a file")
    with pytest.raises(PreprocessingError, match="not a valid ml-1m cache"):
        ensure_preprocessed("ml-1m", str(tmp_path))
    with pytest.raises(PreprocessingError, match="unknown data set"):
        ensure_preprocessed("ml-2m", str(tmp_path))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "preprocess_public_data.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_exit_codes(tmp_path):
    good = ml_1m_zip(tmp_path / "ml-1m.zip")
    done = _cli("--dataset=ml-1m", f"--archive={good}", f"--data_dir={tmp_path / 'ok'}")
    assert done.returncode == 0, done.stderr
    assert "ml-1m: users 3" in done.stdout
    bad = ml_1m_zip(tmp_path / "bad.zip", ratings="1::1::5::100\n1::2::x::100\n")
    failed = _cli("--dataset=ml-1m", f"--archive={bad}", f"--data_dir={tmp_path / 'bad'}")
    assert failed.returncode == 1
    assert "ERROR:" in failed.stderr and "ratings.dat, line 2" in failed.stderr
    assert "Traceback" not in failed.stderr
    both = _cli("--dataset=ml-1m,ml-20m", f"--archive={good}", f"--data_dir={tmp_path / 'both'}")
    assert both.returncode == 1 and "exactly one --dataset" in both.stderr


# --------------------------------------------------------------------------------------------------
# The real ml-1m archive, when it is beside the repository


@pytest.mark.skipif(not SHARED_ML_1M.exists(), reason=f"{SHARED_ML_1M} not present")
def test_real_ml_1m_counts(tmp_path):
    start = time.time()
    lines: List[str] = []
    path = preprocess("ml-1m", tmp_path, SHARED_ML_1M, log=lines.append)
    assert time.time() - start < 30
    # A reconstruction (../shared/data/README.md): not the official archive, so a warning, and it is used.
    assert f"WARNING: {SHARED_ML_1M} differs from the official archive ml-1m.zip: it has 5,689,857 bytes, the " \
           "official one 5,917,549; using it anyway" in lines
    start = time.time()
    data = load_sequences(path)
    assert time.time() - start < 2
    assert data.summary() == {"users": 6040, "items": 3706, "max_item_id": 3952, "candidates": 3883,
                              "interactions": 1000209}
    assert data.lengths.min() >= 20
    within_user = np.ones(data.num_interactions - 1, dtype=bool)
    within_user[data.offsets[1:-1] - 1] = False  # pairs that cross from one user to the next
    assert np.all(np.diff(data.timestamps)[within_user] >= 0)  # every sequence is in time order
    assert data.user_ids.tolist() == list(range(1, 6041))
    assert set(data.user_features) == {"sex", "age_group", "occupation", "zip_code"}
    assert data.user_features["age_group"].max() == 6 and data.user_features["occupation"].max() == 20
