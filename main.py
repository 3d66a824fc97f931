"""Trains and evaluates one gin configuration.

    python3 main.py                                   # embedded synthetic default (CPU, ~2 min)
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

import os
import shutil
import sys
from datetime import timedelta
from typing import List, Optional

from absl import app, flags, logging

flags.DEFINE_string("gin_config_file", "configs/synthetic/hstu-default.gin", "Gin file with the run's configuration.")
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. --gin_bindings='train_fn.num_epochs=3'.")
flags.DEFINE_integer("master_port", 12355, "TCP port of the process group's rendezvous on 127.0.0.1.")
flags.DEFINE_integer("num_processes", None, "Processes to start; default: one per visible GPU, or 1 on CPU.",
                     lower_bound=1)
flags.DEFINE_bool("fresh", False, "Start the run over: delete its checkpoints, results.json and TensorBoard events "
                  "first (otherwise the same command resumes it).")
FLAGS = flags.FLAGS


def start_over(default_name: str) -> None:
    """--fresh: deletes the configured run's checkpoints and logs (gin must hold the run's configuration)."""
    from generative_recommenders.config import TrainConfig
    from generative_recommenders.runs import run_paths

    config = TrainConfig()
    config.validate()  # never delete on a path built from an invalid run name
    for directory in run_paths(config, config.run_name or default_name):
        if directory.exists():
            shutil.rmtree(directory)
            print(f"--fresh: removed {directory}", flush=True)


def worker(rank: int, world_size: int, config_file: str, bindings: List[str], port: int, init: Optional[str],
           run_name: str) -> None:
    import torch
    import torch.distributed as dist

    from generative_recommenders.runs import parse_config
    from generative_recommenders.trainer import train_fn

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


def launch(config_file: str, bindings: List[str], num_processes: Optional[int], port: int, fresh: bool) -> None:
    """Trains one configuration; a fault the user can fix exits with one `error: ...` line (status 1)."""
    import torch

    from generative_recommenders.config import first_line
    from generative_recommenders.data.public_datasets import PreprocessingError
    from generative_recommenders.runs import default_run_name

    try:
        run_name = default_run_name(config_file, bindings)
    except Exception as exc:  # gin's errors name the unknown binding or bad value
        sys.exit(f"error in the configuration: {first_line(exc)}")
    torchrun = "WORLD_SIZE" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if torchrun else num_processes or max(torch.cuda.device_count(), 1)
    args = (world_size, config_file, bindings, port, "env://" if torchrun else None, run_name)
    try:
        if fresh and int(os.environ.get("RANK", 0)) == 0:  # before any rank can pass the rendezvous
            start_over(run_name)
        if torchrun:
            worker(int(os.environ["RANK"]), *args)
        elif world_size == 1:
            worker(0, *args)
        else:
            torch.multiprocessing.spawn(worker, args=args, nprocs=world_size, join=True)
    except (FileNotFoundError, ValueError, PreprocessingError, FloatingPointError) as exc:
        sys.exit(f"error: {first_line(exc)}")
    except torch.multiprocessing.ProcessRaisedException as exc:
        # The child's traceback ends with its exception; a rank failing stops all of them.
        lines = [l for l in str(exc).splitlines() if l and not l.startswith((" ", "\t", "Traceback"))]
        sys.exit(f"error in a training process: {lines[-1] if lines else exc}")
    except torch.multiprocessing.ProcessExitedException as exc:
        sys.exit(f"error: a training process died ({exc}); the others were stopped")


def main(argv: List[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # fbgemm_gpu logs every library it loads
    launch(FLAGS.gin_config_file, FLAGS.gin_bindings, FLAGS.num_processes, FLAGS.master_port, FLAGS.fresh)


if __name__ == "__main__":
    app.run(main)
