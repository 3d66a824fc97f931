"""Generative ranking (REFERENCE.md section 14): interleaved item/action histories, candidates' actions as labels.

A user's history (items and their ratings as actions, interleaved) is followed
by candidate items under the M-FALCON mask; task heads predict "liked" (rating
>= 4) and the rating at candidate positions. Training supervises every history
item of the sequence before the validation candidates (target-aware, causal);
validation and test score the held-out candidates (data/ranking.py) through
M-FALCON (evaluation/ranking.py). The best epoch maximises validation AUC of
"liked" by default. Metrics undefined on a split's labels (evaluation/metrics.py)
are known before training: they are left out of every record, and the reason is
written once in results.json ("undefined_metrics").
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from generative_recommenders.config import ConfigError, TrainConfig, check_one_of
from generative_recommenders.data.candidates import CandidateIndex
from generative_recommenders.data.ranking import (
    RankingSequences, padded_length, ranking_splits, sample_lengths, users_in_id_range,
)
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.modeling.ranking_model import RankingModel
from generative_recommenders.objectives.losses import RetrievalLoss
from generative_recommenders.objectives.ranking import RankingObjective, ranking_losses
from generative_recommenders.evaluation.baselines import bias_baseline_predictions
from generative_recommenders.evaluation.ranking import RankingEvaluator
from generative_recommenders.evaluation.metrics import ranking_metrics, undefined_ranking_metrics


SELECTABLE = ("auc", "accuracy", "user_auc", "ndcg@10")
SHOWN = ("auc", "ne", "rmse", "user_auc", "ndcg@10")


class RankingTask:
    shards_evaluation = False  # AUC is no sum over samples: every rank evaluates the whole split
    selection_split = "valid"

    def __init__(self, config: TrainConfig, data: SequenceData, device: torch.device) -> None:
        self.config, self.data = config, data
        users = None if config.ranking_user_range is None else users_in_id_range(data, *config.ranking_user_range)
        self.splits = ranking_splits(data.lengths, config.ranking_holdout, users)
        self.eval_splits: List[str] = ["valid", "test"]
        self.selection_metric = config.selection_metric or "auc"
        check_one_of("train_fn.selection_metric (ranking: higher is better)", self.selection_metric, SELECTABLE)
        self.sequences = RankingSequences(data, device)  # checks every rating is an action 1..5
        self.padded_len = padded_length(config.max_sequence_length, config.ranking_holdout)
        self.model = RankingModel(config.main_module, data.max_item_id, self.padded_len, config.item_embedding_dim,
                                  config.dropout_rate, config.head_hidden_dim, config.rating_head).to(device)
        self.objective = RankingObjective()  # its weights come from the ranking_objective.* bindings
        self.retrieval_loss: Optional[RetrievalLoss] = None
        if self.objective.next_item_weight > 0:
            index = CandidateIndex(torch.as_tensor(data.candidate_ids, device=device), data.max_item_id)
            self.retrieval_loss = RetrievalLoss(config.loss_module, index, config.sampling_strategy,
                                                config.num_negatives, config.temperature,
                                                config.bpr_max_regularization)
        self.evaluator = RankingEvaluator(self.model, self.sequences, config.max_sequence_length,
                                          config.eval_batch_size, config.mixed_precision)
        self.undefined_metrics = self._undefined_metrics()
        self.shown_metrics = tuple(m for m in SHOWN if m not in self.undefined_metrics)
        if self.selection_metric in self.undefined_metrics:
            raise ConfigError(f"train_fn.selection_metric = {self.selection_metric!r} is undefined here: "
                              f"{self.undefined_metrics[self.selection_metric]}; choose another one")

    def _undefined_metrics(self) -> Dict[str, str]:
        """Metric -> why it is undefined on some evaluation split's labels (the same every epoch)."""
        where: Dict[str, Dict[str, List[str]]] = {}
        for name in self.eval_splits:
            samples = self.splits[name]
            if samples.shape[0] == 0:
                continue  # no users: the trainer says so
            on_device = torch.as_tensor(samples, device=self.sequences.offsets.device)
            _, _, ratings, valid = self.sequences.candidates(on_device, int(samples[:, 2].max()))
            for metric, reason in undefined_ranking_metrics(ratings, valid).items():
                where.setdefault(metric, {}).setdefault(reason, []).append(name)
        return {metric: "; ".join(f"{reason} ({' and '.join(splits)} split, train_fn.ranking_holdout = "
                                  f"{self.config.ranking_holdout})" for reason, splits in reasons.items())
                for metric, reasons in where.items()}

    def describe(self) -> str:
        users = self.splits["test"].shape[0]
        terms = ", ".join(f"{t} x{self.objective.weight(t)}" for t in ("liked", "rating", "next_item")
                          if self.objective.weight(t) > 0)
        return (f"ranking with {self.config.main_module} on {self.data.name} ({users} users, "
                f"{self.config.ranking_holdout} held-out candidate(s) per split; losses {terms})")

    def use_cuda_graphs(self, device: torch.device) -> bool:
        return False  # candidates end each sequence: no padded layout yet

    def train_samples(self, samples: np.ndarray, epoch: int, rank: int) -> np.ndarray:
        """The epoch's samples as its steps gather them: unchanged (Stochastic Length is retrieval's)."""
        return samples

    def batch_total(self, samples: np.ndarray) -> int:
        return int(sample_lengths(samples, self.config.max_sequence_length).sum())

    def loss(self, train_model: torch.nn.Module, samples: torch.Tensor, total: int) -> torch.Tensor:
        batch = self.sequences.gather(samples, self.config.max_sequence_length, self.padded_len, total, False)
        return ranking_losses(train_model, batch, self.objective, self.retrieval_loss)["loss"]

    def evaluate(self, samples: np.ndarray, max_batches: Optional[int] = None) -> Dict[str, float]:
        if max_batches is not None:
            samples = samples[: max_batches * self.config.eval_batch_size]
        predictions = self.evaluator.predictions(samples)
        scores = torch.cat([predictions.liked_prob[predictions.valid], predictions.expected_rating[predictions.valid]])
        if not bool(torch.isfinite(scores).all()):
            raise FloatingPointError("non-finite predictions at evaluation")
        return ranking_metrics(predictions)

    def metric_notes(self) -> Dict[str, Dict[str, str]]:
        """For results.json, once: the metrics left out of every record, and why."""
        return {"undefined_metrics": self.undefined_metrics} if self.undefined_metrics else {}

    def final_measurements(self) -> Dict[str, Dict]:
        """With train_fn.ranking_timing_users = n > 0: the scoring rates of the first n test users along each
        M-FALCON path and one pass per candidate (RankingEvaluator.timing), for results.json."""
        users = self.config.ranking_timing_users
        if not users:
            return {}
        return {"evaluation_timing": self.evaluator.timing(self.splits["test"][:users])}

    def baselines(self, samples: np.ndarray) -> Dict[str, Dict[str, float]]:
        """The non-sequential baselines, fit on the training interactions: item mean, and user + item bias."""
        train = self.splits["train"]
        return {name: ranking_metrics(bias_baseline_predictions(self.data, train, samples, use_users))
                for name, use_users in (("item-mean", False), ("user+item-bias", True))}
