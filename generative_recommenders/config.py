"""The run's settings: every `train_fn.<name>` binding of a gin file, with the defaults a user reads here.

The release's gin files bind `train_fn.*`; this dataclass is registered under
that name, so they work unchanged. `validate()` turns every value a user can
set wrongly into one `ConfigError` line saying what to set instead.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Iterable, Optional, Tuple

import gin

PROTOCOLS = ("paper", "leave_one_out", "sessions")
TASKS = ("retrieval", "ranking")
MIXED_PRECISION = ("none", "bf16")  # generative_recommenders/precision.py


class ConfigError(ValueError):
    """A setting the user can fix; main.py prints the message alone and exits with status 1."""


def first_line(exc: BaseException) -> str:
    """An error's message alone, as the command-line tools print it (gin appends on further lines the
    configurable an error was raised in)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    # Stochastic Length (HSTU paper eq. 4, README): training histories longer than
    # max_sequence_length^(alpha/2) are randomly shortened to that length; None = off.
    stochastic_length_alpha: Optional[float] = None
    # Generative ranking (task "ranking", REFERENCE.md section 14; loss weights: ranking_objective.*).
    ranking_holdout: int = 1  # a user's last k interactions are test candidates, the k before them validation
    ranking_user_range: Optional[Tuple[int, int]] = None  # (first, last) user ids; ml-1m's exact ratings: (1, 2999)
    # > 0: after training, time scoring the first n test users' candidates through M-FALCON and one pass per
    # candidate (evaluation/ranking.py), into results.json's "evaluation_timing"; 0 = off.
    ranking_timing_users: int = 0
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
    # "bf16": forward passes under bf16 autocast, logits, losses and scores in fp32 (precision.py).
    mixed_precision: str = "none"
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
        for name, hint in typing.get_type_hints(TrainConfig).items():
            _check_type(f"train_fn.{name}", getattr(self, name), hint)
        check_positive("train_fn", **{name: getattr(self, name) for name in (
            "max_sequence_length", "item_embedding_dim", "num_negatives", "local_batch_size", "eval_batch_size",
            "full_eval_every_n", "partial_eval_num_batches", "ranking_holdout", "head_hidden_dim", "num_epochs")})
        for name in ("num_warmup_steps", "gr_output_length", "early_stopping_patience", "ranking_timing_users",
                     "weight_decay", "bpr_max_regularization", "random_seed"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"train_fn.{name} must be a finite number >= 0, got {value}")
        for name in ("learning_rate", "temperature", "l2_norm_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"train_fn.{name} must be a positive number, got {value}")
        check_rate("train_fn", dropout_rate=self.dropout_rate)
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"train_fn.mask_prob must be in (0, 1), got {self.mask_prob}")
        self._check_stochastic_length()
        check_one_of("train_fn.protocol", self.protocol, PROTOCOLS)
        check_one_of("train_fn.task", self.task, TASKS)
        check_one_of("train_fn.rating_head", self.rating_head, ("classification", "regression"))
        check_one_of("train_fn.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if self.ranking_user_range is not None and (len(self.ranking_user_range) != 2
                                                    or self.ranking_user_range[0] > self.ranking_user_range[1]):
            raise ConfigError(f"train_fn.ranking_user_range must be (first, last) user ids with first <= last; "
                              f"got {self.ranking_user_range}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            # The name becomes a directory under exp_root and ckpt_root, which --fresh deletes.
            raise ConfigError(f"train_fn.run_name must be a plain directory name, got {self.run_name!r}")
        if self.early_stopping_patience and self.protocol == "paper":
            raise ConfigError("train_fn.early_stopping_patience needs a validation split: the paper protocol has "
                              "none (stopping on test metrics would select on test); use protocol leave_one_out")

    def _check_stochastic_length(self) -> None:
        alpha = self.stochastic_length_alpha
        if alpha is None:
            return
        if not (math.isfinite(alpha) and 1.0 < alpha <= 2.0):  # the paper's range
            raise ConfigError(f"train_fn.stochastic_length_alpha must be in (1, 2] (or None: off), got {alpha}")
        if self.task != "retrieval":
            raise ConfigError(f"train_fn.stochastic_length_alpha applies to task retrieval, not {self.task!r}; "
                              f"leave it None")

    def check_batch_fits(self, num_train_samples: int, world_size: int) -> None:
        """Raises ConfigError when one step would take more than the whole training split (known once data is loaded)."""
        if num_train_samples == 0:
            raise ConfigError(f"{self.dataset_name} has no training samples under protocol {self.protocol}: "
                              f"its sequences are too short")
        if self.local_batch_size * world_size > num_train_samples:
            raise ConfigError(
                f"train_fn.local_batch_size = {self.local_batch_size} x {world_size} process(es) exceeds the "
                f"{num_train_samples} training samples of {self.dataset_name}: every epoch would be one step "
                f"(of repeated samples under DDP); set it to at most {max(num_train_samples // world_size, 1)}")


_EXPECTED = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
             Optional[str]: "a string or None", Optional[float]: "a number or None"}


def _check_type(name: str, value, hint) -> None:
    if hint not in _EXPECTED:  # containers, if a setting ever is one, are checked where they are used
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif isinstance(value, bool):  # True is an int to Python, never a size or a rate here
        ok = False
    elif hint is float:
        ok = isinstance(value, (int, float))
    elif hint == Optional[str]:
        ok = value is None or isinstance(value, str)
    elif hint == Optional[float]:
        ok = value is None or isinstance(value, (int, float))
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"{name} must be {_EXPECTED[hint]}, got {value!r}")


def check_positive(scope: str, **values: int) -> None:
    """Raises ConfigError naming the first `<scope>.<name>` that is not a positive integer (a size)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{scope}.{name} must be a positive integer, got {value!r}")


def check_rate(scope: str, **values: float) -> None:
    """Raises ConfigError naming the first `<scope>.<name>` outside [0, 1) (a dropout rate)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{scope}.{name} must be a number in [0, 1), got {value!r}")


def check_one_of(name: str, value: str, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
