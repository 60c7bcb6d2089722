"""MAE: mask most patches, encode only the visible ones, reconstruct the masked pixels.

Reference: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
Paper defaults (ImageNet, ViT-B/16): mask ratio 0.75 by per-sample random shuffling; decoder
512 wide, 8 deep, 16 heads with fixed 2-D sin-cos positions; MSE on masked patches only with
per-patch normalised targets (norm_pix_loss); AdamW (0.9, 0.95), base lr 1.5e-4 per 256 images,
weight decay 0.05, batch 4096, 40 warmup epochs, 800-1600 epochs, RandomResizedCrop(0.2, 1) + flip.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.methods.base import SSLMethod
from selfsup.methods.common import full_precision
from selfsup.models.decoders import MAEDecoder
from selfsup.models.encoder import Encoder
from selfsup.models.masking import (TokenMask, check_mask_ratio, normalized_patch_targets, patch_statistics,
                                    patchify, random_token_mask, unpatchify)


def masked_mse(predictions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per patch, averaged over masked patches only (``mask`` is 1 there).

    ``predictions`` and ``targets`` are ``(B, N, P)``; ``mask`` is ``(B, N)``. Computed in float32.
    """
    with full_precision(predictions.device.type):
        per_patch = (predictions.float() - targets.float()).square().mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()


def require_vit(encoder: Encoder, method: str) -> None:
    """MAE drops tokens inside the encoder, which only a plain timm VisionTransformer supports."""
    if not isinstance(encoder.model, VisionTransformer):
        raise ValueError(f"{method} needs a timm VisionTransformer encoder (vit_*, deit_*, e.g. "
                         f"vit_small_patch16_224), not {encoder.config['name']!r} "
                         f"({type(encoder.model).__name__}); use SimMIM for Swin or other backbones")
    grid = encoder.model.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise ValueError(f"{method} needs a square patch grid, got {grid}; use a square encoder.image_size")


class MAE(SSLMethod):
    """MAE: ``visible patches -> ViT encoder -> decoder with mask tokens -> pixels``, MSE on masked patches.

    Args:
        encoder: a timm ViT (``vit_*``, ``deit_*``); image and patch size must divide evenly.
        mask_ratio: fraction of patches hidden from the encoder, in (0, 1).
        decoder_width, decoder_depth, decoder_heads: the decoder transformer (paper: 512, 8, 16).
        norm_pix_loss: predict each patch normalised by its own mean and std (paper default).
        **base: optimizer and schedule settings of :class:`SSLMethod`.
    """

    encodes_views = False

    def __init__(self, encoder: Encoder, mask_ratio: float = 0.75, decoder_width: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True, **base):
        super().__init__(encoder, **base)
        require_vit(encoder, "MAE")
        check_mask_ratio(mask_ratio)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_size, self.channels = encoder.patch_size, encoder.in_chans
        self.grid_size = encoder.model.patch_embed.grid_size[0]
        self.decoder = MAEDecoder(encoder.embed_dim, self.grid_size, self.patch_size ** 2 * self.channels,
                                  decoder_width, decoder_depth, decoder_heads,
                                  num_prefix_tokens=encoder.num_prefix_tokens)

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay beyond the 1-D ones: the decoder's mask token, a learned input
        rather than a weight (as mmselfsup's MAE config; the decoder's positions are a fixed buffer). The
        encoder's cls token and positions are listed by timm's own ``no_weight_decay``."""
        return {"decoder.mask_token"}

    def predict(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, TokenMask]:
        """Mask, encode the visible patches, decode: per-patch predictions ``(B, N, P)`` and the mask."""
        patches = self.encoder.embed_patches(images)
        mask = random_token_mask(len(images), patches.shape[1], self.mask_ratio, images.device, generator)
        tokens = self.encoder.encode_patches(patches, keep=mask.keep)
        return self.decoder(tokens, mask.restore), mask

    def pixel_targets(self, images: Tensor) -> Tensor:
        """The patches the decoder predicts ``(B, N, P)``, normalised per patch when ``norm_pix_loss``."""
        with full_precision(images.device.type):
            patches = patchify(self.encoder.match_channels(images).float(), self.patch_size)
            return normalized_patch_targets(patches) if self.norm_pix_loss else patches

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        images = batch.views[0]
        predictions, mask = self.predict(images)
        loss = masked_mse(predictions, self.pixel_targets(images), mask.mask)
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Masked input and reconstruction (visible patches pasted back), both ``(B, C, H, W)`` in the
        input's normalised pixel space; used by :class:`~selfsup.eval.reconstruction.ReconstructionImages`."""
        predictions, mask = self.predict(images, generator)
        patches = patchify(self.encoder.match_channels(images).float(), self.patch_size)
        predictions = predictions.float()
        if self.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            mean, std = patch_statistics(patches)
            predictions = predictions * std + mean
        masked = mask.mask[..., None]
        masked_images = unpatchify(patches * (1 - masked), self.patch_size, self.channels)
        reconstruction = unpatchify(predictions * masked + patches * (1 - masked), self.patch_size, self.channels)
        return masked_images, reconstruction
