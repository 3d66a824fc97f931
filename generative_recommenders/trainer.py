"""The training loop: data -> model -> loss -> AdamW steps -> evaluation every epoch.

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
from typing import Dict, List, Optional

import gin
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from generative_recommenders import faults
from generative_recommenders.data.samples import Batch, DeviceSequences, history_total, make_splits, selection_split
from generative_recommenders.data.sequence_store import SequenceData, atomic_write
from generative_recommenders.data.datasets import load_dataset
from generative_recommenders.cuda_graph import CudaGraphStep
from generative_recommenders.evaluation import CandidateIndex, Evaluator, format_metrics
from generative_recommenders.loss import NegativesSampler, autoregressive_loss
from generative_recommenders.modeling.recommender import SequentialRecommender
from ops.jagged import dense_to_jagged

SELECTION_METRIC = "ndcg@10"


@dataclasses.dataclass
class RunState:
    """What a checkpoint carries besides the weights."""

    fingerprint: str = ""
    epochs_done: int = 0
    step: int = 0
    wall_seconds: float = 0.0
    history: List[Dict] = dataclasses.field(default_factory=list)


def _device_for(rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def _shard(num: int, epoch: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's indices of a seeded per-epoch permutation, padded so every rank gets as many."""
    order = np.random.default_rng([seed, epoch]).permutation(num)
    per_rank = -(-num // world_size)
    order = np.concatenate([order, order[: per_rank * world_size - num]])
    return order[rank::world_size]


def _eval_samples(samples: np.ndarray, epoch: int, seed: int, rank: int, world_size: int, full: bool) -> np.ndarray:
    """A full evaluation splits the users over the ranks; a partial one takes a shuffled share."""
    if full:
        return samples[rank::world_size]
    return samples[_shard(samples.shape[0], epoch, seed + 1, rank, world_size)]


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def training_popularity(data: SequenceData, train_samples: np.ndarray, index: CandidateIndex) -> torch.Tensor:
    """(C,) count of each candidate among the items the training samples contain."""
    ends = np.zeros(data.num_users, dtype=np.int64)
    ends[train_samples[:, 0]] = train_samples[:, 1]
    user_of_row = np.repeat(np.arange(data.num_users), data.lengths)
    position = np.arange(data.num_interactions) - data.offsets[user_of_row]
    counts = np.bincount(data.item_ids[position < ends[user_of_row]], minlength=data.max_item_id + 1)
    return torch.as_tensor(counts, device=index.candidate_ids.device)[index.candidate_ids.long()]


def batch_loss(
    train_model: torch.nn.Module,
    model: SequentialRecommender,
    batch: Batch,
    sampler: NegativesSampler,
    loss_module: str,
    num_negatives: int,
    temperature: float,
) -> torch.Tensor:
    """Forward pass and loss of one training batch (train_model may be the DDP wrapper of model)."""
    out, offsets = train_model(batch.ids, batch.timestamps, batch.lengths, batch.total)
    labels = torch.nn.functional.pad(batch.ids[:, 1:], (0, 1))
    positive_ids = dense_to_jagged(labels.unsqueeze(-1), offsets, out.shape[0]).squeeze(-1)
    return autoregressive_loss(loss_module, out, positive_ids, model.item_embedding, sampler, num_negatives, temperature)


class TrainStep:
    """One optimizer step on a batch of (user, end) samples already on the device.

    On a single GPU the whole step (gather, forward, loss, backward, AdamW) is
    a CUDA-graph replay (see cuda_graph.py). The graph needs static shapes, so
    the model then encodes the padded layout (see SequentialRecommender).
    Returns the batch's loss, valid until the next call.
    """

    def __init__(self, train_model: torch.nn.Module, model: SequentialRecommender, optimizer: torch.optim.Optimizer,
                 sequences: DeviceSequences, sampler: NegativesSampler, loss_module: str, num_negatives: int,
                 temperature: float, max_history: int, use_graph: bool) -> None:
        self.train_model, self.model, self.optimizer = train_model, model, optimizer
        self.sequences, self.sampler = sequences, sampler
        self.loss_args = (loss_module, num_negatives, temperature)
        self.max_history = max_history
        self.graphed = CudaGraphStep(self._run, use_graph)

    def _run(self, samples: torch.Tensor, total: int) -> torch.Tensor:
        # Gradients set to None (not zeroed): under a graph, backward then writes them afresh each replay.
        self.optimizer.zero_grad(set_to_none=True)
        batch = self.sequences.gather(samples, self.max_history, self.model.max_seq_len, total)
        loss = batch_loss(self.train_model, self.model, batch, self.sampler, *self.loss_args)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, samples: torch.Tensor, total: int) -> torch.Tensor:
        return self.graphed(samples, total)


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
    """The configuration and data a checkpoint belongs to; num_epochs may change on resume."""
    lines = [l for l in gin.config_str().splitlines() if not l.startswith(("train_fn.num_epochs", "train_fn.resume"))]
    return "\n".join(lines + [json.dumps(data.summary(), sort_keys=True)])


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": dataclasses.asdict(state)}

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        faults.kill_if("checkpoint", state.epochs_done - 1)

    atomic_write(path, write)


