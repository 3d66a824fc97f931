"""Dot products of queries with table rows picked per query: out[l, r] = query[l] . table[columns[l, r]].

This scores sampled negatives (generative_recommenders/objectives/losses.py):
L queries, each against R rows of a table of P item embeddings.
`gathered_dot_reference` is the plain PyTorch formula (it gathers the
(L, R, D) rows first), the ground truth for tests and the path on CPU.
`gathered_dot` dispatches to the Triton kernel of ops/triton/gathered_dot.py,
which never holds the (L, R, D) rows in memory, on CUDA when Triton imports,
and on CPU tensors under TRITON_INTERPRET=1 (tests).

Both return fp32 whatever the inputs' float dtypes (fp32, bf16, mixed): the
products are summed in fp32 and the logits stay in fp32 for the softmax.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from ops.dispatch import kernel_usable


def gathered_dot_reference(query: torch.Tensor, table: torch.Tensor, columns: torch.Tensor, row_offset: int = 0,
                           eps: Optional[float] = None) -> torch.Tensor:
    """(L, R) fp32 dot products of query (L, D) with rows row_offset + columns (L, R) of table (P, D),
    each row first L2-normalised as F.normalize(row, eps=eps) when eps is given."""
    rows = table[columns + row_offset].float()
    if eps is not None:
        rows = torch.nn.functional.normalize(rows, dim=-1, eps=eps)
    return torch.einsum("ld,lrd->lr", query.float(), rows)


@functools.lru_cache(maxsize=None)
def triton_problem() -> Optional[str]:
    """Why the kernel cannot be used here (Triton missing or broken), or None."""
    try:
        from ops.triton import gathered_dot as _  # noqa: F401
    except Exception as exc:
        return f"the gathered-dot kernel failed to import ({exc})"
    return None


def triton_available(device: torch.device) -> bool:
    """True when the kernel can run on CUDA `device`; on CUDA without it, says once why PyTorch is used.

    False on CPU even under the interpreter: callers that choose a cheaper
    algorithm when the kernel exists (losses.negative_logits) keep their CPU
    path, so tests that merely run beside the interpreted kernel tests are not
    slowed down by it.
    """
    return kernel_usable(device, triton_problem(), "sampled negatives are scored by the PyTorch path")


def _interpreting(device: torch.device) -> bool:
    """CPU tensors with Triton's interpreter switched on (how the tests run the kernel without a GPU)."""
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and triton_problem() is None


def gathered_dot(query: torch.Tensor, table: torch.Tensor, columns: torch.Tensor, row_offset: int = 0,
                 eps: Optional[float] = None) -> torch.Tensor:
    """Same contract as `gathered_dot_reference`, differentiable in query and table.

    With eps the kernel normalises each gathered row itself, so a normalised
    table never exists: the loss scores the raw embedding table's rows and its
    gradient lands in the raw rows (for Books, 695,762 x 64, that saves several
    passes over the table per step).

    With the kernel the table's gradient is summed with fp32 atomics, so it is
    non-deterministic in the last bits (see ops/triton/gathered_dot.py).
    """
    if triton_available(query.device) or _interpreting(query.device):
        from ops.triton.gathered_dot import triton_gathered_dot

        return triton_gathered_dot(query, table, columns, row_offset, eps)
    return gathered_dot_reference(query, table, columns, row_offset, eps)
