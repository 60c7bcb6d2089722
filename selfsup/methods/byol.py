"""BYOL: predict the EMA target network's projection of one view from the other view.

Reference: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020. Paper defaults: ResNet-50; projector and predictor MLPs 2048 -> 4096 (BatchNorm, ReLU) -> 256;
target network (encoder + projector) an EMA of the online one, momentum cosine from 0.996 to 1 over
training; loss ``2 - 2 cos(p, z)`` symmetrised over the two views; LARS, lr 0.2 x B/256 (B = 4096),
weight decay 1.5e-6, biases and BatchNorm excluded from decay and LARS adaptation, 10 warmup epochs,
1000 epochs; asymmetric views: blur p = 1.0 / 0.1, solarisation p = 0.0 / 0.2, colour jitter (0.4, 0.4,
0.2, 0.1) p = 0.8, grayscale p = 0.2 (``ContrastiveViews`` with per-view lists). The student is the
representation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.methods.base import SSLMethod
from selfsup.methods.common import full_precision
from selfsup.models.encoder import Encoder
from selfsup.models.heads import MLP
from selfsup.models.teacher import EMATeacher
from selfsup.optim import Cosine, Schedule, schedule_config


def normalized_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """``|| p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)``, averaged over the batch, in float32; no gradient to ``target``."""
    with full_precision(prediction.device.type):
        p, z = F.normalize(prediction.float(), dim=-1), F.normalize(target.detach().float(), dim=-1)
        return (2 - 2 * (p * z).sum(dim=-1)).mean()


def byol_loss(predictions: list[Tensor], targets: list[Tensor]) -> Tensor:
    """Each view's online prediction against every other view's target projection: for two views the
    paper's symmetric ``L(p1, z2) + L(p2, z1)``; more views average the ordered pairs, scaled to match."""
    num_views = len(predictions)
    pairs = [normalized_mse(predictions[i], targets[j]) for i in range(num_views) for j in range(num_views) if i != j]
    return torch.stack(pairs).sum() * 2 / (num_views * (num_views - 1))


class BYOL(SSLMethod):
    """BYOL: ``encoder -> projector -> predictor`` against the EMA ``teacher(encoder -> projector)``.

    Args:
        encoder: the backbone (the representation).
        proj_hidden_dim, proj_dim: projector widths (2-layer MLP with BatchNorm).
        pred_hidden_dim: predictor hidden width (the predictor maps ``proj_dim`` to ``proj_dim``).
        teacher_momentum: EMA momentum per optimizer step (:class:`~selfsup.optim.Schedule`; a number is constant).
        **base: optimizer and schedule settings of :class:`SSLMethod`.
    """

    representation = "student"

    def __init__(self, encoder: Encoder, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, teacher_momentum: Schedule | float = Cosine(0.996, 1.0), **base):
        super().__init__(encoder, **base)
        self.projector = MLP(encoder.embed_dim, proj_hidden_dim, proj_dim, num_layers=2)
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim, num_layers=2)
        self.teacher = EMATeacher([self.encoder, self.projector], teacher_momentum)
        self.hparams["teacher_momentum"] = schedule_config(self.teacher.momentum)  # plain data in checkpoints

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        h = self.encode_views(batch.views)
        online = self.predictor(self.projector(torch.cat(h))).chunk(len(h))
        target = self.teacher(batch.views)
        return {"loss": byol_loss(list(online), target), "features": h[0].detach()}
