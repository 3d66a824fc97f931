"""The training loop: task (data, model, objective) -> AdamW steps -> evaluation every epoch.

One process per device (DistributedDataParallel over NCCL on GPUs, gloo on
CPU, or a single plain process). All sequences live on the device and batches
are gathered there. Every epoch ends with an evaluation, TensorBoard scalars,
a checkpoint and an updated `results.json`; re-running the same command
continues from the last checkpoint. Each epoch reseeds the random generators
from (seed, epoch, rank), so a resumed run draws the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import gin
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from generative_recommenders import faults
from generative_recommenders.config import ConfigError, TrainConfig
from generative_recommenders.cuda_graph import CudaGraphStep
from generative_recommenders.data.datasets import load_dataset
from generative_recommenders.data.sequence_store import SequenceData, atomic_write
from generative_recommenders.evaluation.metrics import format_metrics
from generative_recommenders.precision import autocast
from generative_recommenders.tasks import TASKS
PROGRESS_EVERY_S = 10.0
# Settings a run may change and still resume its checkpoint (left out of its fingerprint and its name).
RESUMABLE_SETTINGS = ("train_fn.num_epochs", "train_fn.resume", "train_fn.early_stopping_patience")


@dataclasses.dataclass
class RunState:
    """What a checkpoint carries besides the weights (plain values only: it is loaded without pickle)."""

    fingerprint: str = ""
    world_size: int = 1
    epochs_done: int = 0
    step: int = 0
    wall_seconds: float = 0.0
    history: List[Dict] = dataclasses.field(default_factory=list)


def device_for(rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def set_precision(config: TrainConfig) -> None:
    """The run's matmul precision (TF32 or full fp32 on GPUs), process-wide."""
    torch.backends.cuda.matmul.allow_tf32 = config.enable_tf32
    torch.backends.cudnn.allow_tf32 = config.enable_tf32


