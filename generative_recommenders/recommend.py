"""Top-k recommendations of a trained run, after each user's whole history.

    python3 -m generative_recommenders.recommend --run_dir=exps/synthetic-l50/hstu-default --users=1,2,3
    python3 -m generative_recommenders.recommend --run_dir=exps/synthetic-l50/hstu-default --all --out=recs.csv
    python3 -m generative_recommenders.recommend --run_dir=exps/rsc15-100k-l50/gru4rec-full-softmax-sessions \
        --session=214716935,214832672

Items are ranked exactly as the evaluation ranks a target (the evaluator's
`score`): the objective's query against the model's vectors of every
candidate, the items of the history fed to the model (its last
max_sequence_length) removed; session runs remove nothing. Items are shown by
the source's own id (e.g. the MovieLens movie id), with titles where the data
set has them. `--session` queries a session prefix given as item keys, stamped
as the session evaluation stamps it: each click with its time (Unix seconds,
floored as the preprocessing does) and the target slot with the time of the
request (the next click's, in the evaluation). `--session_times` gives the
clicks' times and optionally one more, the request's (default: the last
click's); `--session_gap` spaces clicks and the request that many seconds
apart; without either every click and the request are at time 0, which HSTU's
time bias never saw in training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from absl import app, flags

from generative_recommenders.config import ConfigError
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.files import atomic_write, check_output_file
from generative_recommenders.trained_run import (TrainedRun, load_run, query_batches, query_sequences, run_cli,
                                                 shown_user_ids, user_rows)

flags.DEFINE_list("users", None, "The data set's own user ids (session ids for session data; your log's ids, "
                 "text ones too), e.g. --users=1,2,3.")
flags.DEFINE_bool("all", False, "Recommend for every user.")
flags.DEFINE_list("session", None, "Session runs: the next items after this session prefix, given as item keys "
                  "(the source's item ids), e.g. --session=214716935,214832672.")
flags.DEFINE_list("session_times", None, "With --session: each click's Unix time in seconds, optionally followed "
                  "by the request's (default: the last click's), e.g. --session_times=1396396800,1396396860.")
flags.DEFINE_float("session_gap", None, "With --session: seconds between consecutive clicks and from the last click "
                   "to the request (instead of --session_times).", lower_bound=0)
flags.DEFINE_integer("k", 10, "Items per user.", lower_bound=1)
FLAGS = flags.FLAGS

FORMATS = (".csv", ".parquet")


@torch.no_grad()
def top_items(run: TrainedRun, data: SequenceData, rows: np.ndarray, k: int,
              request_times: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(S, k) item ids and scores of the rows' queries, best first (-inf: fewer than k items were left)."""
    evaluator, index = run.task.evaluator, run.task.index
    evaluator.refresh_candidates()
    sequences, samples = query_sequences(data, rows, run.device, request_times)
    ids, scores = [], []
    for batch in query_batches(run, sequences, samples):
        values, columns = evaluator.score(batch)[1].topk(min(k, index.num_candidates), dim=1)
        ids.append(index.candidate_ids[columns].cpu())
        scores.append(values.cpu())
    return torch.cat(ids).numpy(), torch.cat(scores).numpy()


def as_table(run: TrainedRun, ids: np.ndarray, scores: np.ndarray, user_ids: Optional[np.ndarray]) -> pd.DataFrame:
    """One row per (user, rank): the source's item id, the score and the title where known."""
    rows, ranks = np.nonzero(np.isfinite(scores))  # removed items (-inf) sort last: ranks stay 1..n
    items = ids[rows, ranks]
    columns = {} if user_ids is None else {"user_id": user_ids[rows]}
    columns["rank"] = ranks + 1
    columns["item_id"] = items if run.data.item_keys is None else run.data.item_keys[items]
    columns["score"] = scores[rows, ranks]
    if run.data.item_titles is not None:
        columns["title"] = run.data.item_titles[items]
    return pd.DataFrame(columns)


def session_times(num_clicks: int, times: Optional[Sequence[float]] = None,
                  gap: Optional[float] = None) -> Tuple[np.ndarray, int]:
    """(clicks' times, request time) in whole seconds (floored, as the preprocessing stores them).

    From `times` (one per click, optionally one more for the request, else the last click's), or clicks
    `gap` seconds apart from time 0 with the request one gap after the last; all 0 without either.
    """
    if times is not None and gap is not None:
        raise ConfigError("give --session_times or --session_gap, not both")
    if gap is not None:
        stamps = np.floor(np.arange(num_clicks + 1) * gap).astype(np.int64)
        return stamps[:-1], int(stamps[-1])
    if times is None:
        return np.zeros(num_clicks, np.int64), 0
    if len(times) not in (num_clicks, num_clicks + 1):
        raise ConfigError(f"--session_times: {len(times)} times for {num_clicks} clicks; give one per click, "
                          f"optionally one more for the request")
    stamps = np.floor(np.asarray(times, dtype=np.float64)).astype(np.int64)
    if (np.diff(stamps) < 0).any():
        raise ConfigError("--session_times must not decrease: clicks are given in time order")
    return stamps[:num_clicks], int(stamps[-1])


