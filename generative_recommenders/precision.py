"""Precision: TF32 matmuls (`set_precision`), and where train_fn.mixed_precision's bf16 autocast is on.

"none" (the default, and every frozen config): fp32 throughout, with TF32
matmuls on GPUs unless train_fn.enable_tf32 is off (`set_precision`).

"bf16": `autocast` below is entered around the training step's forward pass
and loss (trainer.TrainStep, so both tasks) and around the encoder forward of
evaluation (evaluation/retrieval.Evaluator.queries, evaluation/ranking.py). Under it matmuls
run in bf16 (HSTU's q, k, v reach the fused attention kernel as bf16; its
relative-bias weights stay fp32). Parameters, gradients and the optimizer state
stay fp32, and backward and AdamW run outside autocast; bf16 has fp32's
exponent range, so no loss scaling is needed. What the losses and metrics read
is fp32:

- RetrievalLoss (objectives/losses.py) switches autocast off and upcasts the
  queries and item vectors, so logits, log-softmax, the chunked full softmax,
  BCE and BPR are fp32;
- the ranking heads (modeling/heads.py) run in fp32 on upcast encoder outputs;
- evaluation scores candidates outside autocast, from upcast queries (bf16
  scores would create ties, which the evaluator ranks at their expected rank).

cache_enabled=False, as PyTorch asks of autocast inside CUDA-graph capture
(cuda_graph.py): each step casts the weights it reads itself, so a captured
step's replays cast the weights the optimizer has just updated.
"""

from __future__ import annotations

import torch

from generative_recommenders.config import MIXED_PRECISION, TrainConfig, check_one_of


def set_precision(config: TrainConfig) -> None:
    """The run's matmul precision (TF32 or full fp32 on GPUs), process-wide."""
    torch.backends.cuda.matmul.allow_tf32 = config.enable_tf32
    torch.backends.cudnn.allow_tf32 = config.enable_tf32


def autocast(mode: str, device: torch.device) -> torch.autocast:
    """The autocast context of `mode` (a MIXED_PRECISION value) on `device`'s type; disabled for "none"."""
    check_one_of("train_fn.mixed_precision", mode, MIXED_PRECISION)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16", cache_enabled=False)
