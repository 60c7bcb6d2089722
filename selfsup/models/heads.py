"""Heads: the MLP used as projector or predictor, and DINO's head (MLP, L2 bottleneck, weight-normalised
prototypes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAST_NORMS = (False, True, "plain", "scale")
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


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
        activation: ``"relu"``, or ``"gelu"`` (DINO's head).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, norm: str | None = "bn",
                 last_norm: bool | str = False, last_bias: bool | None = None, activation: str = "relu"):
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1")
        if norm not in ("bn", None):
            raise ValueError(f"norm={norm!r} must be 'bn' or None")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {list(ACTIVATIONS)}")
        final_norm = last_norm_layer(last_norm, out_dim)
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == num_layers - 1
            bias = ((final_norm is None) if last_bias is None else last_bias) if last else norm is None
            layers.append(nn.Linear(a, b, bias=bias))
            if not last:
                layers += [nn.BatchNorm1d(b)] if norm == "bn" else []
                layers.append(ACTIVATIONS[activation]())
        if final_norm is not None:
            layers.append(final_norm)
        super().__init__(*layers)


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation (Salimans and Kingma 2016): row ``i`` of the weight is
    ``weight_g[i] * weight_v[i] / |weight_v[i]|``, ``weight_g`` starting at 1 (trained only with ``train_norm``).

    The parameter names are those of torch's former ``weight_norm`` (and of DINO's checkpoints). Plain
    parameters rather than torch's parametrization, which cannot be pickled (``ddp_spawn``, notebooks).
    """

    def __init__(self, in_dim: int, out_dim: int, train_norm: bool = False):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=train_norm)

    @property
    def weight(self) -> Tensor:
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO's projection head: ``MLP -> L2-normalise (bottleneck) -> weight-normalised linear (prototypes)``.

    Args:
        in_dim: the encoder's feature width.
        out_dim: number of prototypes ``K`` (65536 in the paper).
        hidden_dim, bottleneck_dim, num_layers: the MLP (2048, 256, 3 layers, GELU).
        batch_norm: BatchNorm in the MLP's hidden layers (the paper's ResNet-50 set-up; off for ViTs).
        norm_last_layer: fix the norm of every prototype to 1 (``g = 1``, not trained), the paper's default for
            stability; ``False`` trains ``g`` too.

    The last layer is ``last_layer`` (:class:`WeightNormLinear`), so a method can freeze it for the first
    epoch (DINO's ``freeze_last_layer``).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = MLP(in_dim, hidden_dim, bottleneck_dim, num_layers, norm="bn" if batch_norm else None,
                       last_bias=True, activation="gelu")
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, train_norm=not norm_last_layer)

    def project(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck, before the prototypes (iBOT puts its patch prototypes on it)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.project(x))
