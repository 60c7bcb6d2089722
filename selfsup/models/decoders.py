"""Decoders back to pixels for masked image modeling: MAE's transformer decoder and SimMIM's
one-layer pixel-shuffle head."""

from __future__ import annotations

import torch
from einops import repeat
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from selfsup.models.masking import sincos_position_embedding
from selfsup.models.vit_init import TOKEN_STD, init_linear_and_norm


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: visible encoder tokens plus a shared learnable mask token for every
    masked patch, fixed 2-D sin-cos positions, ``depth`` transformer blocks, then a linear map to
    the ``patch_pixels`` values of each patch.

    Args:
        encoder_dim: width of the encoder tokens.
        grid_size: patches per side of the (square) patch grid.
        patch_pixels: ``patch_size**2 * channels``, the prediction size per patch.
        width, depth, num_heads: decoder transformer size (paper: 512, 8, 16).
        num_prefix_tokens: encoder prefix (cls) tokens passed through the decoder and dropped at the end.
    """

    def __init__(self, encoder_dim: int, grid_size: int, patch_pixels: int, width: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, num_prefix_tokens: int = 1):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"model.decoder_width={width} must be divisible by model.decoder_heads={num_heads}")
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("position", sincos_position_embedding(width, grid_size, num_prefix_tokens)[None],
                             persistent=False)
        self.blocks = nn.Sequential(*(Block(width, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.predict = nn.Linear(width, patch_pixels)
        nn.init.normal_(self.mask_token, std=TOKEN_STD)
        self.apply(init_linear_and_norm)

    def forward(self, tokens: Tensor, restore: Tensor) -> Tensor:
        """``tokens`` ``(B, prefix + K, D)`` from the encoder and ``restore`` ``(B, N)`` from the mask
        -> per-patch pixel predictions ``(B, N, patch_pixels)`` in grid order."""
        x = self.embed(tokens)
        prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        num_masked = restore.shape[1] - visible.shape[1]
        masked = repeat(self.mask_token, "1 1 d -> b n d", b=x.shape[0], n=num_masked).to(x.dtype)
        full = torch.cat([visible, masked], dim=1).gather(1, restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, full], dim=1) + self.position
        x = self.norm(self.blocks(x))
        return self.predict(x[:, self.num_prefix_tokens:])


class PixelShuffleHead(nn.Sequential):
    """SimMIM's prediction head: a 1x1 convolution to ``stride**2 * channels`` values per position,
    rearranged to pixels by pixel shuffle, so a ``(B, D, h, w)`` map becomes ``(B, C, h*s, w*s)``."""

    def __init__(self, in_dim: int, stride: int, channels: int):
        super().__init__(nn.Conv2d(in_dim, stride * stride * channels, kernel_size=1), nn.PixelShuffle(stride))

