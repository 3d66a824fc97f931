"""Fault injection for the reliability tests (tests/test_reliability.py).

Set GR_FAULT="<point>@<epoch>" (optionally "@<rank>") to make a run fail at
that point of that epoch: "train" (halfway through the epoch's steps), "eval"
(before evaluating), "checkpoint" (after the checkpoint's temporary file is
written, before it is renamed), "best" (after last.pt is written, before
best.pt is, in an epoch that is the best so far) kill the process with
SIGKILL; "nan" makes that epoch's training loss non-finite. Unset, every
check is a no-op.
"""

from __future__ import annotations

import os
import signal


def _armed(point: str, epoch: int, rank: int) -> bool:
    spec = os.environ.get("GR_FAULT", "")
    if not spec:
        return False
    parts = spec.split("@")
    target_rank = int(parts[2]) if len(parts) > 2 else 0
    return parts[0] == point and int(parts[1]) == epoch and target_rank == rank


def kill_if(point: str, epoch: int, rank: int = 0) -> None:
    if _armed(point, epoch, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(epoch: int, rank: int = 0) -> bool:
    return _armed("nan", epoch, rank)
