"""Trains and evaluates one gin configuration.

    python3 main.py                                   # embedded synthetic default (CPU, ~2 min)
    python3 main.py --gin_config_file=configs/ml-1m/hstu-sampled-softmax-n128-final.gin

Uses every visible GPU (one process each, DistributedDataParallel over NCCL),
or one CPU process (`--num_processes=N` runs N gloo processes on CPU). Under
`torchrun` the launcher's processes are used as they are.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: results.json reports time from process start

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import List, Optional

from absl import app, flags, logging

flags.DEFINE_string("gin_config_file", "configs/synthetic/hstu-default.gin", "Gin file with the run's configuration.")
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. --gin_bindings='train_fn.num_epochs=3'.")
flags.DEFINE_integer("master_port", 12355, "TCP port of the process group's rendezvous on 127.0.0.1.")
flags.DEFINE_integer("num_processes", None, "Processes to start; default: one per visible GPU, or 1 on CPU.")
FLAGS = flags.FLAGS


def default_run_name(config_file: str) -> str:
    """The config file's stem, suffixed with the protocol when it is not the release's."""
    import gin

    from generative_recommenders import trainer  # noqa: F401  (registers train_fn)

    name = Path(config_file).stem
    try:
        protocol = gin.query_parameter("train_fn.protocol")
    except ValueError:
        protocol = "paper"
    return name if protocol == "paper" else f"{name}-{protocol.replace('_', '-')}"


def parse_config(config_file: str, bindings: List[str]) -> None:
    import gin

    from generative_recommenders import trainer  # noqa: F401  (registers the configurables)

    if not Path(config_file).exists():
        raise FileNotFoundError(f"gin config file {config_file} not found")
    gin.clear_config()
    gin.parse_config_files_and_bindings([config_file], bindings)


def worker(rank: int, world_size: int, config_file: str, bindings: List[str], port: int, init: Optional[str]) -> None:
    import torch
    import torch.distributed as dist

    from generative_recommenders.trainer import train_fn

    parse_config(config_file, bindings)
    if world_size > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend, init_method=init or f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(minutes=10),
        )
    try:
        train_fn(rank, world_size, default_run_name=default_run_name(config_file), process_start=PROCESS_START)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: List[str]) -> None:
    del argv
    import torch

    from generative_recommenders.data.public_datasets import PreprocessingError

    logging.set_verbosity(logging.WARNING)  # fbgemm_gpu logs every library it loads
    try:
        parse_config(FLAGS.gin_config_file, FLAGS.gin_bindings)
    except Exception as exc:  # gin's errors name the unknown binding or bad value
        sys.exit(f"error in the configuration: {exc}")
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), FLAGS.gin_config_file, FLAGS.gin_bindings,
               FLAGS.master_port, "env://")
        return
    world_size = FLAGS.num_processes or max(torch.cuda.device_count(), 1)
    args = (world_size, FLAGS.gin_config_file, FLAGS.gin_bindings, FLAGS.master_port, None)
    try:
        if world_size == 1:
            worker(0, *args)
        else:
            torch.multiprocessing.spawn(worker, args=args, nprocs=world_size, join=True)
    except (FileNotFoundError, ValueError, PreprocessingError, FloatingPointError) as exc:
        sys.exit(f"error: {exc}")
    except torch.multiprocessing.ProcessRaisedException as exc:
        # The child's traceback ends with its exception; a rank failing stops all of them.
        lines = [l for l in str(exc).splitlines() if l and not l.startswith((" ", "\t", "Traceback"))]
        sys.exit(f"error in a training process: {lines[-1] if lines else exc}")
    except torch.multiprocessing.ProcessExitedException as exc:
        sys.exit(f"error: a training process died ({exc}); the others were stopped")


if __name__ == "__main__":
    app.run(main)
