"""The retrieval experiment: a protocol's samples, the recommender, its objective, its evaluators.

The trainer asks a task for the model, the training samples, the loss of a
batch of samples and the evaluation of a split; everything specific to
next-item retrieval (user protocols and session data) lives here.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional

import numpy as np
import torch

from generative_recommenders.config import TrainConfig, check_one_of
from generative_recommenders.data.candidates import CandidateIndex
from generative_recommenders.data.samples import (SESSIONS, DeviceSequences, history_total, make_splits,
                                                  selection_split, stochastic_length_cap, with_stochastic_lengths)
from generative_recommenders.data.sequence_store import SequenceData
from generative_recommenders.evaluation.metrics import metric_names
from generative_recommenders.evaluation.next_item_baselines import fit_baselines
from generative_recommenders.evaluation.retrieval import RANK_CAP, Baseline, Evaluator
from generative_recommenders.modeling.recommender import SequentialRecommender
from generative_recommenders.objectives import make_objective
from generative_recommenders.objectives.losses import RetrievalLoss


STOCHASTIC_LENGTH_STREAM = 26  # keys the kept-length draws' generator apart from the trainer's others


class RetrievalTask:
    """Next-item retrieval on user histories ("paper", "leave_one_out") or sessions ("sessions")."""

    shards_evaluation = True  # every metric is a mean over samples: ranks evaluate shares, sums are reduced

    def __init__(self, config: TrainConfig, data: SequenceData, device: torch.device) -> None:
        self.config = config
        self.data = data
        self.splits = make_splits(data, config.protocol)
        self.eval_splits: List[str] = [name for name in self.splits if name != "train"]
        self.selection_split = selection_split(config.protocol, self.splits)
        self.selection_metric = config.selection_metric or "ndcg@10"
        check_one_of("train_fn.selection_metric", self.selection_metric, metric_names())
        self.sequences = DeviceSequences(data, device)
        self.index = CandidateIndex(torch.as_tensor(data.candidate_ids, device=device), data.max_item_id)
        self.model = SequentialRecommender(
            config.main_module, data.max_item_id, config.padded_len, config.item_embedding_dim, config.dropout_rate,
            config.user_embedding_norm, config.item_l2_norm, config.l2_norm_eps,
        ).to(device)
        self.loss_fn = RetrievalLoss(config.loss_module, self.index, config.sampling_strategy, config.num_negatives,
                                     config.temperature, config.bpr_max_regularization)
        self.objective = make_objective(self.model, self.loss_fn, config.mask_prob)
        sessions = config.protocol == SESSIONS
        # GRU4Rec's session metrics are recall@20 (= HR@20, one target per event) and MRR@20.
        self.shown_metrics = ("hr@20", "mrr@20", "hr@10", "ndcg@10") if sessions else ("hr@10", "ndcg@10", "hr@50", "mrr")
        self.evaluator = self._evaluator()

    def _evaluator(self, baseline: Optional[Baseline] = None) -> Evaluator:
        """The model's evaluator, or with `baseline` the same evaluation of the baseline's scores."""
        config, sessions = self.config, self.config.protocol == SESSIONS
        return Evaluator(self.model, self.objective.query, self.sequences, self.index, config.max_sequence_length,
                         config.eval_batch_size, filter_history=not sessions,
                         rank_cap=None if sessions else RANK_CAP, baseline=baseline,
                         mixed_precision=config.mixed_precision)

    def describe(self) -> str:
        return (f"{self.config.main_module} on {self.data.name} ({self.data.num_users} "
                f"{'sessions' if self.config.protocol == SESSIONS else 'users'}, {self.index.num_candidates} "
                f"candidates), protocol {self.config.protocol}, {self.config.loss_module}")

    def use_cuda_graphs(self, device: torch.device) -> bool:
        """Switches the model to the padded layout when the whole step can be a CUDA graph."""
        return self.loss_fn.graph_safe and self.model.use_padded_layout(device)

    def train_samples(self, samples: np.ndarray, epoch: int, rank: int) -> np.ndarray:
        """The epoch's (shuffled) samples of this rank as its steps gather them.

        With train_fn.stochastic_length_alpha each gets its kept history length,
        drawn from a generator of (seed, epoch, rank): a resumed run draws the same.
        At alpha = 2 (N^(alpha/2) = N, the longest history) nothing can be shortened
        and the samples stay as they are.
        """
        alpha, max_history = self.config.stochastic_length_alpha, self.config.max_sequence_length
        if alpha is None or stochastic_length_cap(max_history, alpha) >= max_history:
            return samples
        rng = np.random.default_rng([self.config.random_seed, epoch, rank, STOCHASTIC_LENGTH_STREAM])
        return with_stochastic_lengths(samples, max_history, alpha, rng)

    def batch_total(self, samples: np.ndarray) -> int:
        return history_total(samples, self.config.max_sequence_length)

    def loss(self, train_model: torch.nn.Module, samples: torch.Tensor, total: int) -> torch.Tensor:
        """Loss of one batch of (user, end) samples on the device; `train_model` may be the DDP wrapper."""
        batch = self.sequences.gather(samples, self.config.max_sequence_length, self.config.padded_len, total)
        return self.objective.loss(train_model, batch)

    def evaluate(self, samples: np.ndarray, max_batches: Optional[int] = None) -> Dict[str, float]:
        return self.evaluator(samples, max_batches)

    def metric_notes(self) -> Dict[str, Dict[str, str]]:
        return {}  # every retrieval metric is defined on any split

    def final_measurements(self) -> Dict[str, Dict]:
        return {}  # nothing measured after training

    @functools.cached_property
    def baseline_evaluators(self) -> Dict[str, Evaluator]:
        """Fit on first use (seconds): recommendations and exports never need them."""
        fitted = fit_baselines(self.data, self.splits["train"], self.index.candidate_ids,
                               self.config.protocol == SESSIONS)
        return {name: self._evaluator(baseline) for name, baseline in fitted.items()}

    def baselines(self, samples: np.ndarray) -> Dict[str, Dict[str, float]]:
        """The baselines' metrics on the same samples: most-popular, and on session data SR, AR and V-SKNN."""
        return {name: evaluator(samples) for name, evaluator in self.baseline_evaluators.items()}
