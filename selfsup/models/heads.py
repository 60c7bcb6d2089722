"""Heads: the MLP used as projector or predictor."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """``num_layers`` linear layers with BatchNorm and ReLU between them.

    Args:
        in_dim, hidden_dim, out_dim: widths.
        num_layers: total linear layers (1 is a plain linear map).
        norm: ``"bn"`` puts BatchNorm after each hidden linear layer; ``None`` for none.
        last_norm: BatchNorm without affine after the last layer (BYOL/SimSiam-style projectors).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, norm: str | None = "bn",
                 last_norm: bool = False):
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1")
        if norm not in ("bn", None):
            raise ValueError(f"norm={norm!r} must be 'bn' or None")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == num_layers - 1
            layers.append(nn.Linear(a, b, bias=last or norm is None))
            if not last:
                layers += [nn.BatchNorm1d(b)] if norm == "bn" else []
                layers.append(nn.ReLU(inplace=True))
        if last_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