def _shard(num: int, epoch: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's indices of a seeded per-epoch permutation, padded so every rank gets as many."""
    order = np.random.default_rng([seed, epoch]).permutation(num)
    per_rank = -(-num // world_size)
    order = np.concatenate([order, order[: per_rank * world_size - num]])
    return order[rank::world_size]


def eval_samples(samples: np.ndarray, epoch: int, seed: int, rank: int, world_size: int, full: bool) -> np.ndarray:
    """A full evaluation splits the samples over the ranks; a partial one takes a shuffled share.

    (Tasks whose metrics are no sums over samples pass world_size 1: every rank evaluates everything.)
    """
    if full:
        return samples[rank::world_size]
    return samples[_shard(samples.shape[0], epoch, seed + 1, rank, world_size)]


def is_full_eval(epoch: int, config: TrainConfig) -> bool:
    """Books' rule (REFERENCE.md section 7): full every n-th epoch and at the last, partial otherwise."""
    return epoch % config.full_eval_every_n == 0 or epoch == config.num_epochs - 1


def warmup_lr(config: TrainConfig, step: int) -> float:
    """Linear warmup over num_warmup_steps optimizer steps, then the constant rate."""
    if config.num_warmup_steps == 0:
        return config.learning_rate
    return config.learning_rate * min(1.0, (step + 1) / config.num_warmup_steps)


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _versions() -> Dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception:
        versions["triton"] = "not installed"
    return versions


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def config_fingerprint(data: SequenceData) -> str:
    """The configuration and data a checkpoint belongs to; RESUMABLE_SETTINGS may change between runs."""
    lines = [l for l in gin.config_str().splitlines() if not l.startswith(RESUMABLE_SETTINGS)]
    return "\n".join(lines + [json.dumps(data.summary(), sort_keys=True)])


def run_paths(config: TrainConfig, run_name: str) -> Tuple[Path, Path]:
    """The run's log directory (TensorBoard, results.json) and its checkpoint directory."""
    group = f"{config.dataset_name}-l{config.max_sequence_length}"
    return Path(config.exp_root) / group / run_name, Path(config.ckpt_root) / group / run_name


def hparams_of(config: TrainConfig) -> Dict[str, object]:
    """The settings TensorBoard's HParams tab filters and compares runs by."""
    return {"dataset": config.dataset_name, "protocol": config.protocol, "model": config.main_module,
            "loss": config.loss_module, "dim": config.item_embedding_dim, "max_len": config.max_sequence_length,
            "lr": config.learning_rate, "dropout": config.dropout_rate, "negatives": config.num_negatives,
            "sampling": config.sampling_strategy, "batch": config.local_batch_size,
            "weight_decay": config.weight_decay, "temperature": config.temperature,
            "precision": config.mixed_precision}


def hparams_summaries(config: TrainConfig, metric_tags: List[str]) -> Tuple:
    """TensorBoard's HParams records of a run: (experiment, session start, session end). The tab reads each
    metric's value from the scalars of its tag."""
    from torch.utils.tensorboard.summary import hparams

    return hparams(hparams_of(config), dict.fromkeys(metric_tags, 0.0))


class TrainStep:
    """One optimizer step on a batch of samples already on the device.

    Under the model's padded layout (one GPU) the whole step (gather,
    forward, loss, backward, AdamW) is a CUDA-graph replay (see
    cuda_graph.py). The forward pass and loss run under the task's
    train_fn.mixed_precision (precision.py); backward and AdamW outside it.
    Returns the batch's loss, valid until the next call.
    """

    def __init__(self, task, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.task, self.train_model, self.optimizer = task, train_model, optimizer
        self.mixed_precision = task.config.mixed_precision
        self.graphed = CudaGraphStep(self._run, task.model)

    def _run(self, samples: torch.Tensor, total: int) -> torch.Tensor:
        # Gradients set to None (not zeroed): under a graph, backward then writes them afresh each replay.
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.mixed_precision, samples.device):
            loss = self.task.loss(self.train_model, samples, total)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, samples: torch.Tensor, total: int) -> torch.Tensor:
        return self.graphed(samples, total)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": dataclasses.asdict(state)}

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        faults.kill_if("checkpoint", state.epochs_done - 1)

    atomic_write(path, write)


def save_best(path: Path, weights: Dict[str, torch.Tensor], epoch: int, fingerprint: str) -> None:
    atomic_write(path, lambda tmp: torch.save({"model": weights, "epoch": epoch, "fingerprint": fingerprint}, tmp))


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
    except Exception as exc:  # UnpicklingError for forbidden objects; others for damaged files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{path} cannot be loaded safely: it holds something other than tensors and plain values, or is damaged "
            f"({first_line}). It was not written by this version of the trainer; delete it (or start the run over "
            f"with train_fn.resume = False) to train from scratch"
        ) from None


