"""ops/layer_norm.py: CompositeLayerNorm equals F.layer_norm, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ops.layer_norm import CompositeLayerNorm, layer_norm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 50), dim=st.integers(1, 70), eps=st.sampled_from([1e-6, 1e-8]),
       scale=st.sampled_from([1e-3, 1.0, 100.0]), seed=st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch(device, rows, dim, eps, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = ((torch.randn(rows, dim, generator=gen, dtype=torch.float64) + 3.0) * scale).to(device)
    upstream = torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(device)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    got = CompositeLayerNorm.apply(x1, eps)
    want = F.layer_norm(x2, (dim,), eps=eps)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-9 * (1 + 1 / scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [25, 50, 64])
def test_dispatch_fp32(device, dim):
    """The function the models call, fp32 on both kernels' sides of the dispatch."""
    x = torch.randn(300, dim, device=device) * 4 + 1
    torch.testing.assert_close(layer_norm(x, 1e-6), F.layer_norm(x, (dim,), eps=1e-6), rtol=1e-5, atol=1e-5)
