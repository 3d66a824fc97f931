"""The time-bucket function of HSTU's relative bias (REFERENCE.md section 5).

bucket(d) = floor(ln(max(|d|, 1)) / 0.301) clamped to [0, num_buckets]. Its own
module so that the PyTorch formula (ops/hstu_attention.py) and the fused kernel
(ops/triton/hstu_attention.py) share one definition without importing each other.
"""

import torch

BUCKET_INCREMENT = 0.301
NUM_TIME_BUCKETS = 128


def time_buckets(delta: torch.Tensor, num_buckets: int = NUM_TIME_BUCKETS) -> torch.Tensor:
    """floor(ln(max(|delta|, 1)) / 0.301) clamped to [0, num_buckets], as int64."""
    scaled = torch.log(delta.abs().clamp(min=1).to(torch.float32)) / BUCKET_INCREMENT
    return scaled.long().clamp(0, num_buckets)
