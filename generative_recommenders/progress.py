"""Progress lines (rate, ETA) of long loops: training epochs, and the queries of recommend/export."""

from __future__ import annotations

import time
from typing import Callable

import torch

PROGRESS_EVERY_S = 10.0


class Progress:
    """A progress line at most every PROGRESS_EVERY_S seconds within a long loop; none in a short one."""

    def __init__(self, label: str, num_steps: int, log: Callable[[str], None], units: str = "steps") -> None:
        self.label, self.num_steps, self.log, self.units = label, num_steps, log, units
        self.start = self.last = time.time()

    def update(self, steps_done: int, device: torch.device) -> None:
        now = time.time()
        if now - self.last < PROGRESS_EVERY_S or steps_done == self.num_steps:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # launches run ahead of the GPU; rate what has finished
            now = time.time()
        self.last = now
        rate = steps_done / (now - self.start)
        self.log(f"  {self.label}: {steps_done}/{self.num_steps} {self.units}, {rate:.1f} {self.units}/s, "
                 f"ETA {(self.num_steps - steps_done) / rate:.0f}s")
