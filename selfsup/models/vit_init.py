"""The MAE paper's ViT set-up: fixed 2-D sin-cos positions and MAE's weight initialisation.

Reference: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, and its official
``models_mae.py`` (``initialize_weights``): the position embedding is a fixed 2-D sin-cos table (zeros for
the cls token), every ``nn.Linear`` is Xavier-uniform with a zero bias, every LayerNorm has weight 1 and
bias 0, the patch embedding's convolution is initialised like the linear layer it is (Xavier-uniform on the
weight viewed as ``(out, in * k * k)``), and the cls and mask tokens are ``normal(std=0.02)``.

timm's default instead draws linear weights and positions from ``trunc_normal(std=0.02)`` and trains the
positions; the MAE and SimMIM encoders here use the MAE set-up (``Encoder(pos_embed="sincos",
weight_init="mae")``) in their recipes. The parameters keep their names (``pos_embed`` stays a parameter,
with ``requires_grad=False``), so checkpoints, ``init_from`` and the timm export are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from selfsup.models.masking import sincos_position_embedding

POS_EMBEDS = ("learned", "sincos")
WEIGHT_INITS = ("timm", "mae")
TOKEN_STD = 0.02  # MAE: cls and mask tokens ~ normal(0, 0.02)


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE's per-module rule (use with ``model.apply``): Xavier-uniform linear weights, zero biases, and
    LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def mae_init_(model: nn.Module) -> None:
    """Initialise a timm patch-embedding backbone (ViT, Swin) in place as MAE does.

    The patch convolution gets Xavier-uniform on its ``(out, in * k * k)`` view: ``nn.init`` on the 4-D
    weight would count ``k * k`` into the fan-out as well and draw a smaller range."""
    model.apply(init_linear_and_norm)
    weight = model.patch_embed.proj.weight
    with torch.no_grad():
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    for name in ("cls_token", "reg_token", "dist_token"):
        token = getattr(model, name, None)
        if isinstance(token, nn.Parameter):
            nn.init.normal_(token, std=TOKEN_STD)


def fix_sincos_positions_(model: nn.Module) -> None:
    """Replace a timm ViT's learned ``pos_embed`` values by the fixed 2-D sin-cos table and stop its
    gradient (MAE's ``requires_grad=False``); prefix tokens that carry a position get zeros."""
    pos_embed = getattr(model, "pos_embed", None)
    if not isinstance(pos_embed, nn.Parameter):
        raise ValueError(f"pos_embed='sincos' needs a timm ViT with an absolute position embedding, not "
                         f"{type(model).__name__}; use pos_embed='learned'")
    grid = model.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise ValueError(f"pos_embed='sincos' needs a square patch grid, got {tuple(grid)}; use a square image_size")
    prefix = pos_embed.shape[1] - grid[0] * grid[1]
    table = sincos_position_embedding(pos_embed.shape[-1], grid[0], num_prefix_tokens=prefix)
    with torch.no_grad():
        pos_embed.copy_(table[None])
    pos_embed.requires_grad_(False)


def check_vit_options(pos_embed: str, weight_init: str) -> None:
    """Reject an unknown ``pos_embed`` or ``weight_init`` name, listing the known ones."""
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed={pos_embed!r} must be one of {POS_EMBEDS} ('sincos': MAE's fixed table)")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init={weight_init!r} must be one of {WEIGHT_INITS} ('mae': MAE's Xavier init)")
