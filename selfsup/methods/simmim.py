"""SimMIM: replace masked patch embeddings by a learned token, predict their raw pixels with a linear head.

Reference: Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022.
Paper defaults (ImageNet, 192-224 px): random masking of 32x32 blocks at ratio 0.6, upsampled to
the encoder's patch grid; a learnable mask token replaces masked patch embeddings; a one-layer
linear head predicts pixels at the encoder stride (pixel shuffle); L1 loss on masked pixels only;
AdamW (0.9, 0.999), weight decay 0.05, lr scaled per 512 images, gradient clipping 5.0,
10 warmup epochs, RandomResizedCrop(0.67, 1) + flip. Works for ViT and Swin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from selfsup.data.datamodule import Batch
from selfsup.methods.base import SSLMethod
from selfsup.methods.common import full_precision
from selfsup.models.decoders import PixelShuffleHead
from selfsup.models.encoder import Encoder
from selfsup.models.masking import block_mask, check_mask_ratio


def masked_l1(predictions: Tensor, targets: Tensor, pixel_mask: Tensor) -> Tensor:
    """Mean absolute error over masked pixels: ``sum(|p - t| * mask) / (masked pixels * channels)``.

    ``predictions``/``targets`` are ``(B, C, H, W)``, ``pixel_mask`` ``(B, 1, H, W)`` with 1 where masked.
    Computed in float32, as the paper's ``loss / (mask.sum() + 1e-5) / in_chans``.
    """
    with full_precision(predictions.device.type):
        error = F.l1_loss(predictions.float(), targets.float(), reduction="none")
        return (error * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / predictions.shape[1]


def default_mask_patch_size(image_size: int) -> int:
    """The paper's 32 px blocks at ImageNet sizes; a quarter of the image side below 128 px (8 at 32 px)."""
    return 32 if image_size >= 128 else max(1, image_size // 4)


def check_mask_patch_size(mask_patch_size: int, image_size: int, patch_size: int) -> None:
    """The mask block must tile the image and be a whole number of encoder patches."""
    if mask_patch_size % patch_size or image_size % mask_patch_size:
        valid = [s for s in range(patch_size, image_size + 1, patch_size) if image_size % s == 0]
        raise ValueError(f"model.mask_patch_size={mask_patch_size} must divide image_size={image_size} and be a "
                         f"multiple of the encoder patch_size={patch_size}; valid values: {valid}")


class SimMIM(SSLMethod):
    """SimMIM: ``patches (masked -> mask token) -> encoder -> linear pixel head``, L1 on masked pixels.

    Args:
        encoder: a timm ViT (``vit_*``, ``deit_*``) or Swin (``swin_*``) with a fixed image size.
        mask_ratio: fraction of mask blocks hidden, in (0, 1); the count is ``ceil(ratio * blocks)``.
        mask_patch_size: side of one mask block in pixels; ``None`` picks 32, or a quarter of the
            image side for images under 128 px.
        lr_batch_denominator: SimMIM scales the learning rate per 512 images.
        **base: optimizer and schedule settings of :class:`SSLMethod`.
    """

    encodes_views = False

    def __init__(self, encoder: Encoder, mask_ratio: float = 0.6, mask_patch_size: int | None = None,
                 lr_batch_denominator: int = 512, **base):
        super().__init__(encoder, lr_batch_denominator=lr_batch_denominator, **base)
        if not encoder.is_vit:
            raise ValueError(f"SimMIM needs a patch-embedding backbone (timm vit_*, deit_*, swin_*), not "
                             f"{encoder.config['name']!r}")
        check_mask_ratio(mask_ratio)
        grid = encoder.model.patch_embed.grid_size
        if grid[0] != grid[1]:
            raise ValueError(f"SimMIM needs a square patch grid, got {grid}; use a square encoder.image_size")
        self.patch_size, self.channels = encoder.patch_size, encoder.in_chans
        self.image_size = grid[0] * self.patch_size
        self.mask_patch_size = mask_patch_size or default_mask_patch_size(self.image_size)
        check_mask_patch_size(self.mask_patch_size, self.image_size, self.patch_size)
        self.mask_ratio = mask_ratio
        patch_dim = encoder.model.patch_embed.proj.out_channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, patch_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = PixelShuffleHead(encoder.embed_dim, encoder.stride, self.channels)

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay beyond the 1-D ones: the mask token, a learned input that
        replaces patch embeddings, not a weight to shrink. The encoder's tokens are listed by timm."""
        return {"mask_token"}

    def sample_mask(self, batch_size: int, device: torch.device,
                    generator: torch.Generator | None = None) -> Tensor:
        """Random block mask on the encoder's patch grid ``(B, grid, grid)``, 1 where masked."""
        scale = self.mask_patch_size // self.patch_size
        return block_mask(batch_size, self.image_size // self.mask_patch_size, self.mask_ratio, scale, device,
                          generator)

    def predict(self, images: Tensor, patch_mask: Tensor) -> Tensor:
        """Pixels ``(B, C, H, W)`` predicted from the image with masked patch embeddings replaced."""
        tokens = self.encoder.encode_masked(images, patch_mask, self.mask_token)[:, self.encoder.num_prefix_tokens:]
        side = self.image_size // self.encoder.stride
        return self.head(rearrange(tokens, "b (h w) d -> b d h w", h=side, w=side))

    def pixel_mask(self, patch_mask: Tensor) -> Tensor:
        """Patch-grid mask ``(B, g, g)`` -> pixel mask ``(B, 1, H, W)``."""
        return repeat(patch_mask, "b h w -> b 1 (h p) (w q)", p=self.patch_size, q=self.patch_size)

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        images = batch.views[0]
        patch_mask = self.sample_mask(len(images), images.device)
        predictions = self.predict(images, patch_mask)
        targets = self.encoder.match_channels(images)
        loss = masked_l1(predictions, targets, self.pixel_mask(patch_mask))
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Masked input and reconstruction (visible pixels pasted back), both ``(B, C, H, W)`` in the
        input's normalised pixel space; used by :class:`~selfsup.eval.reconstruction.ReconstructionImages`."""
        patch_mask = self.sample_mask(len(images), images.device, generator)
        pixel_mask = self.pixel_mask(patch_mask)
        images = self.encoder.match_channels(images).float()
        predictions = self.predict(images, patch_mask).float()
        return images * (1 - pixel_mask), predictions * pixel_mask + images * (1 - pixel_mask)