def session_prefix(data: SequenceData, keys: Sequence[str], times: np.ndarray) -> SequenceData:
    """A one-session data set of the items with these source keys (model ids where the data set keeps none),
    clicked at `times`."""
    known = data.item_keys if data.item_keys is not None else np.arange(data.max_item_id + 1).astype(str)
    id_of = {key: item for item, key in enumerate(known.tolist()) if item > 0}
    unknown = [key for key in keys if key not in id_of]
    if unknown:
        raise ConfigError(f"--session: item key(s) {', '.join(unknown[:5])} are not items of {data.name}")
    ids = np.array([id_of[key] for key in keys], dtype=np.int32)
    return dataclasses.replace(
        data, item_ids=ids, ratings=np.zeros(ids.size, np.float32), timestamps=times,
        offsets=np.array([0, ids.size], np.int64), user_ids=np.zeros(1, np.int64), user_split=None,
        user_features={}, user_keys=None)


def recommend(run: TrainedRun, k: int, user_ids: Optional[Sequence[int | str]] = None,
              session: Optional[Sequence[str]] = None, times: Optional[Sequence[float]] = None,
              gap: Optional[float] = None) -> pd.DataFrame:
    """The top-k table of `user_ids` (every user when None), or of a session prefix of item keys clicked at
    `times` or `gap` seconds apart (session_times)."""
    if session is not None:
        if not run.sessions:
            raise ConfigError(f"--session needs a run on session data; {run.run_name} uses protocol "
                              f"{run.config.protocol}: give --users")
        clicks, request = session_times(len(session), times, gap)
        ids, scores = top_items(run, session_prefix(run.data, session, clicks), np.zeros(1, np.int64), k,
                                np.array([request]))
        return as_table(run, ids, scores, None)
    rows = np.arange(run.data.num_users) if user_ids is None else user_rows(run.data, user_ids)
    ids, scores = top_items(run, run.data, rows, k)
    return as_table(run, ids, scores, shown_user_ids(run.data)[rows])


def check_output(path: str) -> None:
    """Fails before any work on an output the tool cannot write."""
    suffix = Path(path).suffix
    if suffix not in FORMATS:
        raise ConfigError(f"--out must end in {' or '.join(FORMATS)}, got {path}")
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError("writing .parquet needs pyarrow (pip install pyarrow); or write a .csv")
    check_output_file(Path(path))


def write_table(table: pd.DataFrame, path: str) -> None:
    """Atomically: a full disk or a kill leaves the old file or none, never a truncated table."""
    if Path(path).suffix == ".parquet":
        atomic_write(Path(path), lambda tmp: table.to_parquet(tmp, index=False))
    else:
        atomic_write(Path(path), lambda tmp: table.to_csv(tmp, index=False))


def _main() -> None:
    if [FLAGS.users is not None, FLAGS.all, FLAGS.session is not None].count(True) != 1:
        raise ConfigError("give exactly one of --users=ID,ID,..., --all, or --session=KEY,KEY,... (session runs)")
    if FLAGS.session is None and (FLAGS.session_times is not None or FLAGS.session_gap is not None):
        raise ConfigError("--session_times and --session_gap go with --session")
    if FLAGS.out:
        check_output(FLAGS.out)
    run = load_run(FLAGS.run_dir, FLAGS.epoch)
    print(f"{run.run_name}: {FLAGS.epoch} epoch {run.epoch + 1} ({run.checkpoint}) on {run.device}", flush=True)
    times = [float(t) for t in FLAGS.session_times] if FLAGS.session_times is not None else None
    table = recommend(run, FLAGS.k, FLAGS.users, FLAGS.session, times, FLAGS.session_gap)
    if FLAGS.out:
        write_table(table, FLAGS.out)
        print(f"wrote {len(table)} recommendations to {FLAGS.out}")
    else:
        print(table.to_string(index=False))


def main(argv: List[str]) -> None:
    del argv
    run_cli(_main)


if __name__ == "__main__":
    flags.mark_flag_as_required("run_dir")
    app.run(main)
