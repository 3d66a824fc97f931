"""Jagged (ragged) tensor helpers: complete cumsum and dense <-> jagged.

A jagged batch of B sequences is stored as `values` of shape (L, ...) holding
the sequences back to back, and `offsets` of shape (B + 1,) with
`offsets[b]:offsets[b + 1]` the rows of sequence b. The dense form is
(B, N, ...), left-aligned and padded.

Everything here is plain PyTorch and works on any device. When fbgemm_gpu is
importable *and* its ops actually run (its wheels are tied to one torch
version, and a mismatch used to break start-up of the original release), the
same functions dispatch to fbgemm_gpu; `set_backend("torch")` forces the
plain path. Both give identical results (tests/test_jagged.py).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

_backend = "auto"


def set_backend(name: str) -> None:
    """Chooses "auto" (fbgemm_gpu when it works), "torch" or "fbgemm"."""
    global _backend
    if name not in ("auto", "torch", "fbgemm"):
        raise ValueError(f"unknown jagged backend {name!r}: use auto, torch or fbgemm")
    if name == "fbgemm" and not fbgemm_available():
        raise RuntimeError("jagged backend 'fbgemm' requested but fbgemm_gpu is not usable here")
    _backend = name


@functools.lru_cache(maxsize=1)
def fbgemm_available() -> bool:
    """True when fbgemm_gpu imports and its jagged ops give the right answer."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        offsets = torch.tensor([0, 1, 3])
        dense = torch.ops.fbgemm.jagged_to_padded_dense(
            torch.arange(3.0).view(3, 1), [offsets], [2], 0.0
        )
        return bool(torch.equal(dense.view(2, 2), torch.tensor([[0.0, 0.0], [1.0, 2.0]])))
    except Exception as exc:  # any failure means "do not use it", never a crash
        logging.getLogger(__name__).info("fbgemm_gpu not usable (%s); using pure PyTorch", exc)
        return False


_FBGEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64)


def _use_fbgemm(dtype: torch.dtype = torch.float32) -> bool:
    """fbgemm_gpu when chosen (or "auto" and usable) and it supports the dtype (it has no float64)."""
    return dtype in _FBGEMM_DTYPES and (_backend == "fbgemm" or (_backend == "auto" and fbgemm_available()))


def complete_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """Offsets (B + 1,) from lengths (B,): [0, l0, l0 + l1, ...]."""
    if _use_fbgemm(lengths.dtype):
        return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    return torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=lengths.dtype), (1, 0))


def _jagged_index(offsets: torch.Tensor, max_len: int, total: int) -> torch.Tensor:
    """Flat dense index b * max_len + position for each of the `total` jagged rows."""
    rows = torch.arange(total, device=offsets.device)
    seq = torch.searchsorted(offsets, rows, right=True) - 1
    return seq * max_len + (rows - offsets[seq])


def jagged_to_dense(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0
) -> torch.Tensor:
    """(L, ...) jagged -> (B, max_len, ...) dense; rows past max_len are dropped."""
    batch = offsets.numel() - 1
    if _use_fbgemm(values.dtype) and values.dim() == 2:
        return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], padding_value)
    lengths = (offsets[1:] - offsets[:-1]).clamp(max=max_len)
    keep = torch.arange(max_len, device=values.device)[None, :] < lengths[:, None]
    src = offsets[:-1, None] + torch.arange(max_len, device=values.device)[None, :]
    src = torch.where(keep, src, torch.zeros_like(src)).view(-1)
    out = values.new_full((batch * max_len,) + values.shape[1:], padding_value)
    if values.shape[0] == 0:
        return out.view((batch, max_len) + values.shape[1:])
    gathered = values.index_select(0, src)
    mask_shape = (batch * max_len,) + (1,) * (values.dim() - 1)
    out = torch.where(keep.view(mask_shape), gathered, out)
    return out.view((batch, max_len) + values.shape[1:])


def dense_to_jagged(
    dense: torch.Tensor, offsets: torch.Tensor, total: Optional[int] = None
) -> torch.Tensor:
    """(B, N, ...) dense -> (L, ...) jagged, keeping the first length_b rows of each b.

    `total` (= offsets[-1]) may be given to avoid a device-to-host sync.
    """
    batch, max_len = dense.shape[:2]
    if total is None:
        total = int(offsets[-1].item())
    if _use_fbgemm(dense.dtype) and dense.dim() == 3:
        return torch.ops.fbgemm.dense_to_jagged(dense, [offsets], total_L=total)[0]
    flat = dense.reshape((batch * max_len,) + dense.shape[2:])
    return flat.index_select(0, _jagged_index(offsets, max_len, total))


def jagged_values(dense: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    """(B, N) per-position values (labels, weights) -> (L,) in the jagged order of the model's outputs."""
    return dense_to_jagged(dense.unsqueeze(-1), offsets, total).squeeze(-1)
