"""The training loop: task (data, model, objective) -> AdamW steps -> evaluation every epoch.

One process per device (DistributedDataParallel over NCCL on GPUs, gloo on
CPU, or a single plain process). All sequences live on the device and batches
are gathered there. Every epoch ends with an evaluation, TensorBoard scalars,
a checkpoint and an updated `results.json` (runs.py); re-running the same command
continues from the last checkpoint. Each epoch reseeds the random generators
from (seed, epoch, rank), so a resumed run draws the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import json
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from generative_recommenders import faults
from generative_recommenders.config import ConfigError, TrainConfig
from generative_recommenders.cuda_graph import CudaGraphStep
from generative_recommenders.data.datasets import load_dataset
from generative_recommenders.evaluation.metrics import format_metrics
from generative_recommenders.files import strict_json
from generative_recommenders.precision import autocast, set_precision
from generative_recommenders.progress import Progress
from generative_recommenders.runs import (RunRecorder, RunState, best_epoch, complete_best_checkpoint,
                                          config_fingerprint, device_for, load_resumable, run_paths, run_summary)
from generative_recommenders.tasks import TASKS
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


def weights_finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def ranks_agree(model: torch.nn.Module, world_size: int) -> bool:
    """DDP keeps every rank's weights bitwise equal; a difference means the ranks train different models."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    checksum = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum()])
    gathered = [torch.empty_like(checksum) for _ in range(world_size)]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


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
        self.state.sessions += 1
        self.process_start = process_start or self.start_time
        self.earlier_process_seconds = self.state.process_seconds  # the processes before this one
        if rank == 0:
            self._complete_best_checkpoint()
        train_model = DistributedDataParallel(self.model) if dist.is_initialized() else self.model
        self.step = TrainStep(self.task, train_model, self.optimizer)
        self.summary = run_summary(config, self.run_name, self.run_dir, data, self.device, world_size, use_graph,
                                   f"{self.task.selection_split}/{self.task.selection_metric}",
                                   self.process_start)
        self.recorder: Optional[RunRecorder] = None  # rank 0's, from the start of the run

    # ---------------------------------------------------------------------------------------------
    # Set-up

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _resume(self, fresh: RunState) -> RunState:
        path = self.ckpt_dir / "last.pt"
        if not (self.config.resume and path.exists()):
            return fresh
        saved, payload = load_resumable(path, fresh, self.device)
        if saved.epochs_done > self.config.num_epochs:
            raise ConfigError(f"{self.run_name} has trained {saved.epochs_done} epochs already, more than "
                              f"train_fn.num_epochs = {self.config.num_epochs}: nothing to do (raise num_epochs to "
                              f"continue it, or start over with --fresh)")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self._log(f"resuming {self.run_name} from {path} after epoch {saved.epochs_done}")
        return saved

    def _eval_share(self) -> Tuple[int, int]:
        """(rank, world size) as evaluation sees them: one share per rank, or everything everywhere."""
        return (self.rank, self.world_size) if self.task.shards_evaluation else (0, 1)

    def _complete_best_checkpoint(self) -> None:
        """best.pt, when the resumed epoch (last.pt's) is the best and a kill came before best.pt was written."""
        best = self.best_epoch()
        if best is None or best["epoch"] != self.state.epochs_done - 1:
            return
        if complete_best_checkpoint(self.ckpt_dir / "best.pt", self.model, best["epoch"], self.state.fingerprint,
                                    self.device):
            self._log(f"best.pt lacked epoch {best['epoch'] + 1} (killed before it was written): restored")

    def _announce(self) -> None:
        rank, world_size = self._eval_share()
        self.summary.update(self.task.metric_notes())
        self.summary["baselines"] = {name: self.task.baselines(self.task.splits[name][rank::world_size])
                                     for name in self.task.eval_splits}
        if self.rank != 0:
            return
        self.recorder = RunRecorder(self.config, self.run_dir, self.ckpt_dir, self.summary, self.task.eval_splits,
                                    self.task.shown_metrics)
        self._log(f"{self.run_name}: {self.task.describe()}, {self.world_size} process(es) on "
                  f"{self.summary['device']}; logs in {self.run_dir}")
        for split, baselines in self.summary["baselines"].items():
            for name, metrics in baselines.items():
                self._log(f"{name} baseline, {split}: {format_metrics(metrics, self.task.shown_metrics)}")
        for metric, reason in self.summary.get("undefined_metrics", {}).items():
            self._log(f"{metric} left out: {reason}")

    # ---------------------------------------------------------------------------------------------
    # One epoch

    def _train_epoch(self, epoch: int) -> Tuple[float, int, int]:
        """Runs the epoch's steps; returns the mean training loss and the history positions trained over all
        ranks, and the steps of each rank."""
        config, samples = self.config, self.task.splits["train"]
        shard = samples[_shard(samples.shape[0], epoch, config.random_seed, self.rank, self.world_size)]
        shard = self.task.train_samples(shard, epoch, self.rank)
        # One upload per epoch: a host-to-device copy per step would wait for the GPU to go idle.
        shard_on_device = torch.as_tensor(shard, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        starts = range(0, shard.shape[0], config.local_batch_size)
        progress = Progress(f"epoch {epoch + 1}/{config.num_epochs}", len(starts), self._log)
        for i, start in enumerate(starts):
            if start >= shard.shape[0] // 2:
                faults.kill_if("train", epoch, self.rank)
            if config.num_warmup_steps:
                for group in self.optimizer.param_groups:
                    group["lr"] = warmup_lr(config, self.state.step)
            end = start + config.local_batch_size
            total = self.task.batch_total(shard[start:end])
            loss_sum += self.step(shard_on_device[start:end], total)
            tokens += total
            self.state.step += 1
            progress.update(i + 1, self.device)
        if faults.poison_loss(epoch, self.rank):
            loss_sum += float("nan")
        if faults.poison_weights(epoch, self.rank):
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        # Token counts stay exact in float64 up to 2^53.
        sums = _all_reduce(torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64,
                                                                 device=self.device)]))
        return float(sums[0].item()) / max(len(starts) * self.world_size, 1), int(sums[1].item()), len(starts)

    def _stop_non_finite(self, what: str, epoch: int) -> None:
        kept = (f"the last good checkpoint ({self.ckpt_dir / 'last.pt'}, after epoch {self.state.epochs_done}) is kept"
                if self.state.epochs_done else "no checkpoint was written yet")
        raise FloatingPointError(f"non-finite {what} in epoch {epoch + 1} of {self.run_name}; stopping. {kept}. "
                                 f"Try a lower learning rate or warmup.")

    def _check_finite(self, train_loss: float, epoch: int) -> None:
        """Stops on a non-finite loss, or on weights the epoch's last update made non-finite."""
        if not np.isfinite(train_loss):
            self._stop_non_finite("training loss", epoch)
        if not weights_finite(self.model):
            self._stop_non_finite("weights after the last update", epoch)

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
        train_loss, train_tokens, train_steps = self._train_epoch(epoch)
        self._check_finite(train_loss, epoch)
        if dist.is_initialized() and not ranks_agree(self.model, self.world_size):
            raise RuntimeError(f"the {self.world_size} processes hold different weights after epoch {epoch + 1}")
        train_seconds = time.time() - epoch_start  # train_loss waited for the last step
        faults.kill_if("eval", epoch, self.rank)
        full = is_full_eval(epoch, self.config)
        # train_tokens: history positions trained (Stochastic Length lowers it), before padding to token buckets.
        record = {"epoch": epoch, "train_loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                  "full_eval": full, "train_seconds": train_seconds, "train_steps": train_steps,
                  "train_tokens": train_tokens, **self._evaluate(epoch, full)}
        record["seconds"] = time.time() - epoch_start
        return record

    # ---------------------------------------------------------------------------------------------
    # Logging, checkpoints, results

    def best_epoch(self) -> Optional[Dict]:
        return best_epoch(self.state.history, self.task.selection_split, self.task.selection_metric)

    def _should_stop_early(self) -> bool:
        patience = self.config.early_stopping_patience
        best = self.best_epoch()
        return bool(patience) and best is not None and self.state.history[-1]["epoch"] - best["epoch"] >= patience

    def _log_epoch(self, record: Dict) -> None:
        if self.rank != 0:
            return
        self.recorder.epoch(record, self.state, self.best_epoch(), self.model, self.optimizer)
        epoch = record["epoch"]
        partial = "" if record["full_eval"] else " (partial)"
        evals = " | ".join(f"{name}{partial} {format_metrics(record[name], self.task.shown_metrics)}"
                           for name in self.task.eval_splits)
        print(f"epoch {epoch + 1}/{self.config.num_epochs} loss {record['train_loss']:.4f} | {evals} | "
              f"{record['seconds']:.1f}s", flush=True)

    def _finish(self) -> Dict:
        if self.rank == 0:
            best = self.best_epoch()
            measured = self.task.final_measurements()
            for name, values in measured.items():
                print(f"{name}: {strict_json(values, indent=None)}", flush=True)
            self.summary.update(measured)
            self.recorder.finish(self.state, best)
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
            self._add_times()
            self._log_epoch(record)
        self._add_times()
        return self._finish()

    def _add_times(self) -> None:
        """Brings the run's cumulative times up to now (saved with the next checkpoint and results.json)."""
        now = time.time()
        self.state.wall_seconds += now - self.start_time
        self.start_time = now
        self.state.process_seconds = self.earlier_process_seconds + now - self.process_start


def train_fn(rank: int = 0, world_size: int = 1, default_run_name: str = "run",
             process_start: Optional[float] = None) -> Dict:
    """Trains and evaluates the gin-configured TrainConfig; returns the results dict (also in results.json)."""
    return Trainer(TrainConfig(), rank, world_size, default_run_name, process_start).run()
