"""The run's settings: every `train_fn.<name>` binding of a gin file, with the defaults a user reads here.

The release's gin files bind `train_fn.*`; this dataclass is registered under
that name, so they work unchanged. `validate()` turns every value a user can
set wrongly into one `ConfigError` line saying what to set instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import gin

PROTOCOLS = ("paper", "leave_one_out", "sessions")
TASKS = ("retrieval", "ranking")


class ConfigError(ValueError):
    """A setting the user can fix; main.py prints the message alone and exits with status 1."""


@gin.configurable("train_fn")
@dataclasses.dataclass
class TrainConfig:
    # Data and protocol (REFERENCE.md sections 1-2, 13).
    dataset_name: str = "synthetic"
    data_dir: str = "tmp"
    protocol: str = "paper"
    task: str = "retrieval"
    max_sequence_length: int = 200
    gr_output_length: int = 10
    # Model (sections 4-6, 12).
    main_module: str = "HSTU"
    item_embedding_dim: int = 50
    dropout_rate: float = 0.2
    user_embedding_norm: str = "l2_norm"
    # Objective (sections 3, 12).
    loss_module: str = "SampledSoftmaxLoss"
    num_negatives: int = 128
    sampling_strategy: str = "local"
    temperature: float = 0.05
    item_l2_norm: bool = True
    l2_norm_eps: float = 1e-6
    bpr_max_regularization: float = 1.0
    mask_prob: float = 0.2  # BERT4Rec's cloze objective
    # Generative ranking (task "ranking", REFERENCE.md section 14; loss weights: ranking_objective.*).
    ranking_holdout: int = 1  # a user's last k interactions are test candidates, the k before them validation
    ranking_user_range: Optional[Tuple[int, int]] = None  # (first, last) user ids; ml-1m's exact ratings: (1, 2999)
    head_hidden_dim: int = 64
    rating_head: str = "classification"  # or "regression"
    # Optimisation.
    local_batch_size: int = 128
    eval_batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    num_warmup_steps: int = 0
    num_epochs: int = 101
    early_stopping_patience: int = 0  # epochs without a better selection metric; 0 = off
    enable_tf32: bool = True
    random_seed: int = 42
    # Evaluation (section 7). The best epoch maximises selection_metric (default: the task's, ndcg@10 / auc).
    selection_metric: Optional[str] = None
    full_eval_every_n: int = 1
    partial_eval_num_batches: int = 64
    # Where results go, and how.
    run_name: Optional[str] = None
    exp_root: str = "exps"
    ckpt_root: str = "ckpts"
    resume: bool = True
    cuda_graphs: bool = True

    @property
    def padded_len(self) -> int:
        """N of REFERENCE.md section 3: history, the target and the release's gr_output_length slots."""
        return self.max_sequence_length + self.gr_output_length + 1

    def validate(self) -> None:
        """Raises ConfigError for the first invalid value."""
        for name in ("max_sequence_length", "item_embedding_dim", "num_negatives", "local_batch_size",
                     "eval_batch_size", "full_eval_every_n", "partial_eval_num_batches", "ranking_holdout",
                     "head_hidden_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train_fn.{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_epochs", "num_warmup_steps", "gr_output_length", "early_stopping_patience",
                     "weight_decay", "bpr_max_regularization"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train_fn.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "temperature", "l2_norm_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"train_fn.{name} must be a positive number, got {value}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"train_fn.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"train_fn.mask_prob must be in (0, 1), got {self.mask_prob}")
        _one_of("protocol", self.protocol, PROTOCOLS)
        _one_of("task", self.task, TASKS)
        _one_of("rating_head", self.rating_head, ("classification", "regression"))
        if self.ranking_user_range is not None and (len(self.ranking_user_range) != 2
                                                    or self.ranking_user_range[0] > self.ranking_user_range[1]):
            raise ConfigError(f"train_fn.ranking_user_range must be (first, last) user ids with first <= last; "
                              f"got {self.ranking_user_range}")
        if self.early_stopping_patience and self.protocol == "paper":
            raise ConfigError("train_fn.early_stopping_patience needs a validation split: the paper protocol has "
                              "none (stopping on test metrics would select on test); use protocol leave_one_out")


def _one_of(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"train_fn.{name} must be one of {', '.join(allowed)}; got {value!r}")
