"""VICReg: keep two views' embeddings close (invariance) while each embedding dimension keeps its spread
(variance) and the dimensions stay decorrelated (covariance).

Reference: Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022; official code ``facebookresearch/vicreg`` (``main_vicreg.py``).
Paper defaults: expander 8192-8192-8192 (linear, BatchNorm, ReLU between layers; the last linear layer
without bias), invariance weight 25, variance weight 25, covariance weight 1, std target 1, eps 1e-4;
LARS with base lr 0.2 x B/256 at batch 2048, weight decay 1e-6, 10 warmup epochs then cosine, 1000 epochs;
SyncBatchNorm. ResNet-50 ImageNet linear evaluation: 73.2% top-1.

The variance and covariance statistics are those of the global batch: the embeddings are gathered from
every rank with gradients (as the official ``FullGatherLayer``), so 2 ranks x B equal 1 rank x 2B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.distributed import gather_with_grad
from selfsup.methods.base import SSLMethod
from selfsup.methods.common import full_precision
from selfsup.models.encoder import Encoder
from selfsup.models.heads import MLP


def off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def variance_term(z: Tensor, std_target: float = 1.0, eps: float = 1e-4) -> Tensor:
    """Hinge on the per-dimension standard deviation: ``mean_j relu(std_target - sqrt(var_j + eps))``."""
    return F.relu(std_target - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: Tensor) -> Tensor:
    """Sum of squared off-diagonal covariances, divided by the dimension ``D``."""
    z = z - z.mean(dim=0)
    cov = z.T @ z / (z.shape[0] - 1)
    return off_diagonal(cov).pow(2).sum() / z.shape[1]


def vicreg_loss(z_a: Tensor, z_b: Tensor, invariance_weight: float = 25.0, variance_weight: float = 25.0,
                covariance_weight: float = 1.0, std_target: float = 1.0, eps: float = 1e-4) -> dict[str, Tensor]:
    """VICReg's terms for two ``(B, D)`` embeddings of the same images, over the global batch.

    Returns ``loss`` (the weighted sum), ``invariance`` (mean squared error), ``variance`` (the average of
    both branches' hinges) and ``covariance`` (the sum over both branches), as the official code. Computed in
    float32; under DDP the embeddings of every rank are gathered with gradients first.
    """
    with full_precision(z_a.device.type):
        z_a = rearrange(gather_with_grad(z_a.float()), "w b d -> (w b) d")
        z_b = rearrange(gather_with_grad(z_b.float()), "w b d -> (w b) d")
        if z_a.shape[0] < 2:
            raise ValueError(f"VICReg needs a global batch of at least 2 images for its variance, got {z_a.shape[0]}")
        invariance = F.mse_loss(z_a, z_b)
        variance = (variance_term(z_a, std_target, eps) + variance_term(z_b, std_target, eps)) / 2
        covariance = covariance_term(z_a) + covariance_term(z_b)
        loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}


class VICReg(SSLMethod):
    """VICReg: ``encoder -> expander -> vicreg_loss`` on two views.

    Args:
        encoder: the backbone.
        proj_hidden_dim, proj_dim, proj_layers: the expander (``proj_layers`` linear layers with BatchNorm
            and ReLU between them, the last without bias).
        invariance_weight, variance_weight, covariance_weight: the paper's lambda, mu and nu.
        std_target: the standard deviation each dimension is pushed to (the paper's gamma).
        eps: added to the variance before the square root.
        **base: optimizer and schedule settings of :class:`SSLMethod`.
    """

    def __init__(self, encoder: Encoder, proj_hidden_dim: int = 8192, proj_dim: int = 8192, proj_layers: int = 3,
                 invariance_weight: float = 25.0, variance_weight: float = 25.0, covariance_weight: float = 1.0,
                 std_target: float = 1.0, eps: float = 1e-4, **base):
        super().__init__(encoder, **base)
        for key, value in dict(invariance_weight=invariance_weight, variance_weight=variance_weight,
                               covariance_weight=covariance_weight).items():
            if value < 0:
                raise ValueError(f"model.{key}={value} must be >= 0")
        if std_target <= 0 or eps <= 0:
            raise ValueError(f"model.std_target={std_target} and model.eps={eps} must be positive")
        self.projector = MLP(encoder.embed_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bias=False)
        self.loss_args = dict(invariance_weight=invariance_weight, variance_weight=variance_weight,
                              covariance_weight=covariance_weight, std_target=std_target, eps=eps)

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        if len(batch.views) != 2:
            raise ValueError(f"VICReg takes exactly 2 views, got {len(batch.views)} (set data.views.num_views: 2)")
        h = self.encode_views(batch.views)
        z_a, z_b = (self.projector(x) for x in h)  # per branch, as the official code: BatchNorm per view
        return {**vicreg_loss(z_a, z_b, **self.loss_args), "features": h[0].detach()}
