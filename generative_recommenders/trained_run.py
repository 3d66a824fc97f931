"""A trained retrieval run, rebuilt for use (recommend.py, export.py).

The configuration is results.json's "config" (the gin bindings the run was
trained with), so the model is constructed exactly as trained; the data set is
loaded as the trainer loads it; the weights are the best epoch's (best.pt) or
the last one's (last.pt), checked against results.json and the run's
fingerprint. Queries are the objective's, after each user's whole history:
the history is followed by an empty target slot stamped with the time of the
request where the caller knows it (a session's), else with the last
interaction's time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import gin
import numpy as np
import torch
from absl import flags, logging

from generative_recommenders.config import ConfigError, TrainConfig, first_line
from generative_recommenders.data.datasets import load_dataset
from generative_recommenders.data.parsing import PreprocessingError
from generative_recommenders.data.samples import SESSIONS, Batch, DeviceSequences
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.files import os_error_line
from generative_recommenders.precision import set_precision
from generative_recommenders.progress import Progress
from generative_recommenders.runs import (checkpoint_weights, config_fingerprint, device_for, load_checkpoint_file,
                                          run_paths)
from generative_recommenders.tasks.retrieval import RetrievalTask

# Shared by recommend.py and export.py (absl flags are global: each is defined once).
flags.DEFINE_string("run_dir", None, "The run's log directory, exps/<dataset>-l<max_len>/<run name> (holds results.json).")
flags.DEFINE_enum("epoch", "best", ["best", "last"], "The best epoch's weights (best.pt) or the last epoch's (last.pt).")
flags.DEFINE_string("out", None, "Output file: .csv or .parquet (recommend), .npz (export).")


@dataclasses.dataclass
class TrainedRun:
    config: TrainConfig
    task: RetrievalTask
    run_name: str
    checkpoint: Path
    epoch: int  # 0-based epoch of the loaded weights

    @property
    def data(self) -> SequenceData:
        return self.task.data

    @property
    def sessions(self) -> bool:
        return self.config.protocol == SESSIONS

    @property
    def device(self) -> torch.device:
        return self.task.index.candidate_ids.device


def load_run(run_dir: str, which: str = "best", device: Optional[torch.device] = None) -> TrainedRun:
    """Rebuilds the run in `run_dir` with the weights of `which` ("best" or "last"); leaves gin configured with
    the run's bindings. Raises ConfigError for a directory that is no run, or checkpoints that do not match it."""
    results_path = Path(run_dir) / "results.json"
    if not results_path.is_file():
        raise ConfigError(f"{results_path} not found: --run_dir must be a run's log directory, "
                          f"exps/<dataset>-l<max_len>/<run name>")
    results = json.loads(results_path.read_text())
    gin.clear_config()
    gin.parse_config(results["config"])
    config = TrainConfig()
    if config.task != "retrieval":
        raise ConfigError(f"{run_dir} is a {config.task} run; recommendations and embeddings come from retrieval runs")
    device = device or device_for(0)
    set_precision(config)  # the training's, so scores (and their order) are the evaluation's
    task = RetrievalTask(config, load_dataset(config.dataset_name, config.data_dir), device)
    checkpoint = run_paths(config, results["run_name"])[1] / f"{which}.pt"
    weights, epoch = _checked_weights(checkpoint, results_path, results[which].get("epoch"), task.data, device)
    task.model.load_state_dict(weights)
    task.model.eval()
    return TrainedRun(config, task, results["run_name"], checkpoint, epoch)


def _checked_weights(checkpoint: Path, results_path: Path, recorded: Optional[int], data: SequenceData,
                     device: torch.device) -> Tuple[Dict[str, torch.Tensor], int]:
    """The checkpoint's weights and epoch, refused unless they are the run's (gin holds its configuration) and
    the epoch results.json records."""
    if not checkpoint.is_file():
        raise ConfigError(f"{checkpoint} not found: checkpoints are read from the run's train_fn.ckpt_root, "
                          f"relative to the directory the run was trained in")
    weights, epoch, fingerprint = checkpoint_weights(load_checkpoint_file(checkpoint, device))
    if fingerprint not in (None, config_fingerprint(data)):
        raise ConfigError(f"{checkpoint} belongs to another configuration or data set than {results_path}")
    if epoch != recorded:
        which = checkpoint.stem
        raise ConfigError(f"{checkpoint} holds epoch {epoch + 1}, but {results_path} records "
                          f"{'no' if recorded is None else recorded + 1} as the {which} epoch: the run is still "
                          f"being written, or its files were mixed up")
    return weights, epoch


