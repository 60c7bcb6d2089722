"""Heads: the MLP used as projector or predictor."""

from __future__ import annotations

from torch import nn

LAST_NORMS = (False, True, "plain", "scale")


class ScaleBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm with a learned scale and no shift (TensorFlow's ``center=False, scale=True``), as the
    official SimCLR code ends its projector. The shift stays in the state dict as zeros without gradient,
    so the layer has the usual BatchNorm keys."""

    def __init__(self, num_features: int):
        super().__init__(num_features, affine=True)
        self.bias.requires_grad_(False)  # initialised to zeros by BatchNorm, and kept there


def last_norm_layer(last_norm: bool | str, dim: int) -> nn.Module | None:
    """The normalisation after the last linear layer: ``True``/``"plain"`` BatchNorm without affine
    (BYOL/SimSiam-style), ``"scale"`` :class:`ScaleBatchNorm1d` (SimCLR), ``False`` none."""
    if last_norm not in LAST_NORMS:
        raise ValueError(f"last_norm={last_norm!r} must be one of {LAST_NORMS}")
    if last_norm == "scale":
        return ScaleBatchNorm1d(dim)
    return nn.BatchNorm1d(dim, affine=False) if last_norm else None


class MLP(nn.Sequential):
    """``num_layers`` linear layers with BatchNorm and ReLU between them.

    Args:
        in_dim, hidden_dim, out_dim: widths.
        num_layers: total linear layers (1 is a plain linear map).
        norm: ``"bn"`` puts BatchNorm after each hidden linear layer; ``None`` for none.
        last_norm: BatchNorm after the last layer: ``True``/``"plain"`` without affine (BYOL/SimSiam-style),
            ``"scale"`` with a scale and no shift (SimCLR); the last linear layer then has no bias, which
            the BatchNorm would remove anyway.
        last_bias: whether the last linear layer has a bias; ``None``: unless ``last_norm`` is set. VICReg's
            expander and Barlow Twins' projector end with a bias-free linear layer (``False``).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, norm: str | None = "bn",
                 last_norm: bool | str = False, last_bias: bool | None = None):
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1")
        if norm not in ("bn", None):
            raise ValueError(f"norm={norm!r} must be 'bn' or None")
        final_norm = last_norm_layer(last_norm, out_dim)
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == num_layers - 1
            bias = ((final_norm is None) if last_bias is None else last_bias) if last else norm is None
            layers.append(nn.Linear(a, b, bias=bias))
            if not last:
                layers += [nn.BatchNorm1d(b)] if norm == "bn" else []
                layers.append(nn.ReLU(inplace=True))
        if final_norm is not None:
            layers.append(final_norm)
        super().__init__(*layers)
