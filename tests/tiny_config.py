"""A tiny synthetic configuration shared by the end-to-end tests (seconds per epoch on CPU)."""

import os
import socket
from pathlib import Path
from typing import Sequence

TINY = [
    "train_fn.dataset_name = 'synthetic'",
    "synthetic_data.num_users = 600",
    "synthetic_data.num_items = 300",
    "train_fn.max_sequence_length = 20",
    "train_fn.item_embedding_dim = 16",
    "train_fn.local_batch_size = 64",
    "train_fn.num_negatives = 32",
    "train_fn.num_epochs = 3",
    "hstu_encoder.num_blocks = 1",
    "hstu_encoder.num_heads = 2",
    "hstu_encoder.dqk = 8",
    "hstu_encoder.dv = 8",
    "sasrec_encoder.num_blocks = 1",
    "sasrec_encoder.num_heads = 1",
    "sasrec_encoder.ffn_hidden_dim = 16",
    "gru4rec_encoder.num_layers = 1",
    "bert4rec_encoder.num_blocks = 1",
    "bert4rec_encoder.num_heads = 2",
    "bert4rec_encoder.ffn_hidden_dim = 32",
    "fuxi_encoder.num_blocks = 1",
    "fuxi_encoder.num_heads = 2",
    "fuxi_encoder.dqk = 8",
    "fuxi_encoder.dv = 8",
    "fuxi_encoder.ffn_hidden_dim = 32",
]


REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/synthetic/hstu-default.gin"


def run_name_of(bindings: Sequence[str], config_file: str = DEFAULT_CONFIG) -> str:
    """The run name main.py gives `config_file` with `bindings` (computed as main.py does); gin left cleared."""
    import gin

    from generative_recommenders.runs import default_run_name

    try:
        return default_run_name(str(REPO / config_file), bindings)
    finally:
        gin.clear_config()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env() -> dict:
    """Environment for a training subprocess that must run on the CPU (GPUs hidden)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def train_tiny(tmp: Path, extra: Sequence[str] = (), run_name: str = "run") -> dict:
    """Trains TINY (plus `extra` bindings) in this process, logs and checkpoints under `tmp`."""
    import gin  # here, not at import: the Triton tests must set TRITON_INTERPRET before anything imports triton

    from generative_recommenders.trainer import train_fn

    gin.clear_config()
    gin.parse_config(TINY + [f"train_fn.exp_root = '{tmp}/exps'", f"train_fn.ckpt_root = '{tmp}/ckpts'",
                             f"train_fn.run_name = '{run_name}'", *extra])
    try:
        return train_fn(0, 1)
    finally:
        gin.clear_config()