def shown_user_ids(data: SequenceData) -> np.ndarray:
    """Each user's id as the source gave it: the text ids of an own log (user_keys), else user_ids."""
    return data.user_ids if data.user_keys is None else data.user_keys


def user_rows(data: SequenceData, user_ids: Sequence[int | str]) -> np.ndarray:
    """Row of each of the data set's own user ids (session ids for session data; text for a log's text ids)."""
    shown = shown_user_ids(data)
    row_of = {str(user): row for row, user in enumerate(shown.tolist())}
    unknown = [str(user) for user in user_ids if str(user) not in row_of]
    if unknown:
        known = (f"its ids run from {shown.min()} to {shown.max()}" if data.user_keys is None
                 else f"its ids are text, e.g. {', '.join(shown[:3].tolist())}")
        raise ConfigError(f"unknown user id(s) {', '.join(unknown[:5])} in {data.name} ({known})")
    return np.array([row_of[str(user)] for user in user_ids], dtype=np.int64)


def query_sequences(data: SequenceData, rows: np.ndarray, device: torch.device,
                    request_times: Optional[np.ndarray] = None) -> Tuple[DeviceSequences, np.ndarray]:
    """The rows' whole histories, each followed by an empty target slot, and their (sequence, end) samples.

    The slot carries `request_times` (one per row) where given, as the evaluation stamps it with the
    target's time; otherwise the last interaction's time.
    """
    lengths = data.lengths[rows]
    if (lengths == 0).any():
        raise ConfigError(f"user(s) {shown_user_ids(data)[rows[lengths == 0]][:5].tolist()} have no interactions to "
                          "query with")
    slots = lengths + 1
    offsets = np.concatenate([[0], np.cumsum(slots)]).astype(np.int64)
    position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], slots)
    # The slot repeats the last interaction's row (its timestamp); its id is blanked below.
    source = np.repeat(data.offsets[rows], slots) + np.minimum(position, np.repeat(lengths - 1, slots))
    timestamps = data.timestamps[source]
    if request_times is not None:
        timestamps[offsets[1:] - 1] = request_times
    extended = dataclasses.replace(
        data, item_ids=np.where(position < np.repeat(lengths, slots), data.item_ids[source], 0),
        timestamps=timestamps, ratings=data.ratings[source], offsets=offsets,
        user_ids=data.user_ids[rows], user_split=None, user_features={}, user_keys=None)
    samples = np.stack([np.arange(rows.size), slots], axis=1).astype(np.int64)
    return DeviceSequences(extended, device), samples


def query_batches(run: TrainedRun, sequences: DeviceSequences, samples: np.ndarray,
                  log: Callable[[str], None] = print) -> Iterator[Batch]:
    """The samples' batches (eval_batch_size each), with a progress line at most every ~10 s."""
    size = run.config.eval_batch_size
    starts = range(0, samples.shape[0], size)
    progress = Progress(f"{samples.shape[0]} queries", len(starts), log, units="batches")
    for i, start in enumerate(starts):
        yield sequences.batch(samples[start:start + size], run.config.max_sequence_length, run.task.model.max_seq_len)
        progress.update(i + 1, sequences.offsets.device)


def run_cli(body: Callable[[], None]) -> None:
    """Runs a tool's body; a fault the user can fix exits with one `error: ...` line (status 1)."""
    logging.set_verbosity(logging.WARNING)  # fbgemm_gpu logs every library it loads
    try:
        body()
    except OSError as exc:  # a filesystem fault: the path and the cause
        sys.exit(f"error: {os_error_line(exc)}")
    except (ValueError, PreprocessingError) as exc:  # ConfigError is a ValueError
        sys.exit(f"error: {first_line(exc)}")