def _load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> RunState:
    payload = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return RunState(**payload["state"])


def _best_epoch(history: List[Dict], split: str) -> Optional[Dict]:
    full = [h for h in history if h["full_eval"]]
    return max(full, key=lambda h: h[split][SELECTION_METRIC]) if full else None


def _write_results(path: Path, summary: Dict, state: RunState, split: str) -> None:
    best = _best_epoch(state.history, split)
    results = {
        **summary,
        "wall_seconds": state.wall_seconds,
        "process_seconds": time.time() - summary["process_start"],
        "epochs_done": state.epochs_done,
        "per_epoch": state.history,
        "best": {"selected_by": f"{split}/{SELECTION_METRIC}", **(best or {})},
        "last": state.history[-1] if state.history else {},
    }
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))


@gin.configurable
def train_fn(
    rank: int,
    world_size: int,
    default_run_name: str = "run",
    process_start: Optional[float] = None,
    dataset_name: str = "synthetic",
    data_dir: str = "tmp",
    protocol: str = "paper",
    max_sequence_length: int = 200,
    gr_output_length: int = 10,
    local_batch_size: int = 128,
    eval_batch_size: int = 128,
    main_module: str = "HSTU",
    item_embedding_dim: int = 50,
    dropout_rate: float = 0.2,
    user_embedding_norm: str = "l2_norm",
    loss_module: str = "SampledSoftmaxLoss",
    num_negatives: int = 128,
    sampling_strategy: str = "local",
    temperature: float = 0.05,
    item_l2_norm: bool = True,
    l2_norm_eps: float = 1e-6,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    num_warmup_steps: int = 0,
    num_epochs: int = 101,
    full_eval_every_n: int = 1,
    partial_eval_num_batches: int = 64,
    enable_tf32: bool = True,
    random_seed: int = 42,
    run_name: Optional[str] = None,
    exp_root: str = "exps",
    ckpt_root: str = "ckpts",
    resume: bool = True,
    cuda_graphs: bool = True,
) -> Dict:
    """Trains and evaluates one configuration; returns the results dict (also in results.json)."""
    start_time = time.time()
    device = _device_for(rank)
    torch.backends.cuda.matmul.allow_tf32 = enable_tf32
    torch.backends.cudnn.allow_tf32 = enable_tf32
    run_name = run_name or default_run_name
    run_dir = Path(exp_root) / f"{dataset_name}-l{max_sequence_length}" / run_name
    ckpt_path = Path(ckpt_root) / f"{dataset_name}-l{max_sequence_length}" / run_name / "last.pt"

    data: SequenceData = load_dataset(dataset_name, data_dir)
    splits = make_splits(data.lengths, protocol)
    eval_splits = [name for name in splits if name != "train"]
    split = selection_split(protocol)
    sequences = DeviceSequences(data, device)
    candidate_ids = torch.as_tensor(data.candidate_ids, dtype=torch.long, device=device)
    index = CandidateIndex(candidate_ids, data.max_item_id)
    padded_len = max_sequence_length + gr_output_length + 1

    torch.manual_seed(random_seed)
    model = SequentialRecommender(main_module, data.max_item_id, padded_len, item_embedding_dim, dropout_rate,
                                  user_embedding_norm).to(device)
    use_graph = (cuda_graphs and device.type == "cuda" and world_size == 1 and num_warmup_steps == 0
                 and sampling_strategy == "local" and model.graph_safe(device))
    model.padded_layout = use_graph
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=weight_decay,
                                  fused=device.type == "cuda", capturable=use_graph)
    sampler = NegativesSampler(sampling_strategy, candidate_ids, item_l2_norm, l2_norm_eps)
    state = RunState(fingerprint=config_fingerprint(data))
    if resume and ckpt_path.exists():
        saved = _load_checkpoint(ckpt_path, model, optimizer, device)
        if saved.fingerprint != state.fingerprint:
            raise ValueError(
                f"checkpoint {ckpt_path} belongs to a different configuration or data set; set "
                f"train_fn.run_name to a new name, or delete the checkpoint to start over"
            )
        state = saved
        _log(rank, f"resuming {run_name} from {ckpt_path} after epoch {state.epochs_done}")
    train_model = DistributedDataParallel(model) if dist.is_initialized() else model
    step = TrainStep(train_model, model, optimizer, sequences, sampler, loss_module, num_negatives, temperature,
                     max_sequence_length, use_graph)

    summary = {
        "run_name": run_name, "dataset": dataset_name, "protocol": protocol, "main_module": main_module,
        "config": gin.config_str(), "device": _device_name(device), "world_size": world_size, "cuda_graph": use_graph,
        "versions": _versions(), "data": data.summary(), "run_dir": str(run_dir),
        "process_start": process_start or start_time,
    }
    popular = Evaluator(model, sequences, index, max_sequence_length, eval_batch_size,
                        popularity=training_popularity(data, splits["train"], index))
    summary["most_popular_baseline"] = {name: popular(splits[name][rank::world_size]) for name in eval_splits}
    evaluator = Evaluator(model, sequences, index, max_sequence_length, eval_batch_size, use_graph)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(run_dir))
        print(f"{run_name}: {main_module} on {dataset_name} ({data.num_users} users, {index.candidate_ids.numel()} candidates), "
              f"protocol {protocol}, {world_size} process(es) on {summary['device']}; logs in {run_dir}", flush=True)
        for name, metrics in summary["most_popular_baseline"].items():
            print(f"most-popular baseline, {name}: {format_metrics(metrics, ('hr@10', 'ndcg@10', 'hr@50', 'mrr'))}", flush=True)

    for epoch in range(state.epochs_done, num_epochs):
        epoch_start = time.time()
        torch.manual_seed(random_seed * 1_000_003 + epoch * 101 + rank)
        model.train()
        shard = splits["train"][_shard(splits["train"].shape[0], epoch, random_seed, rank, world_size)]
        # One upload per epoch: a host-to-device copy per step would wait for the GPU to go idle.
        shard_on_device = torch.as_tensor(shard, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        num_steps = 0
        for start in range(0, shard.shape[0], local_batch_size):
            if start >= shard.shape[0] // 2:
                faults.kill_if("train", epoch, rank)
            if num_warmup_steps > 0:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate * min(1.0, (state.step + 1) / num_warmup_steps)
            end = start + local_batch_size
            loss_sum += step(shard_on_device[start:end], history_total(shard[start:end], max_sequence_length))
            num_steps += 1
            state.step += 1
        if faults.poison_loss(epoch, rank):
            loss_sum += float("nan")
        train_loss = float(_all_reduce(loss_sum).item()) / max(num_steps * world_size, 1)
        if not np.isfinite(train_loss):
            raise FloatingPointError(
                f"non-finite training loss in epoch {epoch} of {run_name}; stopping. The last good checkpoint "
                f"({ckpt_path}, after epoch {state.epochs_done}) is kept. Try a lower learning rate or warmup."
            )
        train_seconds = time.time() - epoch_start  # train_loss waited for the last step
        faults.kill_if("eval", epoch, rank)
        full = epoch % full_eval_every_n == 0 or epoch == num_epochs - 1
        record = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"], "full_eval": full,
                  "train_seconds": train_seconds}
        for name in eval_splits:
            samples = _eval_samples(splits[name], epoch, random_seed, rank, world_size, full)
            max_batches = None if full else -(-partial_eval_num_batches // world_size)
            record[name] = evaluator(samples, max_batches)
        record["seconds"] = time.time() - epoch_start
        state.history.append(record)
        state.epochs_done = epoch + 1
        state.wall_seconds += time.time() - start_time
        start_time = time.time()
        if rank == 0:
            writer.add_scalar("train/loss", train_loss, epoch)
            writer.add_scalar("train/lr", record["lr"], epoch)
            for name in eval_splits:
                for metric, value in record[name].items():
                    writer.add_scalar(f"{name}/{metric}", value, epoch)
            writer.flush()
            _save_checkpoint(ckpt_path, model, optimizer, state)
            _write_results(run_dir / "results.json", summary, state, split)
            evals = " | ".join(f"{name}{'' if full else ' (partial)'} {format_metrics(record[name], ('hr@10', 'ndcg@10', 'hr@50', 'mrr'))}" for name in eval_splits)
            print(f"epoch {epoch + 1}/{num_epochs} loss {train_loss:.4f} | {evals} | {record['seconds']:.1f}s", flush=True)

    state.wall_seconds += time.time() - start_time
    if rank == 0:
        _write_results(run_dir / "results.json", summary, state, split)
        writer.close()
        best = _best_epoch(state.history, split)
        if best is not None:
            report = " | ".join(f"{name} {format_metrics(best[name])}" for name in eval_splits)
            print(f"best epoch {best['epoch'] + 1} by {split}/{SELECTION_METRIC}: {report}", flush=True)
        print(f"results: {run_dir / 'results.json'}; TensorBoard: tensorboard --logdir {run_dir.parent}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return json.loads((run_dir / "results.json").read_text()) if rank == 0 else {}
