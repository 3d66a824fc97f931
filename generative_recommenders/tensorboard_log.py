"""A run's TensorBoard: per-epoch scalars, and the HParams tab's settings and best metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from generative_recommenders.config import TrainConfig


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


class TensorBoardLog:
    """The event file in the run's log directory (written by rank 0 only): the scalars of every epoch's record
    (train/loss, train/lr, <split>/<metric>) and, as best/<split>/<metric>, the best epoch's `shown_metrics`."""

    def __init__(self, run_dir: Path, config: TrainConfig, eval_splits: Sequence[str],
                 shown_metrics: Sequence[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(run_dir))
        self.eval_splits = eval_splits
        # HParams tag -> (split, metric) of the best epoch's record it shows.
        self.best_metrics = {f"best/{split}/{metric}": (split, metric)
                             for split in eval_splits for metric in shown_metrics}
        # Written into the run's own directory (SummaryWriter.add_hparams would open a sub-run).
        experiment, session_start, self.session_end = hparams_summaries(config, list(self.best_metrics))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)

    def epoch(self, record: Dict) -> None:
        epoch = record["epoch"]
        self.writer.add_scalar("train/loss", record["train_loss"], epoch)
        self.writer.add_scalar("train/lr", record["lr"], epoch)
        for name in self.eval_splits:
            for metric, value in record[name].items():
                self.writer.add_scalar(f"{name}/{metric}", value, epoch)

    def best(self, best: Dict, epoch: int) -> None:
        """The best epoch's metrics at `epoch`: the HParams tab shows each tag's latest value."""
        for tag, (split, metric) in self.best_metrics.items():
            self.writer.add_scalar(tag, best[split][metric], epoch)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.file_writer.add_summary(self.session_end)
        self.writer.close()
