"""What a run leaves on disk and reads back: its name, paths, fingerprint, checkpoints and results.json.

Used alike by the trainer (which writes them) and by trained_run.py (recommend,
export: which reads them), so using a trained model never imports the loop.
A run is named by its configuration (`default_run_name`); its checkpoints
carry the fingerprint of the configuration and data they belong to, and are
loaded without running code from them (tensors and plain values only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import gin
import numpy as np
import torch

from generative_recommenders import faults
from generative_recommenders.config import ConfigError, TrainConfig
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.files import atomic_write, strict_json
from generative_recommenders.tensorboard_log import TensorBoardLog

# Settings a run may change and still resume its checkpoint (left out of its fingerprint and its name).
RESUMABLE_SETTINGS = ("train_fn.num_epochs", "train_fn.resume", "train_fn.early_stopping_patience")
# Settings that do not name a run either: where it is written, and the protocol (its own suffix).
UNNAMED_SETTINGS = ("train_fn.run_name", "train_fn.exp_root", "train_fn.ckpt_root", "train_fn.protocol")


@dataclasses.dataclass
class RunState:
    """What a checkpoint carries besides the weights (plain values only: it is loaded without pickle)."""

    fingerprint: str = ""
    world_size: int = 1
    epochs_done: int = 0
    step: int = 0
    wall_seconds: float = 0.0
    # Summed over every process that trained the run (a resumed run has several), up to the last checkpoint.
    process_seconds: float = 0.0
    sessions: int = 0  # processes that trained the run: 1 + the times it was resumed
    history: List[Dict] = dataclasses.field(default_factory=list)


# -------------------------------------------------------------------------------------------------
# Configuration and names

def parse_config(config_file: str, bindings: Sequence[str]) -> None:
    """Leaves gin configured with the file and the bindings (every configurable registered first)."""
    from generative_recommenders import tasks  # noqa: F401  (registers the model and objective configurables)
    from generative_recommenders.data import datasets  # noqa: F401  (registers the synthetic data's)

    if not Path(config_file).exists():
        raise FileNotFoundError(f"gin config file {config_file} not found")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([config_file], bindings)
    except SyntaxError as exc:  # gin's error for a value that is no Python literal
        if not str(exc).startswith(_NOT_A_LITERAL):
            raise
        raise ConfigError(f"{_unreadable_value(config_file, bindings)}: gin reads values as Python literals "
                          f"(numbers such as 1e-3, 'quoted strings', True, False, None); a bare name such as inf "
                          f"or nan is none, and infinite or undefined settings are never valid") from None


_NOT_A_LITERAL = "malformed node or string"  # ast.literal_eval's message for a bare name (inf, nan, a typo)


def _unreadable_value(config_file: str, bindings: Sequence[str]) -> str:
    """The binding gin could not read a value of (parsed alone), else the config file."""
    for binding in bindings:
        gin.clear_config()
        try:
            gin.parse_config(binding)
        except SyntaxError as exc:
            if str(exc).startswith(_NOT_A_LITERAL):
                return f"--gin_bindings={binding!r}"
    return f"a value in {config_file}"


def _entries(config_str: str) -> Dict[str, str]:
    """`key = value` entries of gin.config_str() (a long value continues on indented lines)."""
    entries: Dict[str, str] = {}
    key = ""
    for line in config_str.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace():
            entries[key] += "\n" + line
        else:
            key, _, value = line.partition(" = ")
            entries[key] = value
    return entries


def default_run_name(config_file: str, bindings: Sequence[str]) -> str:
    """`<config stem>[-<protocol>][-<hash>]`, leaving gin configured with the file and the bindings.

    The protocol is named when it is not the release's ("paper"); the hash
    (6 hex digits of SHA-1) covers the effective settings the bindings change
    from the file's, except UNNAMED_SETTINGS and RESUMABLE_SETTINGS. So the
    same command resumes its run and a changed setting starts a new one.
    """
    parse_config(config_file, [])
    from_file = _entries(gin.config_str())
    parse_config(config_file, bindings)
    unnamed = UNNAMED_SETTINGS + RESUMABLE_SETTINGS
    changed = sorted(f"{key} = {value}" for key, value in _entries(gin.config_str()).items()
                     if key not in unnamed and from_file.get(key) != value)
    name = Path(config_file).stem
    try:
        protocol = gin.query_parameter("train_fn.protocol")
    except ValueError:
        protocol = "paper"
    if protocol != "paper":
        name += f"-{protocol.replace('_', '-')}"
    if changed:
        name += "-" + hashlib.sha1("\n".join(changed).encode()).hexdigest()[:6]
    return name


def run_paths(config: TrainConfig, run_name: str) -> Tuple[Path, Path]:
    """The run's log directory (TensorBoard, results.json) and its checkpoint directory."""
    group = f"{config.dataset_name}-l{config.max_sequence_length}"
    return Path(config.exp_root) / group / run_name, Path(config.ckpt_root) / group / run_name


