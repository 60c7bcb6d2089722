"""Masked image modeling pieces shared by MAE and SimMIM: patchify/unpatchify, random token masks,
the SimMIM block mask, the iBOT/BEiT blockwise mask, and fixed 2-D sin-cos position embeddings.

Every reshape of pixels into patches goes through :func:`patchify` / :func:`unpatchify` so the
patch layout (row-major grid, pixels ``(p q c)`` inside a patch) is defined once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange, repeat
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, N, patch_size**2 * C)`` with patches in row-major grid order."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: Tensor, patch_size: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify` for a square grid: ``(B, N, p*p*C)`` -> ``(B, C, H, W)``."""
    side = math.isqrt(patches.shape[1])
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=side, p=patch_size, q=patch_size,
                     c=channels)


def patch_statistics(patches: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-patch mean and std ``(B, N, 1)`` as MAE computes them (unbiased variance, plus ``eps``)."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + eps).sqrt()


def normalized_patch_targets(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's ``norm_pix_loss`` target: each patch minus its mean, over its std."""
    mean, std = patch_statistics(patches, eps)
    return (patches - mean) / std


def check_mask_ratio(mask_ratio: float) -> None:
    """Reject a ``mask_ratio`` outside the open interval (0, 1)."""
    if not 0 < mask_ratio < 1:
        raise ValueError(f"model.mask_ratio={mask_ratio} must be strictly between 0 and 1 (e.g. 0.75 for MAE, "
                         f"0.6 for SimMIM)")


@dataclass
class TokenMask:
    """A per-sample random split of ``N`` tokens into kept and masked ones.

    ``keep`` ``(B, K)`` are the kept token indices; ``restore`` ``(B, N)`` puts the concatenation
    ``[kept, masked]`` back into grid order; ``mask`` ``(B, N)`` is 1 where a token is masked.
    """

    keep: Tensor
    restore: Tensor
    mask: Tensor


def random_token_mask(batch_size: int, num_tokens: int, mask_ratio: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> TokenMask:
    """MAE masking: argsort of uniform noise, so every sample keeps exactly ``int(N * (1 - ratio))``
    tokens (as in the paper's code) at its own random positions."""
    check_mask_ratio(mask_ratio)
    num_keep = int(num_tokens * (1 - mask_ratio))
    if num_keep < 1:
        raise ValueError(f"model.mask_ratio={mask_ratio} leaves no visible token out of {num_tokens}; lower it")
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch_size, num_tokens, device=device)
    mask[:, :num_keep] = 0
    return TokenMask(keep=shuffle[:, :num_keep], restore=restore, mask=mask.gather(1, restore))


def block_mask(batch_size: int, grid_size: int, mask_ratio: float, scale: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> Tensor:
    """SimMIM masking: ``ceil(ratio * grid_size**2)`` random cells of a coarse ``grid_size`` grid
    per sample, each upsampled to a ``scale x scale`` block of the encoder's patch grid.

    Returns ``(B, grid_size * scale, grid_size * scale)`` with 1 at masked patches.
    """
    check_mask_ratio(mask_ratio)
    num_cells = grid_size * grid_size
    num_masked = math.ceil(mask_ratio * num_cells)
    order = torch.rand(batch_size, num_cells, device=device, generator=generator).argsort(dim=1)
    coarse = (order.argsort(dim=1) < num_masked).float()  # rank of each cell below the count -> masked
    coarse = rearrange(coarse, "b (h w) -> b h w", h=grid_size)
    return repeat(coarse, "b h w -> b (h s) (w t)", s=scale, t=scale)


def blockwise_mask(batch_size: int, grid: tuple[int, int], ratio: tuple[float, float] = (0.1, 0.5),
                   probability: float = 1.0, min_block: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3),
                   attempts: int | None = None, device: torch.device | str = "cpu") -> Tensor:
    """BEiT's blockwise masking, as iBOT and DINOv2 mask global crops, batched on the device (no host sync).

    Each image (with probability ``probability``, else none) gets a target of ``round(r * H * W)`` masked
    patches, ``r`` uniform in ``ratio``. Rectangles are then drawn in turn, each of area between ``min_block``
    and what the target has left, with an aspect ratio log-uniform in ``aspect``, at a uniform position; one
    is kept when it masks at least one new patch and no more than are left. ``attempts`` draws in all
    (default ``max(16, H * W / 8)``: a target is met within a few dozen draws), so a target is met or nearly
    met, never exceeded. Each draw is a few small kernels over the batch.

    Returns ``(B, H, W)``, 1 at masked patches. The random numbers come from ``torch.rand`` with the batch as
    the first dimension.
    """
    if not 0 <= ratio[0] <= ratio[1] < 1:
        raise ValueError(f"model.mask_ratio={list(ratio)} must be a range [low, high] with 0 <= low <= high < 1")
    if not 0 <= probability <= 1:
        raise ValueError(f"model.mask_probability={probability} must be in [0, 1]")
    h, w = grid
    attempts = attempts or max(16, h * w // 8)
    u = torch.rand(batch_size, 2, device=device)
    masked_images = u[:, 0] < probability
    target = torch.round((ratio[0] + (ratio[1] - ratio[0]) * u[:, 1]) * h * w) * masked_images
    mask = torch.zeros(batch_size, h, w, dtype=torch.bool, device=device)
    count = torch.zeros(batch_size, device=device)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    log_aspect = torch.tensor(aspect, device=device).log()
    for draw in torch.rand(batch_size, attempts, 4, device=device).unbind(1):
        left = target - count
        area = (min_block + draw[:, 0] * (left - min_block)).clamp_min(1)
        r = (log_aspect[0] + draw[:, 1] * (log_aspect[1] - log_aspect[0])).exp()
        bh = (area * r).sqrt().round().clamp(1, h)
        bw = (area / r).sqrt().round().clamp(1, w)
        top = (draw[:, 2] * (h - bh + 1)).floor().view(-1, 1, 1)
        start = (draw[:, 3] * (w - bw + 1)).floor().view(-1, 1, 1)
        block = ((rows >= top) & (rows < top + bh.view(-1, 1, 1)) &
                 (cols >= start) & (cols < start + bw.view(-1, 1, 1)))
        new = (block & ~mask).flatten(1).sum(1)
        accept = (new > 0) & (new <= left)
        mask |= block & accept.view(-1, 1, 1)
        count = count + new * accept
    return mask.float()


def sincos_position_embedding(dim: int, grid_size: int, num_prefix_tokens: int = 0) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings ``(prefix + grid_size**2, dim)`` as in MAE.

    Half the channels encode the row, half the column, each as ``[sin, cos]`` of the position
    times ``1 / 10000**(2i / (dim / 2))``. Prefix (cls) tokens get zeros.
    """
    if dim % 4:
        raise ValueError(f"dim={dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    frequencies = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")

    def encode(positions: np.ndarray) -> np.ndarray:
        angles = np.outer(positions.reshape(-1), frequencies)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    table = np.concatenate([np.zeros((num_prefix_tokens, dim)), table], axis=0)
    return torch.from_numpy(table).float()
