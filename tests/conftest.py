"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_tf32_flags():
    """train_fn switches TF32 on process-wide; later fp32 kernel tests expect exact fp32 dots."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def on_cpu(monkeypatch):
    """Trains on the CPU even where a GPU is visible: bit-identical reruns are a CPU guarantee
    (on the GPU, atomics in the attention backward reorder sums)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