class Trainer:
    """Runs one configuration: set-up, then per epoch: train, check, evaluate, log and checkpoint."""

    def __init__(self, config: TrainConfig, rank: int, world_size: int, default_run_name: str,
                 process_start: Optional[float]) -> None:
        config.validate()
        self.config, self.rank, self.world_size = config, rank, world_size
        self.start_time = time.time()
        self.device = device_for(rank)
        set_precision(config)
        self.run_name = config.run_name or default_run_name
        self.run_dir, self.ckpt_dir = run_paths(config, self.run_name)

        data = load_dataset(config.dataset_name, config.data_dir)
        torch.manual_seed(config.random_seed)
        self.task = TASKS[config.task](config, data, self.device)
        config.check_batch_fits(self.task.splits["train"].shape[0], world_size)
        self.model = self.task.model
        use_graph = (config.cuda_graphs and world_size == 1 and config.num_warmup_steps == 0
                     and self.task.use_cuda_graphs(self.device))
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98), weight_decay=config.weight_decay,
            fused=self.device.type == "cuda", capturable=use_graph,
        )
        self.state = self._resume(RunState(fingerprint=config_fingerprint(data), world_size=world_size))
        if rank == 0:
            self._complete_best_checkpoint()
        train_model = DistributedDataParallel(self.model) if dist.is_initialized() else self.model
        self.step = TrainStep(self.task, train_model, self.optimizer)
        self.summary = {
            "run_name": self.run_name, "task": config.task, "dataset": config.dataset_name, "protocol": config.protocol,
            "main_module": config.main_module, "loss_module": config.loss_module, "config": gin.config_str(),
            "device": _device_name(self.device), "world_size": world_size, "cuda_graph": use_graph,
            "versions": _versions(), "data": data.summary(), "run_dir": str(self.run_dir),
            "selected_by": f"{self.task.selection_split}/{self.task.selection_metric}",
            "process_start": process_start or self.start_time,
        }
        self.writer = None
        self.session_end = None

    # ---------------------------------------------------------------------------------------------
    # Set-up

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _resume(self, fresh: RunState) -> RunState:
        path = self.ckpt_dir / "last.pt"
        if not (self.config.resume and path.exists()):
            return fresh
        payload = load_checkpoint_file(path, self.device)
        saved = RunState(**payload["state"])
        if saved.fingerprint != fresh.fingerprint:
            raise ConfigError(f"checkpoint {path} belongs to a different configuration or data set; set "
                              f"train_fn.run_name to a new name, or delete the checkpoint to start over")
        if saved.world_size != fresh.world_size:
            raise ConfigError(f"checkpoint {path} was written by {saved.world_size} process(es), this run has "
                              f"{fresh.world_size}: the global batch (local batch x processes) would change mid-run; "
                              f"resume with {saved.world_size} process(es) (--num_processes) or start a new run")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self._log(f"resuming {self.run_name} from {path} after epoch {saved.epochs_done}")
        return saved

    def _eval_share(self) -> Tuple[int, int]:
        """(rank, world size) as evaluation sees them: one share per rank, or everything everywhere."""
        return (self.rank, self.world_size) if self.task.shards_evaluation else (0, 1)

    def _complete_best_checkpoint(self) -> None:
        """A run killed between writing last.pt and best.pt left best.pt an epoch behind; the resumed
        weights (last.pt's) are then the best epoch's, so best.pt is rewritten from them."""
        best = self.best_epoch()
        if best is None or best["epoch"] != self.state.epochs_done - 1:
            return
        path = self.ckpt_dir / "best.pt"
        if not path.exists() or checkpoint_weights(load_checkpoint_file(path, self.device))[1] != best["epoch"]:
            save_best(path, self.model.state_dict(), best["epoch"], self.state.fingerprint)
            self._log(f"best.pt lacked epoch {best['epoch'] + 1} (killed before it was written): restored")

    def _best_metrics(self) -> Dict[str, Tuple[str, str]]:
        """TensorBoard tag -> (split, metric) of the best epoch's metrics the HParams tab shows."""
        return {f"best/{split}/{metric}": (split, metric)
                for split in self.task.eval_splits for metric in self.task.shown_metrics}

    def _announce(self) -> None:
        rank, world_size = self._eval_share()
        self.summary["baselines"] = {name: self.task.baselines(self.task.splits[name][rank::world_size])
                                     for name in self.task.eval_splits}
        if self.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.run_dir))
        # Written into the run's own directory (SummaryWriter.add_hparams would open a sub-run).
        experiment, session_start, self.session_end = hparams_summaries(self.config, list(self._best_metrics()))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        self._log(f"{self.run_name}: {self.task.describe()}, {self.world_size} process(es) on "
                  f"{self.summary['device']}; logs in {self.run_dir}")
        for split, baselines in self.summary["baselines"].items():
            for name, metrics in baselines.items():
                self._log(f"{name} baseline, {split}: {format_metrics(metrics, self.task.shown_metrics)}")

    # ---------------------------------------------------------------------------------------------
    # One epoch

    def _train_epoch(self, epoch: int) -> float:
        """Runs the epoch's steps; returns the mean training loss over all ranks."""
        config, samples = self.config, self.task.splits["train"]
        shard = samples[_shard(samples.shape[0], epoch, config.random_seed, self.rank, self.world_size)]
        # One upload per epoch: a host-to-device copy per step would wait for the GPU to go idle.
        shard_on_device = torch.as_tensor(shard, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        starts = range(0, shard.shape[0], config.local_batch_size)
        progress = Progress(f"epoch {epoch + 1}/{config.num_epochs}", len(starts), self._log)
        for i, start in enumerate(starts):
            if start >= shard.shape[0] // 2:
                faults.kill_if("train", epoch, self.rank)
            if config.num_warmup_steps:
                for group in self.optimizer.param_groups:
                    group["lr"] = warmup_lr(config, self.state.step)
            end = start + config.local_batch_size
            loss_sum += self.step(shard_on_device[start:end], self.task.batch_total(shard[start:end]))
            self.state.step += 1
            progress.update(i + 1, self.device)
        if faults.poison_loss(epoch, self.rank):
            loss_sum += float("nan")
        return float(_all_reduce(loss_sum).item()) / max(len(starts) * self.world_size, 1)

    def _stop_non_finite(self, what: str, epoch: int) -> None:
        kept = (f"the last good checkpoint ({self.ckpt_dir / 'last.pt'}, after epoch {self.state.epochs_done}) is kept"
                if self.state.epochs_done else "no checkpoint was written yet")
        raise FloatingPointError(f"non-finite {what} in epoch {epoch + 1} of {self.run_name}; stopping. {kept}. "
                                 f"Try a lower learning rate or warmup.")

    def _check_finite(self, train_loss: float, epoch: int) -> None:
        """Stops on a non-finite loss, or on weights the epoch's last update made non-finite."""
        if not np.isfinite(train_loss):
            self._stop_non_finite("training loss", epoch)
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()
        if not bool(finite):
            self._stop_non_finite("weights after the last update", epoch)

    def _check_ranks_agree(self, epoch: int) -> None:
        """DDP keeps every rank's weights bitwise equal; a difference means the ranks train different models."""
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.model.parameters()])
        checksum = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum()])
        gathered = [torch.empty_like(checksum) for _ in range(self.world_size)]
        dist.all_gather(gathered, checksum)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"the {self.world_size} processes hold different weights after epoch {epoch + 1}")

    def _evaluate(self, epoch: int, full: bool) -> Dict[str, Dict[str, float]]:
        config = self.config
        rank, world_size = self._eval_share()
        results = {}
        for name in self.task.eval_splits:
            samples = eval_samples(self.task.splits[name], epoch, config.random_seed, rank, world_size, full)
            max_batches = None if full else -(-config.partial_eval_num_batches // world_size)
            try:
                results[name] = self.task.evaluate(samples, max_batches)
            except FloatingPointError as exc:
                self._stop_non_finite(f"scores at evaluation ({exc})", epoch)
        return results

    def _run_epoch(self, epoch: int) -> Dict:
        epoch_start = time.time()
        torch.manual_seed(self.config.random_seed * 1_000_003 + epoch * 101 + self.rank)
        self.model.train()
        train_loss = self._train_epoch(epoch)
        self._check_finite(train_loss, epoch)
        if dist.is_initialized():
            self._check_ranks_agree(epoch)
        train_seconds = time.time() - epoch_start  # train_loss waited for the last step
        faults.kill_if("eval", epoch, self.rank)
        full = is_full_eval(epoch, self.config)
        record = {"epoch": epoch, "train_loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                  "full_eval": full, "train_seconds": train_seconds, **self._evaluate(epoch, full)}
        record["seconds"] = time.time() - epoch_start
        return record

    # ---------------------------------------------------------------------------------------------
    # Logging, checkpoints, results

    def best_epoch(self) -> Optional[Dict]:
        split, metric = self.task.selection_split, self.task.selection_metric
        full = [h for h in self.state.history if h["full_eval"]]
        return max(full, key=lambda h: h[split][metric]) if full else None

    def _should_stop_early(self) -> bool:
        patience = self.config.early_stopping_patience
        best = self.best_epoch()
        return bool(patience) and best is not None and self.state.history[-1]["epoch"] - best["epoch"] >= patience

    def _write_results(self) -> None:
        best = self.best_epoch()
        results = {
            **self.summary,
            "wall_seconds": self.state.wall_seconds,
            "process_seconds": time.time() - self.summary["process_start"],
            "epochs_done": self.state.epochs_done,
            "per_epoch": self.state.history,
            "best": {"selected_by": self.summary["selected_by"], **(best or {})},
            "last": self.state.history[-1] if self.state.history else {},
        }
        atomic_write(self.run_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))

    def _log_epoch(self, record: Dict) -> None:
        if self.rank != 0:
            return
        epoch = record["epoch"]
        self.writer.add_scalar("train/loss", record["train_loss"], epoch)
        self.writer.add_scalar("train/lr", record["lr"], epoch)
        for name in self.task.eval_splits:
            for metric, value in record[name].items():
                self.writer.add_scalar(f"{name}/{metric}", value, epoch)
        save_checkpoint(self.ckpt_dir / "last.pt", self.model, self.optimizer, self.state)
        best = self.best_epoch()
        if best is not None and best["epoch"] == epoch:
            faults.kill_if("best", epoch)
            save_best(self.ckpt_dir / "best.pt", self.model.state_dict(), epoch, self.state.fingerprint)
        if best is not None:
            for tag, (split, metric) in self._best_metrics().items():  # the HParams tab shows the latest value
                self.writer.add_scalar(tag, best[split][metric], epoch)
        self.writer.flush()
        self._write_results()
        partial = "" if record["full_eval"] else " (partial)"
        evals = " | ".join(f"{name}{partial} {format_metrics(record[name], self.task.shown_metrics)}"
                           for name in self.task.eval_splits)
        print(f"epoch {epoch + 1}/{self.config.num_epochs} loss {record['train_loss']:.4f} | {evals} | "
              f"{record['seconds']:.1f}s", flush=True)

    def _finish(self) -> Dict:
        if self.rank == 0:
            self._write_results()
            self.writer.file_writer.add_summary(self.session_end)
            self.writer.close()
            best = self.best_epoch()
            if best is not None:
                report = " | ".join(f"{name} {format_metrics(best[name], self.task.shown_metrics)}"
                                    for name in self.task.eval_splits)
                print(f"best epoch {best['epoch'] + 1} by {self.summary['selected_by']}: {report}", flush=True)
            print(f"results: {self.run_dir / 'results.json'}; TensorBoard: tensorboard --logdir "
                  f"{self.run_dir.parent}", flush=True)
        if dist.is_initialized():
            dist.barrier()
        return json.loads((self.run_dir / "results.json").read_text()) if self.rank == 0 else {}

    def run(self) -> Dict:
        self._announce()
        for epoch in range(self.state.epochs_done, self.config.num_epochs):
            if self._should_stop_early():
                self._log(f"early stopping: no better {self.summary['selected_by']} for "
                          f"{self.config.early_stopping_patience} epochs")
                break
            record = self._run_epoch(epoch)
            self.state.history.append(record)
            self.state.epochs_done = epoch + 1
            self.state.wall_seconds += time.time() - self.start_time
            self.start_time = time.time()
            self._log_epoch(record)
        self.state.wall_seconds += time.time() - self.start_time
        return self._finish()


class Progress:
    """A progress line (rate, ETA) at most every PROGRESS_EVERY_S seconds within a long loop; none in a short one."""

    def __init__(self, label: str, num_steps: int, log, units: str = "steps") -> None:
        self.label, self.num_steps, self.log, self.units = label, num_steps, log, units
        self.start = self.last = time.time()

    def update(self, steps_done: int, device: torch.device) -> None:
        now = time.time()
        if now - self.last < PROGRESS_EVERY_S or steps_done == self.num_steps:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # launches run ahead of the GPU; rate what has finished
            now = time.time()
        self.last = now
        rate = steps_done / (now - self.start)
        self.log(f"  {self.label}: {steps_done}/{self.num_steps} {self.units}, {rate:.1f} {self.units}/s, "
                 f"ETA {(self.num_steps - steps_done) / rate:.0f}s")


def train_fn(rank: int = 0, world_size: int = 1, default_run_name: str = "run",
             process_start: Optional[float] = None) -> Dict:
    """Trains and evaluates the gin-configured TrainConfig; returns the results dict (also in results.json)."""
    return Trainer(TrainConfig(), rank, world_size, default_run_name, process_start).run()
