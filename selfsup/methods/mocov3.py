"""MoCo v3: contrast each view's prediction against the momentum encoder's keys of the other view.

Reference: Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021;
official code ``facebookresearch/moco-v3`` (``moco/builder.py``, ``main_moco.py``). Per the paper's
pseudo-code::

    q1, q2 = predictor(projector(encoder(x1))), predictor(projector(encoder(x2)))   # queries
    k1, k2 = momentum_encoder(x1), momentum_encoder(x2)                              # keys, no gradient
    loss = ctr(q1, k2) + ctr(q2, k1)
    ctr(q, k) = 2T * cross_entropy(normalize(q) @ normalize(gather(k)).T / T, arange(B) + rank * B)

Paper and reference defaults: the momentum encoder is an EMA of ``encoder -> projector``, momentum cosine from
0.99 to 1; MLPs of linear layers without bias, BatchNorm and ReLU between them, 4096 hidden, 256 out. ViT:
a 3-layer projector and a 2-layer predictor, both ending in an affine-free BatchNorm; temperature 0.2;
AdamW lr 1.5e-4 x B/256 (B = 4096), weight decay 0.1, 40 warmup epochs, 300 epochs; fixed 2-D sin-cos
positions and a frozen random patch projection (``--stop-grad-conv1``). ResNet-50: a 2-layer projector
(last BatchNorm) and a 2-layer predictor without it; temperature 1.0; LARS lr 0.6 x B/256 (0.3 from 300
epochs), weight decay 1e-6 (1.5e-6 at 1000 epochs), 10 warmup epochs. Views as BYOL's (blur p 1.0 / 0.1,
solarisation p 0.0 / 0.2). No queue: the negatives are the other images' keys of the global batch, gathered
from every rank without gradient, so a rank's labels start at ``rank * B``.

Every BatchNorm sees one view's batch, as the reference runs each network once per view.

The representation is the student (query) encoder: the reference linear evaluation (``main_lincls.py``)
and its DeiT conversion (``convert_to_deit.py``) read ``module.base_encoder``, not the momentum encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.distributed import gather, rank
from selfsup.methods.base import SSLMethod
from selfsup.methods.common import check_arg, full_precision
from selfsup.models.encoder import Encoder
from selfsup.models.heads import MLP
from selfsup.models.teacher import EMATeacher
from selfsup.optim import Cosine, Schedule, schedule_config


def contrastive_loss(queries: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """InfoNCE of this rank's ``(B, D)`` queries against the keys of every rank, times ``2 * temperature``.

    The keys are L2-normalised and gathered from all ranks without gradient; query ``i`` of rank ``r`` has
    its positive at ``r * B + i``. Computed in float32."""
    with full_precision(queries.device.type):
        q = F.normalize(queries.float(), dim=-1)
        k = gather(F.normalize(keys.detach().float(), dim=-1))
        logits = q @ k.T / temperature
        labels = torch.arange(len(q), device=q.device) + rank() * len(q)
        return F.cross_entropy(logits, labels) * (2 * temperature)


def mocov3_loss(queries: list[Tensor], keys: list[Tensor], temperature: float) -> Tensor:
    """The symmetric ``ctr(q1, k2) + ctr(q2, k1)`` of two views."""
    if len(queries) != 2 or len(keys) != 2:
        raise ValueError(f"MoCo v3 takes exactly 2 views, got {len(queries)} queries and {len(keys)} keys "
                         "(set data.views.num_views: 2)")
    return contrastive_loss(queries[0], keys[1], temperature) + contrastive_loss(queries[1], keys[0], temperature)


class MoCoV3(SSLMethod):
    """MoCo v3: ``encoder -> projector -> predictor`` (queries) against ``teacher(encoder -> projector)`` (keys).

    Args:
        encoder: the backbone (the representation).
        proj_hidden_dim, proj_dim: projector widths; it ends in an affine-free BatchNorm.
        proj_layers: projector linear layers; ``None``: 3 for a ViT, 2 otherwise (the reference).
        pred_hidden_dim: predictor hidden width (2 layers, ``proj_dim`` to ``proj_dim``).
        pred_last_norm: end the predictor with an affine-free BatchNorm; ``None``: for a ViT only (the reference).
        temperature: softmax temperature (0.2 in the paper's ViT runs, 1.0 in the reference's ResNet-50 runs).
        teacher_momentum: EMA momentum per optimizer step (:class:`~selfsup.optim.Schedule`; a number is constant).
        random_patch_projection: freeze the ViT's randomly initialised patch embedding (the paper's stability
            trick, ``--stop-grad-conv1`` in the reference).
        **base: optimizer and schedule settings of :class:`SSLMethod`.
    """

    representation = "student"

    def __init__(self, encoder: Encoder, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 proj_layers: int | None = None, pred_hidden_dim: int = 4096, pred_last_norm: bool | None = None,
                 temperature: float = 0.2, teacher_momentum: Schedule | float = Cosine(0.99, 1.0),
                 random_patch_projection: bool = False, **base):
        super().__init__(encoder, **base)
        check_arg("temperature", temperature > 0, temperature, "positive")
        check_arg("proj_layers", proj_layers is None or proj_layers >= 1, proj_layers, ">= 1 or null")
        check_arg("random_patch_projection", not random_patch_projection or encoder.is_vit, random_patch_projection,
                  f"false for {encoder.config['name']!r}: it freezes a ViT's patch embedding")
        if random_patch_projection:
            encoder.model.patch_embed.requires_grad_(False)
        proj_layers = (3 if encoder.is_vit else 2) if proj_layers is None else proj_layers
        pred_last_norm = encoder.is_vit if pred_last_norm is None else pred_last_norm
        self.projector = MLP(encoder.embed_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_norm="plain")
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim, num_layers=2,
                             last_norm="plain" if pred_last_norm else False, last_bias=False)
        self.teacher = EMATeacher([self.encoder, self.projector], teacher_momentum)
        self.hparams["teacher_momentum"] = schedule_config(self.teacher.momentum)  # plain data in checkpoints
        self.temperature = temperature

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        if len(batch.views) != 2:
            raise ValueError(f"MoCo v3 takes exactly 2 views, got {len(batch.views)} (set data.views.num_views: 2)")
        h = [self.encode_views([x])[0] for x in batch.views]  # one view at a time, as the reference
        queries = [self.predictor(self.projector(x)) for x in h]
        keys = [self.teacher(x) for x in batch.views]
        return {"loss": mocov3_loss(queries, keys, self.temperature), "features": h[0].detach()}
