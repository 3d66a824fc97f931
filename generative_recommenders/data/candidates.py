"""The candidate set: the item ids a model ranks and samples negatives from, and their columns."""

from __future__ import annotations

import torch


class CandidateIndex:
    """Maps item ids to columns of a (*, C) candidate score matrix."""

    def __init__(self, candidate_ids: torch.Tensor, max_item_id: int) -> None:
        self.candidate_ids = candidate_ids.long()
        column = torch.full((max_item_id + 1,), -1, dtype=torch.long, device=candidate_ids.device)
        column[self.candidate_ids] = torch.arange(candidate_ids.numel(), device=candidate_ids.device)
        self.column = column

    @property
    def num_candidates(self) -> int:
        return self.candidate_ids.numel()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Column of each id, -1 for ids that are not candidates (0 = padding and [MASK] included)."""
        inside = ids < self.column.numel()
        return torch.where(inside, self.column[ids.clamp(0, self.column.numel() - 1)], -1)
