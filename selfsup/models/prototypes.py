"""Prototypes: a bank of unit-norm cluster centres scored by cosine similarity (SwAV)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Prototypes(nn.Module):
    """``num_prototypes`` learnable vectors of width ``dim``; ``forward(z)`` gives the scores ``z @ C^T``.

    A linear layer without bias whose rows are kept on the unit sphere by :meth:`normalize_`, so for
    L2-normalised ``z`` the scores are cosine similarities in ``[-1, 1]``.
    """

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        if dim < 1 or num_prototypes < 1:
            raise ValueError(f"Prototypes(dim={dim}, num_prototypes={num_prototypes}): both must be positive")
        self.linear = nn.Linear(dim, num_prototypes, bias=False)
        self.normalize_()

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def num_prototypes(self) -> int:
        return self.linear.out_features

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype back onto the unit sphere (in place, no gradient)."""
        self.linear.weight.copy_(F.normalize(self.linear.weight.float(), dim=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z)
