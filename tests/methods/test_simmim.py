"""SimMIM: mask ratio and upsampling, masked L1 against NumPy, ViT and Swin forward/backward, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.data.datamodule import Batch
from selfsup.methods.simmim import SimMIM, default_mask_patch_size, masked_l1
from selfsup.models.encoder import Encoder


def tiny_vit(image_size: int = 16, patch_size: int = 4, in_chans: int = 3) -> Encoder:
    return Encoder("vit_tiny_patch16_224", image_size=image_size, patch_size=patch_size, in_chans=in_chans,
                   model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})


def tiny_swin(image_size: int = 32) -> Encoder:
    """A two-block, four-stage Swin at 32 px: 4 px patches, windows of 4, final stride 32."""
    return Encoder("swin_tiny_patch4_window7_224", image_size=image_size,
                   model_kwargs={"depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "embed_dim": 16,
                                 "window_size": 4})


def batch_of(images: torch.Tensor) -> Batch:
    return Batch(views=[images], labels=torch.zeros(len(images), dtype=torch.long), index=torch.arange(len(images)))


def test_default_mask_patch_size_scales_with_the_image():
    assert default_mask_patch_size(224) == 32 and default_mask_patch_size(192) == 32
    assert default_mask_patch_size(32) == 8
    assert SimMIM(tiny_vit(image_size=32)).mask_patch_size == 8


def test_mask_ratio_count_and_upsampling_to_the_patch_grid():
    method = SimMIM(tiny_vit(image_size=32, patch_size=4), mask_ratio=0.6, mask_patch_size=8)
    mask = method.sample_mask(64, torch.device("cpu"))
    assert mask.shape == (64, 8, 8)  # the encoder's 8 x 8 patch grid
    blocks = mask.reshape(64, 4, 2, 4, 2)  # 4 x 4 mask blocks of 2 x 2 patches each
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    assert (blocks[:, :, 0, :, 0].sum((1, 2)) == math.ceil(0.6 * 16)).all()
    pixels = method.pixel_mask(mask)
    assert pixels.shape == (64, 1, 32, 32)
    assert (pixels.mean((1, 2, 3)) == 10 / 16).all()
    assert torch.equal(pixels[:, 0, ::4, ::4], mask)


def test_masked_l1_matches_numpy_and_ignores_visible_pixels():
    predictions, targets = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) < 0.5).float()
    p, t, m = predictions.numpy(), targets.numpy(), mask.numpy()
    reference = (np.abs(p - t) * m).sum() / (m.sum() + 1e-5) / 3
    loss = masked_l1(predictions, targets, mask)
    assert loss.item() == pytest.approx(reference, rel=1e-5)
    changed = torch.where(mask.bool(), predictions, torch.full_like(predictions, 50.0))
    assert masked_l1(changed, targets, mask).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("make_encoder", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_forward_and_backward(make_encoder):
    encoder = make_encoder()
    method = SimMIM(encoder, warmup_epochs=0.0)
    size = 16 if encoder.model.__class__.__name__ == "VisionTransformer" else 32
    images = torch.randn(2, 3, size, size)
    predictions = method.predict(images, method.sample_mask(2, images.device))
    assert predictions.shape == images.shape
    terms = method.training_loss(batch_of(images))
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    for name, parameter in (("mask_token", method.mask_token), ("head", method.head[0].weight),
                            ("patch_embed", encoder.model.patch_embed.proj.weight)):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_swin_stride_and_mask_block_on_its_patch_grid():
    method = SimMIM(tiny_swin())
    assert method.encoder.stride == 32 and method.patch_size == 4 and method.mask_patch_size == 8
    assert method.sample_mask(1, torch.device("cpu")).shape == (1, 8, 8)


def test_mask_token_replaces_masked_patch_embeddings():
    method = SimMIM(tiny_vit())
    seen = []
    method.encoder.model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    mask = torch.zeros(1, 4, 4)
    mask[0, 1, 2] = 1  # patch token 6: pixel rows 4:8, columns 8:12
    images = torch.randn(1, 3, 16, 16)
    other = images.clone()
    other[..., 4:8, 8:12] = torch.randn(1, 3, 4, 4)
    method.predict(images, mask)
    method.predict(other, mask)
    method.predict(other, torch.zeros_like(mask))
    assert torch.equal(seen[0], seen[1])  # pixels under a masked patch never reach the encoder
    assert not torch.allclose(seen[1][0, 1 + 6], seen[2][0, 1 + 6])  # unmasked, they do


def test_reconstruct_keeps_visible_pixels():
    method = SimMIM(tiny_vit(in_chans=1))
    images = torch.randn(2, 1, 16, 16)
    masked, reconstruction = method.reconstruct(images, generator=torch.Generator().manual_seed(0))
    visible = masked != 0
    assert torch.equal(reconstruction[visible], images[visible])
    assert (~visible).float().mean().item() == pytest.approx(math.ceil(0.6 * 16) / 16)  # 4 px blocks on a 16 px image


def test_bad_mask_patch_size_names_values_and_suggests_valid_ones():
    with pytest.raises(ValueError, match=r"mask_patch_size=6 .*image_size=32.*patch_size=4.*\[4, 8, 16, 32\]"):
        SimMIM(tiny_vit(image_size=32), mask_patch_size=6)
    with pytest.raises(ValueError, match="model.mask_ratio"):
        SimMIM(tiny_vit(), mask_ratio=1.0)
    with pytest.raises(ValueError, match=r"vit_\*.*swin_\*.*resnet18"):
        SimMIM(Encoder("resnet18"))


def test_learning_rate_scales_per_512_images():
    assert SimMIM(tiny_vit()).hparams.lr_batch_denominator == 512


@pytest.mark.parametrize("recipe", ["demo", "cifar10", "imagenet"])
def test_recipes_parse(recipe, capsys):
    from selfsup.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", f"recipes/{recipe}/simmim.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "selfsup.methods.simmim.SimMIM" in out and "gradient_clip_val: 5.0" in out


@pytest.mark.slow
def test_short_run_on_embedded_data_lowers_reconstruction_loss():
    from tests.methods.mim_training import held_out_loss_drop

    torch.manual_seed(0)
    encoder = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, in_chans=1,
                      model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    before, after = held_out_loss_drop(SimMIM(encoder, mask_patch_size=4), steps=60)
    assert after < 0.75 * before, (before, after)


def test_no_weight_decay_names_include_the_mask_token():
    from selfsup.optim import no_weight_decay_names, param_groups

    method = SimMIM(tiny_vit())
    names = no_weight_decay_names(method)
    assert {"mask_token", "encoder.model.pos_embed", "encoder.model.cls_token"} <= names
    assert "head.0.weight" not in names
    undecayed = {id(p) for g in param_groups(method, 0.05) if g["weight_decay"] == 0 for p in g["params"]}
    assert id(method.mask_token) in undecayed
