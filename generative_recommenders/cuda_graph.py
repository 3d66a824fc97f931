"""Replaying a fixed-shape step as a CUDA graph.

The models here are small: a training or evaluation step is a few hundred
short kernels, and launching them one by one from Python costs more than
running them. A CUDA graph records the launches once and replays them with one
call. It needs static shapes and memory addresses, so the step reads its input
from one static buffer, and an input of another shape (an epoch's last, smaller
batch) runs eagerly. The step must not sync with the host (no `.item()`, no
data-dependent shapes).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Step = Callable[[torch.Tensor, int], torch.Tensor]


class CudaGraphStep:
    """Calls `fn(samples, total)`, captured as a CUDA graph once its input shape repeats.

    The returned tensor is only valid until the next call (a replay overwrites
    it): consume it at once, e.g. `running_sum += step(samples, total)`.
    `total` is a host-side number the step may use for shapes; a replay reuses
    the captured one, which is right only when the model ignores it: under
    its padded layout. So graphs are used exactly while `model.padded_layout`
    is on (see SequentialRecommender.use_padded_layout), and never without a model.
    """

    WARMUP_CALLS = 3  # eager calls on a side stream before capture, as CUDA graphs require

    def __init__(self, fn: Step, model: Optional[torch.nn.Module] = None) -> None:
        self.fn = fn
        self.model = model
        self.shape: Optional[torch.Size] = None
        self.warmup_left = self.WARMUP_CALLS
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    @property
    def enabled(self) -> bool:
        return self.model is not None and bool(getattr(self.model, "padded_layout", False))

    def __call__(self, samples: torch.Tensor, total: int) -> torch.Tensor:
        if self.shape is None:
            self.shape = samples.shape
        if not self.enabled or samples.shape != self.shape:
            return self.fn(samples, total)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(samples, total)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.static_samples = samples.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self.fn(self.static_samples, total)
        self.static_samples.copy_(samples)
        self.graph.replay()
        return self.static_out