def config_fingerprint(data: SequenceData) -> str:
    """The configuration and data a checkpoint belongs to; RESUMABLE_SETTINGS may change between runs."""
    lines = [l for l in gin.config_str().splitlines() if not l.startswith(RESUMABLE_SETTINGS)]
    return "\n".join(lines + [json.dumps(data.summary(), sort_keys=True)])


LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked_run(run_dir: Path) -> Iterator[None]:
    """Holds `run_dir`/.lock (flock) inside the block: one training per run directory.

    The OS releases the lock when the process ends, however it ends, so a killed run never leaves a stale
    lock. Raises ConfigError naming the process holding it. Directories made for the lock are removed again
    when the block leaves nothing else in them (a run that failed before its first epoch leaves no trace).
    """
    made = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(f"{run_dir} is being trained by another process (pid {lock.read().strip() or '?'}); "
                              f"wait for it to finish, or stop it, before training or deleting this run") from None
        try:
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            yield
        finally:
            if made is not None and [p for p in made.rglob("*") if not p.is_dir()] == [run_dir / LOCK_FILE]:
                shutil.rmtree(made)


# -------------------------------------------------------------------------------------------------
# The machine a run is on

def device_for(rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def versions() -> Dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except Exception:
        found["triton"] = "not installed"
    return found


# -------------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": dataclasses.asdict(state)}

    def write(tmp: Path) -> None:
        _torch_save(payload, tmp)
        faults.kill_if("checkpoint", state.epochs_done - 1)

    atomic_write(path, write)


def _torch_save(payload: Dict, path: Path) -> None:
    # Through a Python file: a full disk then raises OSError, not torch's RuntimeError ("enforce fail at ...").
    with open(path, "wb") as f:
        torch.save(payload, f)


def save_best(path: Path, weights: Dict[str, torch.Tensor], epoch: int, fingerprint: str) -> None:
    atomic_write(path, lambda tmp: _torch_save({"model": weights, "epoch": epoch, "fingerprint": fingerprint}, tmp))


def checkpoint_weights(payload: Dict) -> Tuple[Dict[str, torch.Tensor], int, Optional[str]]:
    """(weights, 0-based epoch, fingerprint) of a loaded last.pt or best.pt (None: a best.pt from before
    best checkpoints carried one)."""
    if "state" in payload:
        return payload["model"], payload["state"]["epochs_done"] - 1, payload["state"]["fingerprint"]
    return payload["model"], payload["epoch"], payload.get("fingerprint")


def load_checkpoint_file(path: Path, device: torch.device) -> Dict:
    """Reads a checkpoint without running code from it (no pickle beyond tensors and plain containers)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise  # unreadable file: the command names the path and the cause
    except Exception as exc:  # UnpicklingError for forbidden objects; others for damaged files
        text = str(exc).strip()
        # torch's own message advises weights_only=False, which would run the file's code: never quoted.
        cause = type(exc).__name__ if not text or "weights_only" in text or "Weights only" in text \
            else text.splitlines()[0]
        raise ConfigError(
            f"{path} cannot be loaded safely: it holds something other than tensors and plain values, or is damaged "
            f"({cause}). It was not written by this version of the trainer; delete it (or start the run over "
            f"with --fresh) to train from scratch"
        ) from None


def complete_best_checkpoint(path: Path, model: torch.nn.Module, best_epoch: int, fingerprint: str,
                             device: torch.device) -> bool:
    """Rewrites best.pt from `model` (the resumed weights, last.pt's, which are the best epoch's) when a run
    killed between writing last.pt and best.pt left it an epoch behind; True when it did."""
    if path.exists() and checkpoint_weights(load_checkpoint_file(path, device))[1] == best_epoch:
        return False
    save_best(path, model.state_dict(), best_epoch, fingerprint)
    return True


def load_resumable(path: Path, fresh: RunState, device: torch.device) -> Tuple[RunState, Dict]:
    """last.pt's state and payload, refused unless it belongs to `fresh`'s configuration, data and processes."""
    payload = load_checkpoint_file(path, device)
    saved = RunState(**payload["state"])
    if saved.fingerprint != fresh.fingerprint:
        raise ConfigError(f"checkpoint {path} belongs to a different configuration or data set; set "
                          f"train_fn.run_name to a new name, or delete the checkpoint to start over")
    if saved.world_size != fresh.world_size:
        raise ConfigError(f"checkpoint {path} was written by {saved.world_size} process(es), this run has "
                          f"{fresh.world_size}: the global batch (local batch x processes) would change mid-run; "
                          f"resume with {saved.world_size} process(es) (--num_processes) or start a new run")
    return saved, payload


# -------------------------------------------------------------------------------------------------
# results.json

def best_epoch(history: List[Dict], split: str, metric: str) -> Optional[Dict]:
    """The record of the epoch with the best `split`/`metric` among fully evaluated ones (None: none yet)."""
    full = [h for h in history if h["full_eval"]]
    return max(full, key=lambda h: h[split][metric]) if full else None


def write_results(path: Path, summary: Dict, state: RunState, best: Optional[Dict]) -> None:
    """results.json: the run's summary, then its timings, every epoch's record, the best and the last."""
    results = {
        **summary,
        "wall_seconds": state.wall_seconds,
        "process_seconds": state.process_seconds,
        "train_seconds": sum(record["train_seconds"] for record in state.history),
        "sessions": state.sessions,
        "epochs_done": state.epochs_done,
        "per_epoch": state.history,
        "best": {"selected_by": summary["selected_by"], **(best or {})},
        "last": state.history[-1] if state.history else {},
    }
    # Strict JSON: a non-finite value is null (ranking leaves metrics undefined on the data out: tasks/ranking.py).
    atomic_write(path, lambda tmp: tmp.write_text(strict_json(results)))


def run_summary(config: TrainConfig, run_name: str, run_dir: Path, data: SequenceData, device: torch.device,
                world_size: int, cuda_graph: bool, selected_by: str, process_start: float) -> Dict:
    """results.json's description of the run, before any epoch (the trainer adds the baselines)."""
    return {
        "run_name": run_name, "task": config.task, "dataset": config.dataset_name, "protocol": config.protocol,
        "main_module": config.main_module, "loss_module": config.loss_module,
        "stochastic_length_alpha": config.stochastic_length_alpha, "config": gin.config_str(),
        "device": device_name(device), "world_size": world_size, "cuda_graph": cuda_graph,
        "versions": versions(), "data": data.summary(), "run_dir": str(run_dir),
        "selected_by": selected_by, "process_start": process_start,
    }


class RunRecorder:
    """What rank 0 writes as a run goes: TensorBoard, last.pt and best.pt each epoch, results.json."""

    def __init__(self, config: TrainConfig, run_dir: Path, ckpt_dir: Path, summary: Dict, eval_splits: Sequence[str],
                 shown_metrics: Sequence[str]) -> None:
        self.run_dir, self.ckpt_dir, self.summary = run_dir, ckpt_dir, summary
        self.tensorboard = TensorBoardLog(run_dir, config, eval_splits, shown_metrics)

    def epoch(self, record: Dict, state: RunState, best: Optional[Dict], model: torch.nn.Module,
              optimizer: torch.optim.Optimizer) -> None:
        """After the epoch's record joined `state`: its scalars, last.pt, best.pt if it is the best, results.json."""
        epoch = record["epoch"]
        self.tensorboard.epoch(record)
        save_checkpoint(self.ckpt_dir / "last.pt", model, optimizer, state)
        if best is not None and best["epoch"] == epoch:
            faults.kill_if("best", epoch)
            save_best(self.ckpt_dir / "best.pt", model.state_dict(), epoch, state.fingerprint)
        if best is not None:
            self.tensorboard.best(best, epoch)
        self.tensorboard.flush()
        write_results(self.run_dir / "results.json", self.summary, state, best)

    def finish(self, state: RunState, best: Optional[Dict]) -> None:
        write_results(self.run_dir / "results.json", self.summary, state, best)
        self.tensorboard.close()
