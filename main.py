"""Trains and evaluates one gin configuration.

    python3 main.py                                   # embedded synthetic default (~51 s on 2 CPU cores)
    python3 main.py --gin_config_file=configs/ml-1m/hstu-sampled-softmax-n128-final.gin
    python3 main.py --gin_bindings='train_fn.learning_rate=3e-3'   # a new run: hstu-default-<hash>
    python3 main.py --fresh                            # the default run, started over

Uses every visible GPU (one process each, DistributedDataParallel over NCCL),
or one CPU process (`--num_processes=N` runs N gloo processes on CPU). Under
`torchrun` the launcher's processes are used as they are.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: results.json reports time from process start

import contextlib
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from absl import app, flags, logging

flags.DEFINE_string("gin_config_file", "configs/synthetic/hstu-default.gin", "Gin file with the run's configuration.")
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. --gin_bindings='train_fn.num_epochs=3'.")
flags.DEFINE_integer("master_port", 12355, "TCP port of the process group's rendezvous on 127.0.0.1.")
flags.DEFINE_integer("num_processes", None, "Processes to start; default: one per visible GPU, or 1 on CPU.",
                     lower_bound=1)
flags.DEFINE_integer("num_threads", None, "Torch's intra-op threads per process; default: OMP_NUM_THREADS or "
                     "MKL_NUM_THREADS where set, else the cores this process may run on (os.sched_getaffinity) that "
                     "no other process keeps busy, shared among the processes.",
                     lower_bound=1)
flags.DEFINE_bool("fresh", False, "Start the run over: delete its checkpoints, results.json and TensorBoard events "
                  "first (otherwise the same command resumes it).")
FLAGS = flags.FLAGS


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch's own: it reads them at start-up


def _busy_jiffies(cores: List[int]) -> Dict[int, Tuple[float, float]]:
    """(busy, total) jiffies of each core so far, from /proc/stat (idle and iowait are not busy)."""
    found = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            counts = [float(v) for v in values]
            found[int(name[3:])] = (sum(counts) - counts[3] - counts[4], sum(counts))
    return found


def free_cores(cores: List[int], seconds: float = 0.2) -> int:
    """How many of `cores` were mostly idle over `seconds` (at least 1). Torch's OpenMP threads spin at every
    barrier: one thread per core plus another process's busy loop took 15x longer (README, "Threads")."""
    try:
        before = _busy_jiffies(cores)
        time.sleep(seconds)
        after = _busy_jiffies(cores)
    except (OSError, ValueError, IndexError):  # no /proc/stat: assume every core is free
        return len(cores)
    busy = sum((after[c][0] - before[c][0]) > 0.5 * (after[c][1] - before[c][1]) for c in before if c in after)
    return max(1, len(cores) - busy)


def intra_op_threads(flag: Optional[int], processes: int) -> Optional[int]:
    """Each process's threads: the flag's, else None where an environment variable already set torch's, else its
    share of the cores this process may run on (its affinity, which a container or `taskset` narrows;
    os.cpu_count does not) less those another process keeps busy at start-up."""
    if flag is not None:
        return flag
    if any(os.environ.get(name) for name in THREAD_VARIABLES):
        return None
    cores = sorted(os.sched_getaffinity(0))
    threads = max(1, free_cores(cores) // processes)
    if threads * processes < len(cores):
        print(f"{threads} torch thread(s) per process: {len(cores)} cores, some busy with other work "
              f"(--num_threads or OMP_NUM_THREADS to choose)", flush=True)
    return threads


def run_dirs(default_name: str) -> List[Path]:
    """The configured run's log and checkpoint directories (gin must hold the run's configuration)."""
    from generative_recommenders.config import TrainConfig
    from generative_recommenders.runs import run_paths

    config = TrainConfig()
    config.validate()  # never lock, create or delete on a path built from an invalid run name
    return list(run_paths(config, config.run_name or default_name))


def start_over(directories: List[Path]) -> None:
    """--fresh: deletes the run's checkpoints and logs, all but the lock this process holds."""
    from generative_recommenders.runs import LOCK_FILE

    for directory in directories:
        if not directory.exists():
            continue
        for entry in directory.iterdir():
            if entry.name != LOCK_FILE:  # deleting the held lock file would let a second process lock a new one
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        print(f"--fresh: removed {directory} (its contents)", flush=True)


def worker(rank: int, world_size: int, config_file: str, bindings: List[str], port: int, init: Optional[str],
           run_name: str, threads: Optional[int]) -> None:
    import torch
    import torch.distributed as dist

    from generative_recommenders.runs import parse_config
    from generative_recommenders.trainer import train_fn

    if threads is not None:
        torch.set_num_threads(threads)
    parse_config(config_file, bindings)
    if world_size > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend, init_method=init or f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(minutes=10),
        )
    try:
        train_fn(rank, world_size, default_run_name=run_name, process_start=PROCESS_START)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(config_file: str, bindings: List[str], num_processes: Optional[int], port: int, fresh: bool,
           threads: Optional[int] = None) -> None:
    """Trains one configuration; a fault the user can fix exits with one `error: ...` line (status 1)."""
    import torch

    from generative_recommenders.config import first_line
    from generative_recommenders.data.public_datasets import PreprocessingError
    from generative_recommenders.files import check_writable_dir, os_error_line
    from generative_recommenders.runs import default_run_name, locked_run

    try:
        run_name = default_run_name(config_file, bindings)
    except Exception as exc:  # gin's errors name the unknown binding or bad value
        sys.exit(f"error in the configuration: {first_line(exc)}")
    torchrun = "WORLD_SIZE" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if torchrun else num_processes or max(torch.cuda.device_count(), 1)
    args = (world_size, config_file, bindings, port, "env://" if torchrun else None, run_name,
            intra_op_threads(threads, world_size))
    try:
        with contextlib.ExitStack() as held:
            if int(os.environ.get("RANK", 0)) == 0:  # before any rank can pass the rendezvous
                directories = run_dirs(run_name)
                for directory in directories:
                    check_writable_dir(directory)  # before the data is loaded, not at the first checkpoint
                held.enter_context(locked_run(directories[0]))  # spawned ranks run under this process's lock
                if fresh:
                    start_over(directories)
            if torchrun:
                worker(int(os.environ["RANK"]), *args)
            elif world_size == 1:
                worker(0, *args)
            else:
                torch.multiprocessing.spawn(worker, args=args, nprocs=world_size, join=True)
    except OSError as exc:
        sys.exit(f"error: {os_error_line(exc)}")
    except (ValueError, PreprocessingError, FloatingPointError) as exc:
        sys.exit(f"error: {first_line(exc)}")
    except torch.multiprocessing.ProcessRaisedException as exc:
        # The child's traceback ends with its exception; a rank failing stops all of them.
        lines = [l for l in str(exc).splitlines() if l and not l.startswith((" ", "\t", "Traceback"))]
        sys.exit(f"error in a training process: {lines[-1] if lines else exc}")
    except torch.multiprocessing.ProcessExitedException as exc:
        sys.exit(f"error: a training process died ({exc}); the others were stopped")


def main(argv: List[str]) -> None:
    if len(argv) > 1:  # e.g. a config file given without --gin_config_file=: never train the default instead
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (a config file is given as "
                             f"--gin_config_file=PATH)")
    logging.set_verbosity(logging.WARNING)  # fbgemm_gpu logs every library it loads
    launch(FLAGS.gin_config_file, FLAGS.gin_bindings, FLAGS.num_processes, FLAGS.master_port, FLAGS.fresh,
           FLAGS.num_threads)


if __name__ == "__main__":
    app.run(main)
