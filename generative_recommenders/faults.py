"""Fault injection for the reliability tests (tests/test_reliability.py).

Set GR_FAULT="<point>@<epoch>" (optionally "@<rank>") to make a run fail at
that point of that epoch: "train" (halfway through the epoch's steps), "eval"
(before evaluating), "checkpoint" (after the checkpoint's temporary file is
written, before it is renamed), "best" (after last.pt is written, before
best.pt is, in an epoch that is the best so far) kill the process with
SIGKILL; "nan" makes that epoch's training loss non-finite, "nan_weights" one weight
after the epoch's last step (its loss stays finite). Unset, every
check is a no-op. GR_FAULT="enospc@<file name>" makes writing that output
file fail as on a full disk (files.atomic_write, after its temporary is written).
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path


def _armed(point: str, epoch: int, rank: int) -> bool:
    spec = os.environ.get("GR_FAULT", "")
    if not spec:
        return False
    parts = spec.split("@")
    if len(parts) < 2 or not parts[1].isdigit():  # another kind of fault ("enospc@<file>")
        return False
    target_rank = int(parts[2]) if len(parts) > 2 else 0
    return parts[0] == point and int(parts[1]) == epoch and target_rank == rank


def kill_if(point: str, epoch: int, rank: int = 0) -> None:
    if _armed(point, epoch, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(epoch: int, rank: int = 0) -> bool:
    return _armed("nan", epoch, rank)


def poison_weights(epoch: int, rank: int = 0) -> bool:
    return _armed("nan_weights", epoch, rank)


def fill_disk_if(path: Path) -> None:
    if os.environ.get("GR_FAULT", "") == f"enospc@{Path(path).name}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
