"""SimCLR: contrast augmented views of each image against every other image in the (global) batch.

Reference: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020. Paper defaults: 2-layer MLP projector (2048 hidden, 128 out; the official code ends it with
BatchNorm), temperature 0.1 at batch 4096 (0.5 for small batches), LARS with lr 0.3 x B/256, weight
decay 1e-6, 10 warmup epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.distributed import gather_with_grad, rank
from selfsup.methods.base import SSLMethod
from selfsup.methods.common import full_precision
from selfsup.models.encoder import Encoder
from selfsup.models.heads import MLP


def nt_xent(views: list[Tensor], temperature: float) -> Tensor:
    """Normalised-temperature cross entropy over ``V >= 2`` views of ``B`` images.

    Each embedding is an anchor; the other views of its image are its positives and every other
    embedding in the global batch (all ranks, gathered with gradients) is a negative. With several
    positives the loss averages ``-log p(positive)`` over them (for ``V = 2`` this is exactly the
    SimCLR loss). Computed in float32.
    """
    with full_precision(views[0].device.type):
        z = F.normalize(torch.stack(views).float(), dim=-1)                      # (V, B, D)
        num_views, batch = z.shape[:2]
        keys = rearrange(gather_with_grad(rearrange(z, "v b d -> b v d")), "w b v d -> (v w b) d")
        anchors = rearrange(z, "v b d -> (v b) d")
        logits = anchors @ keys.T / temperature                                  # (V*B, V*W*B)

        n = keys.shape[0] // num_views                                           # global images
        key_image = torch.arange(n, device=z.device).repeat(num_views)
        key_view = torch.arange(num_views, device=z.device).repeat_interleave(n)
        anchor_image = (rank() * batch + torch.arange(batch, device=z.device)).repeat(num_views)
        anchor_view = torch.arange(num_views, device=z.device).repeat_interleave(batch)
        same_image = anchor_image[:, None] == key_image[None]
        is_self = same_image & (anchor_view[:, None] == key_view[None])

        log_prob = logits.masked_fill(is_self, float("-inf")).log_softmax(dim=-1)
        positives = same_image & ~is_self
        return -(log_prob.masked_fill(~positives, 0).sum(-1) / positives.sum(-1)).mean()


class SimCLR(SSLMethod):
    """SimCLR: ``encoder -> projector -> NT-Xent``.

    Args:
        encoder: the backbone.
        proj_hidden_dim, proj_dim: projector widths (2-layer MLP with BatchNorm).
        temperature: NT-Xent temperature.
        proj_last_bn: end the projector with BatchNorm as the official SimCLR code does (its last layer:
            linear without bias, then BatchNorm with ``center=False``, a learned scale and no shift).
        **base: optimizer and schedule settings of :class:`SSLMethod`.
    """

    def __init__(self, encoder: Encoder, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 temperature: float = 0.1, proj_last_bn: bool = False, **base):
        super().__init__(encoder, **base)
        if temperature <= 0:
            raise ValueError(f"model.temperature={temperature} must be positive")
        self.projector = MLP(encoder.embed_dim, proj_hidden_dim, proj_dim, num_layers=2,
                             last_norm="scale" if proj_last_bn else False)
        self.temperature = temperature

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        h = self.encode_views(batch.views)
        z = self.projector(torch.cat(h)).chunk(len(h))
        return {"loss": nt_xent(list(z), self.temperature), "features": h[0].detach()}
