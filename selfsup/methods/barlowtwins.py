"""Barlow Twins: make the cross-correlation matrix of two views' batch-normalised embeddings the identity.

Reference: Zbontar, Jing, Misra, LeCun and Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021; official code ``facebookresearch/barlowtwins`` (``main.py``).
Paper defaults: projector 8192-8192-8192 (bias-free linear layers, BatchNorm and ReLU between them),
lambda 0.0051 on the off-diagonal terms, batch 2048, LARS with lr 0.2 x B/256 for weights (0.0048 for
biases and BatchNorm parameters), weight decay 1.5e-6 in the paper (1e-6 in the code), 10 warmup epochs then
cosine, 1000 epochs; SyncBatchNorm. ResNet-50 ImageNet linear evaluation: 73.2% top-1.

The official code normalises each branch with an affine-free (Sync)BatchNorm and all-reduces the
cross-correlation matrix. Here the embeddings are gathered from every rank with gradients and normalised over
the global batch inside the loss, so the loss and its gradients are those of one batch made of every rank's
samples (2 ranks x B equal 1 rank x 2B). solo-learn's ``scale_loss`` multiplies the result (0.1 on CIFAR).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.distributed import gather_with_grad
from selfsup.methods.base import SSLMethod
from selfsup.methods.common import full_precision
from selfsup.methods.vicreg import off_diagonal
from selfsup.models.encoder import Encoder
from selfsup.models.heads import MLP
from selfsup.optim import no_weight_decay_names


def batch_normalize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Affine-free BatchNorm in training mode: per dimension, minus the batch mean, over the biased std."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def barlow_twins_loss(z_a: Tensor, z_b: Tensor, lambd: float = 0.0051, scale_loss: float = 1.0,
                      eps: float = 1e-5) -> dict[str, Tensor]:
    """Barlow Twins' loss for two ``(B, D)`` embeddings of the same images, over the global batch.

    ``c = bn(z_a).T @ bn(z_b) / N`` (N images in the global batch); ``on_diagonal = sum_i (1 - c_ii)^2``,
    ``off_diagonal = sum_{i != j} c_ij^2``, ``loss = scale_loss * (on_diagonal + lambd * off_diagonal)``.
    Computed in float32; under DDP the embeddings of every rank are gathered with gradients first.
    """
    with full_precision(z_a.device.type):
        z_a = rearrange(gather_with_grad(z_a.float()), "w b d -> (w b) d")
        z_b = rearrange(gather_with_grad(z_b.float()), "w b d -> (w b) d")
        if z_a.shape[0] < 2:
            raise ValueError(f"Barlow Twins needs a global batch of at least 2 images, got {z_a.shape[0]}")
        c = batch_normalize(z_a, eps).T @ batch_normalize(z_b, eps) / z_a.shape[0]
        on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        loss = scale_loss * (on_diagonal + lambd * off_diag)
    return {"loss": loss, "on_diagonal": on_diagonal, "off_diagonal": off_diag}


class BarlowTwins(SSLMethod):
    """Barlow Twins: ``encoder -> projector -> barlow_twins_loss`` on two views.

    Args:
        encoder: the backbone.
        proj_hidden_dim, proj_dim, proj_layers: the projector (``proj_layers`` bias-free linear layers with
            BatchNorm and ReLU between them).
        lambd: weight of the off-diagonal (redundancy reduction) terms.
        scale_loss: a factor on the whole loss (1 in the official code, 0.1 in solo-learn's CIFAR recipe).
        bias_lr_ratio: the learning rate of the parameters without weight decay (biases, BatchNorm weights)
            over that of the weights: the paper's 0.0048 / 0.2 = 0.024 with LARS, which (timm's, as the
            official code) does not adapt those parameters either. 1 gives every parameter one rate.
        **base: optimizer and schedule settings of :class:`SSLMethod`.
    """

    def __init__(self, encoder: Encoder, proj_hidden_dim: int = 8192, proj_dim: int = 8192, proj_layers: int = 3,
                 lambd: float = 0.0051, scale_loss: float = 1.0, bias_lr_ratio: float = 0.024, **base):
        super().__init__(encoder, **base)
        if lambd < 0 or scale_loss <= 0:
            raise ValueError(f"model.lambd={lambd} must be >= 0 and model.scale_loss={scale_loss} positive")
        if bias_lr_ratio <= 0:
            raise ValueError(f"model.bias_lr_ratio={bias_lr_ratio} must be positive")
        self.projector = MLP(encoder.embed_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bias=False)
        if bias_lr_ratio != 1:  # by name and shape, now: the groups are decided before any wrapping
            self.lr_scales = dict.fromkeys(no_weight_decay_names(self), bias_lr_ratio)
        self.lambd, self.scale_loss = lambd, scale_loss

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        if len(batch.views) != 2:
            raise ValueError(f"Barlow Twins takes exactly 2 views, got {len(batch.views)} "
                             "(set data.views.num_views: 2)")
        h = self.encode_views(batch.views)
        z_a, z_b = (self.projector(x) for x in h)  # per branch, as the official code: BatchNorm per view
        return {**barlow_twins_loss(z_a, z_b, self.lambd, self.scale_loss), "features": h[0].detach()}
