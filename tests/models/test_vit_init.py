"""The MAE set-up of the encoder: sin-cos positions against NumPy, the MAE init by statistics, fixed positions
under an optimizer, unchanged state-dict keys, an exact timm export, and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from selfsup.export import save_encoder
from selfsup.methods.mae import MAE
from selfsup.models.encoder import Encoder
from selfsup.optim import create_optimizer


def vit(embed_dim: int = 32, in_chans: int = 3, depth: int = 1, **options) -> Encoder:
    return Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, in_chans=in_chans,
                   model_kwargs={"depth": depth, "embed_dim": embed_dim, "num_heads": 2}, **options)


def sincos_reference(dim: int, grid: int) -> np.ndarray:
    """MAE's table written out per token: channel c < dim/2 encodes the column, the rest the row; within a
    half, the first quarter is sin(position * w_i), the second cos, with w_i = 10000 ** (-i / (dim / 4))."""
    quarter = dim // 4
    rows = []
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        values = []
        for position in (col, row):
            angles = position * 10000.0 ** (-np.arange(quarter) / quarter)
            values += [np.sin(angles), np.cos(angles)]
        rows.append(np.concatenate(values))
    return np.stack(rows)


def test_sincos_pos_embed_is_the_mae_table_with_a_zero_cls_row_and_no_gradient():
    encoder = vit(embed_dim=32, pos_embed="sincos")
    pos_embed = encoder.model.pos_embed
    assert pos_embed.shape == (1, 1 + 16, 32) and not pos_embed.requires_grad
    assert torch.equal(pos_embed[0, 0], torch.zeros(32))
    np.testing.assert_allclose(pos_embed[0, 1:].numpy(), sincos_reference(32, 4), atol=1e-6)
    assert vit().model.pos_embed.requires_grad  # the default stays timm's learned table


def xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_mae_init_every_linear_is_xavier_uniform_with_zero_bias_and_layernorm_is_identity():
    torch.manual_seed(0)
    model = vit(embed_dim=64, depth=2, weight_init="mae").model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4  # qkv, proj, fc1, fc2 per block
    for linear in linears:
        bound = xavier_bound(linear.in_features, linear.out_features)
        weight = linear.weight.detach()
        assert weight.abs().max() <= bound and weight.abs().max() > 0.97 * bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform(-b, b)
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_mae_init_patch_embedding_is_xavier_on_the_flattened_weight_and_tokens_have_std_002():
    torch.manual_seed(0)
    model = vit(embed_dim=192, in_chans=3, weight_init="mae").model
    weight = model.patch_embed.proj.weight.detach()  # (192, 3, 4, 4): fan_in 48, fan_out 192 as a linear map
    bound = xavier_bound(3 * 4 * 4, 192)
    assert weight.abs().max() <= bound and weight.abs().max() > 0.97 * bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    # timm's default conv init (kaiming-uniform, bound 1/sqrt(fan_in)) is about 10% narrower: the test can tell
    torch.manual_seed(0)
    default = vit(embed_dim=192, in_chans=3).model.patch_embed.proj.weight.detach()
    assert default.std().item() < 0.93 * bound / math.sqrt(3)
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.2)


def test_fixed_positions_do_not_change_under_an_optimizer_step():
    torch.manual_seed(0)
    method = MAE(vit(pos_embed="sincos", weight_init="mae"), decoder_width=32, decoder_depth=1, decoder_heads=2)
    before = method.encoder.model.pos_embed.detach().clone()
    qkv = method.encoder.model.blocks[0].attn.qkv.weight.detach().clone()
    for optimizer in (create_optimizer(method, "adamw", lr=1e-2, weight_decay=0.5),
                      torch.optim.AdamW(method.parameters(), lr=1e-2, weight_decay=0.5)):  # all parameters
        images = torch.randn(4, 3, 16, 16)
        predictions, _ = method.predict(images)
        ((predictions - method.pixel_targets(images)) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(method.encoder.model.pos_embed, before)
    assert not torch.equal(method.encoder.model.blocks[0].attn.qkv.weight, qkv)  # the rest trains


def test_state_dict_keys_and_shapes_are_unchanged_by_the_options():
    plain = {k: v.shape for k, v in vit().state_dict().items()}
    mae = {k: v.shape for k, v in vit(pos_embed="sincos", weight_init="mae").state_dict().items()}
    assert mae == plain
    # a learned-position checkpoint loads into the fixed-position encoder and vice versa
    vit(pos_embed="sincos").load_state_dict(vit().state_dict())
    vit().load_state_dict(vit(pos_embed="sincos", weight_init="mae").state_dict())


def test_export_to_timm_gives_identical_features(tmp_path):
    torch.manual_seed(0)
    encoder = vit(pos_embed="sincos", weight_init="mae", depth=2).eval()
    config = save_encoder(encoder, tmp_path, preprocessing=None)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=16, patch_size=4,
                              depth=2, embed_dim=32, num_heads=2,
                              pretrained_cfg_overlay=dict(file=str(config / "model.safetensors"))).eval()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(images), encoder(images))


@pytest.mark.parametrize("options, message", [
    (dict(pos_embed="fixed"), r"pos_embed='fixed' must be one of \('learned', 'sincos'\)"),
    (dict(weight_init="xavier"), r"weight_init='xavier' must be one of \('timm', 'mae'\)"),
])
def test_unknown_option_names_the_value_and_the_choices(options, message):
    with pytest.raises(ValueError, match=message):
        vit(**options)


def test_options_on_a_cnn_are_an_error_naming_the_fix():
    with pytest.raises(ValueError, match=r"pos_embed='sincos'.*'resnet18'.*'learned'"):
        Encoder("resnet18", pos_embed="sincos")
    with pytest.raises(ValueError, match=r"absolute position embedding.*pos_embed='learned'"):
        Encoder("swin_tiny_patch4_window7_224", image_size=32, pos_embed="sincos",
                model_kwargs={"depths": (1, 1), "num_heads": (1, 1), "embed_dim": 8, "window_size": 4})
