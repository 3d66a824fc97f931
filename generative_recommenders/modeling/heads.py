"""Task heads of the generative ranking model: small towers on the encoder output at candidate positions.

"liked" is one logit (rating >= 4). "rating" is either five logits (classes
1..5, trained with cross-entropy) or one value (regression, trained with the
squared error; the tower predicts the offset from the scale's middle, 3).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

RATING_HEADS = ("classification", "regression")
NUM_RATINGS = 5
_MIDDLE_RATING = 3.0


def tower(dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """LayerNorm -> Linear -> SiLU -> Linear; the norm because the encoder's residual stream has no fixed scale."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))


class TaskHeads(nn.Module):
    """{"liked": (...,) logits, "rating": (..., 5) logits or (...,) values} from (..., D) encoder outputs."""

    def __init__(self, dim: int, hidden_dim: int, rating_head: str = "classification") -> None:
        super().__init__()
        if rating_head not in RATING_HEADS:
            raise ValueError(f"rating_head must be one of {RATING_HEADS}, got {rating_head!r}")
        self.rating_head = rating_head
        self.liked = tower(dim, hidden_dim, 1)
        self.rating = tower(dim, hidden_dim, NUM_RATINGS if rating_head == "classification" else 1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        # fp32 whatever precision the encoder ran in (train_fn.mixed_precision): the outputs are the
        # ranking losses' logits and the evaluation's scores.
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            rating = self.rating(x)
            if self.rating_head == "regression":
                rating = rating.squeeze(-1) + _MIDDLE_RATING
            return {"liked": self.liked(x).squeeze(-1), "rating": rating}

    def expected_rating(self, outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Point prediction of the rating (the mean of the predicted distribution, or the regressed value)."""
        if self.rating_head == "regression":
            return outputs["rating"]
        values = torch.arange(1, NUM_RATINGS + 1, dtype=outputs["rating"].dtype, device=outputs["rating"].device)
        return torch.softmax(outputs["rating"], dim=-1) @ values

    def rating_class(self, outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Predicted rating 1..5 (most likely class, or the rounded regressed value)."""
        if self.rating_head == "regression":
            return outputs["rating"].round().clamp(1, NUM_RATINGS).long()
        return outputs["rating"].argmax(dim=-1) + 1
