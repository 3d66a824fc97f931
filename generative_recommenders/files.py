"""What every command writes goes through here: atomic files, a check of the output location before the heavy
work, one-line messages for filesystem faults, strict JSON.

A file is written to a hidden temporary beside its target, fsynced and renamed onto it, so a killed process or
a full disk never leaves a partial file under the target's name. Any OSError on the way is re-raised naming
the target (not the temporary) and its cause; the commands print `os_error_line` of it and exit 1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from generative_recommenders import faults


def os_error_line(exc: OSError) -> str:
    """`<path>: <cause>`, the one line a command prints for a filesystem fault."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _naming(exc: OSError, path: Path) -> OSError:
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def atomic_write(path: Path, write_fn: Callable[[Path], None], suffix: str = "") -> None:
    """Calls write_fn(temp_path), then renames the finished file onto `path` (its directory is created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        write_fn(Path(tmp))
        faults.fill_disk_if(path)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _naming(exc, path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(path: Path) -> None:
    """Deletes temporary files that an earlier, killed run left for `path` (atomic_write's naming)."""
    for stale in path.parent.glob(f"*{path.name}.*.tmp"):
        if stale.name.startswith("."):  # also nested ones: "..sequences.npz.abc.npz.tmp.def.tmp"
            stale.unlink(missing_ok=True)


def check_writable_dir(directory: Path, create: bool = True) -> None:
    """Raises OSError naming the directory unless a file can be written in it now: called before the heavy work,
    so a bad output location fails in a second, not after the scoring. With `create`, a missing directory is fine
    when its nearest existing parent takes files (nothing is created here)."""
    directory = Path(directory)
    existing = directory
    while create and not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.exists():
            raise FileNotFoundError(2, "no such directory (it is not created for you)", str(existing))
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing):  # a real write: permissions, read-only mounts
            pass
        if shutil.disk_usage(existing).free == 0:
            raise OSError(28, "No space left on device", str(existing))
    except OSError as exc:
        raise _naming(exc, existing) from None


def check_output_file(path: Path) -> None:
    """An output file a user names (--out): its directory must exist and take a file; the file must not be one."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, not a file name", str(path))
    check_writable_dir(path.parent if str(path.parent) else Path("."), create=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def strict_json(value: Any, indent: int = 1) -> str:
    """JSON that strict parsers accept: an undefined (NaN) or infinite float is written as null."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False)
