"""Replaying a step as a CUDA graph, one graph per static token count.

The models here are small: a training or evaluation step is a few hundred
short kernels, and launching them one by one from Python costs more than
running them. A CUDA graph records the launches once and replays them with one
call. It needs static shapes and memory addresses, so the step reads its input
from a static buffer, and its token count is static: a batch of `total` valid
positions is padded up to the next of `TOKEN_BUCKETS` evenly spaced counts
(the last being every sequence at full length), one graph per count reached.
Padding to the full length instead would make Books' batches (mean length 15
of 51 slots) score 3.4x the positions they hold. An input of another batch
shape (an epoch's last, smaller batch) runs eagerly. The step must not sync
with the host (no `.item()`, no data-dependent shapes).
"""

from __future__ import annotations

import gc
from typing import Callable, Dict, Optional

import torch

Step = Callable[[torch.Tensor, int], torch.Tensor]
TOKEN_BUCKETS = 16  # static token counts per batch shape; graphs share one memory pool


def token_bucket(total: int, capacity: int, buckets: int = TOKEN_BUCKETS) -> int:
    """The smallest of `buckets` evenly spaced counts up to `capacity` that holds `total` tokens."""
    width = -(-capacity // buckets)
    return min(capacity, -(-max(total, 1) // width) * width)


class CudaGraphStep:
    """Calls `fn(samples, total)`, captured as a CUDA graph per token bucket once the input shape repeats.

    The returned tensor is only valid until the next call (a replay overwrites
    it): consume it at once, e.g. `running_sum += step(samples, total)`.
    Graphs are used exactly while `model.padded_layout` is on (see
    SequentialRecommender.use_padded_layout): then a full batch gets `total`
    rounded up to its bucket, which the model pads its sequences to, and
    never without a model. Replays run one at a time on one stream, so the
    graphs share one memory pool.
    """

    WARMUP_CALLS = 3  # eager calls on a side stream before capture, as CUDA graphs require

    def __init__(self, fn: Step, model: Optional[torch.nn.Module] = None) -> None:
        self.fn = fn
        self.model = model
        self.shape: Optional[torch.Size] = None
        self.warmup_left: Dict[int, int] = {}
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.static_samples: Dict[int, torch.Tensor] = {}
        self.static_out: Dict[int, torch.Tensor] = {}
        self.pool = None

    @property
    def enabled(self) -> bool:
        return self.model is not None and bool(getattr(self.model, "padded_layout", False))

    def __call__(self, samples: torch.Tensor, total: int) -> torch.Tensor:
        if self.shape is None:
            self.shape = samples.shape
        if not self.enabled or samples.shape != self.shape:
            return self.fn(samples, total)
        bucket = token_bucket(total, samples.shape[0] * self.model.max_seq_len)
        warmup_left = self.warmup_left.setdefault(bucket, self.WARMUP_CALLS)
        if warmup_left > 0:
            self.warmup_left[bucket] -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(samples, bucket)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if bucket not in self.graphs:
            self._capture(samples, bucket)
        self.static_samples[bucket].copy_(samples)
        self.graphs[bucket].replay()
        return self.static_out[bucket]

    def _capture(self, samples: torch.Tensor, bucket: int) -> None:
        # A capture cannot free memory: when its allocations miss the cache, the allocator's
        # retry (release cached blocks, cudaFree) invalidates the capture. So drop what earlier
        # work left unreachable (graphs and pools of models gone, held only by cycles) and hand
        # unused cached blocks back to the device first, whatever ran in this process before.
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        self.static_samples[bucket] = samples.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.static_out[bucket] = self.fn(self.static_samples[bucket], bucket)
        self.pool = graph.pool() if self.pool is None else self.pool
        self.graphs[bucket] = graph
