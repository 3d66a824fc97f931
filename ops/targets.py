"""Layout of sequences that end in M-FALCON targets (candidates), shared by the attention paths.

A sequence of length L with num_targets = m is a prefix (the history) of
n = L - m positions followed by m targets. With m > 0:

* prefix rows attend causally, exactly as if the prefix were the whole
  sequence: the last prefix row reads its own timestamp as its "next"
  timestamp (the final timestamp repeated past the end) instead of the first
  target's, so nothing computed for the prefix depends on the targets and its
  per-layer keys and values can be cached;
* target rows attend to the prefix and to themselves only, with the relative
  bias of a query at position n reading its own timestamp, and the target's
  own key also at position n.

So every target is scored exactly as it would be as the only target
(num_targets = 1) after the same prefix. With m = 0 the sequence is the usual
causal one, unchanged.
"""

from __future__ import annotations

import torch


def prefix_lengths(lengths: torch.Tensor, num_targets: torch.Tensor) -> torch.Tensor:
    """(B,) number of positions before the targets."""
    return (lengths - num_targets).clamp(min=0)


def effective_positions(n: int, prefix: torch.Tensor) -> torch.Tensor:
    """(B, n) position each row takes in the relative/absolute position terms: targets sit at `prefix`."""
    pos = torch.arange(n, device=prefix.device)
    return torch.minimum(pos[None, :], prefix[:, None])


def visible_keys(n: int, prefix: torch.Tensor) -> torch.Tensor:
    """(B, n, n) bool, [b, i, j] = query i may attend to key j (causal; targets: prefix and self)."""
    pos = torch.arange(n, device=prefix.device)
    causal = pos[None, :] <= pos[:, None]
    return causal[None] & ((pos[None, None, :] < prefix[:, None, None]) | (pos[None, :] == pos[:, None])[None])


def query_timestamp_index(n: int, max_seq_len: int, prefix: torch.Tensor, num_targets: torch.Tensor) -> torch.Tensor:
    """(B, n) index of the timestamp each query row reads (i + 1, or its own from the last prefix row on)."""
    pos = torch.arange(n, device=prefix.device)
    own = (pos[None, :] >= prefix[:, None] - 1) & (num_targets[:, None] > 0)
    return torch.where(own, pos[None, :].clamp(max=max_seq_len - 1), (pos[None, :] + 1).clamp(max=max_seq_len - 1))
