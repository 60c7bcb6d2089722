"""MAE: loss only on masked patches, norm-pix targets, visible-only encoding, bad input, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.data.datamodule import Batch
from selfsup.methods.mae import MAE, masked_mse
from selfsup.models.encoder import Encoder


def tiny_vit(image_size: int = 16, patch_size: int = 4, in_chans: int = 3, depth: int = 1) -> Encoder:
    return Encoder("vit_tiny_patch16_224", image_size=image_size, patch_size=patch_size, in_chans=in_chans,
                   model_kwargs={"depth": depth, "embed_dim": 32, "num_heads": 2})


def tiny_mae(**kwargs) -> MAE:
    encoder = kwargs.pop("encoder", None) or tiny_vit()
    return MAE(encoder, decoder_width=32, decoder_depth=1, decoder_heads=2, warmup_epochs=0.0, **kwargs)


def batch_of(images: torch.Tensor) -> Batch:
    return Batch(views=[images], labels=torch.zeros(len(images), dtype=torch.long), index=torch.arange(len(images)))


def test_masked_mse_matches_numpy_and_ignores_visible_patches():
    predictions, targets = torch.randn(4, 9, 6), torch.randn(4, 9, 6)
    mask = (torch.rand(4, 9) < 0.5).float()
    mask[:, 0] = 1
    p, t, m = predictions.numpy(), targets.numpy(), mask.numpy()
    reference = sum(((p[b, n] - t[b, n]) ** 2).mean() for b in range(4) for n in range(9) if m[b, n]) / m.sum()
    loss = masked_mse(predictions, targets, mask)
    assert loss.item() == pytest.approx(reference, rel=1e-5)

    changed = predictions.clone()
    changed[mask == 0] = 100.0  # wild predictions where nothing was masked
    assert masked_mse(changed, targets, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[mask == 1] += 1.0
    assert masked_mse(changed, targets, mask).item() > loss.item() + 0.5


def test_model_loss_has_no_gradient_at_visible_predictions():
    method = tiny_mae()
    images = torch.randn(2, 3, 16, 16)
    predictions, mask = method.predict(images)
    predictions.retain_grad()
    masked_mse(predictions, method.pixel_targets(images), mask.mask).backward()
    per_patch = predictions.grad.abs().sum(-1)
    assert (per_patch[mask.mask == 0] == 0).all()
    assert (per_patch[mask.mask == 1] > 0).all()


def test_norm_pix_targets_match_independent_reference():
    method = tiny_mae(encoder=tiny_vit(in_chans=3))
    images = torch.randn(2, 1, 16, 16, dtype=torch.float32)  # grey input is repeated to 3 channels
    targets = method.pixel_targets(images).numpy()
    raw = tiny_mae(norm_pix_loss=False).pixel_targets(images).numpy()
    array = np.repeat(images.numpy().astype(np.float64), 3, axis=1)
    for b in range(2):
        for index in range(16):
            i, j = divmod(index, 4)
            patch = array[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].transpose(1, 2, 0).reshape(-1)
            expected = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
            np.testing.assert_allclose(targets[b, index], expected, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(raw[b, index], patch, rtol=1e-6)


def test_encoder_blocks_see_only_visible_tokens_and_cls():
    method = tiny_mae(mask_ratio=0.75)
    seen = []
    method.encoder.model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    method.training_loss(batch_of(torch.randn(3, 3, 16, 16)))
    assert seen == [torch.Size([3, 1 + 4, 32])]  # 16 patches, 25% visible, plus the cls token


def test_forward_backward_reaches_encoder_and_decoder():
    method = tiny_mae()
    terms = method.training_loss(batch_of(torch.randn(4, 3, 16, 16)))
    assert set(terms) == {"loss"} and terms["loss"].ndim == 0
    terms["loss"].backward()
    for name in ("encoder.model.patch_embed.proj.weight", "encoder.model.cls_token", "decoder.mask_token",
                 "decoder.predict.weight"):
        grad = dict(method.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_reconstruct_keeps_visible_pixels():
    method = tiny_mae(encoder=tiny_vit(in_chans=1))
    images = torch.randn(2, 1, 16, 16)
    masked, reconstruction = method.reconstruct(images, generator=torch.Generator().manual_seed(0))
    assert masked.shape == reconstruction.shape == images.shape
    visible = masked != 0
    assert visible.float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.allclose(reconstruction[visible], images[visible])


def test_non_vit_backbone_is_an_error_naming_what_works():
    with pytest.raises(ValueError, match=r"VisionTransformer.*vit_\*.*resnet18"):
        MAE(Encoder("resnet18"))
    with pytest.raises(ValueError, match=r"VisionTransformer"):
        MAE(Encoder("swin_tiny_patch4_window7_224", image_size=32,
                    model_kwargs={"depths": (1, 1), "num_heads": (1, 1), "embed_dim": 8, "window_size": 4}))


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.2])
def test_mask_ratio_outside_open_interval_is_an_error(ratio):
    with pytest.raises(ValueError, match="model.mask_ratio"):
        tiny_mae(mask_ratio=ratio)


def test_image_size_not_divisible_by_patch_size_names_values():
    with pytest.raises(ValueError, match=r"image_size=30 is not divisible by patch_size=4.*28 or 32"):
        tiny_vit(image_size=30)


def test_non_finite_predictions_give_a_non_finite_loss_for_the_guard():
    """No host read in the step: a NaN reaches the loss, which the non-finite guard then skips."""
    method = tiny_mae()
    with torch.no_grad():
        method.decoder.predict.bias.fill_(float("nan"))
    assert not torch.isfinite(method.training_loss(batch_of(torch.randn(2, 3, 16, 16)))["loss"])


def test_online_probe_batch_norm_option_is_scale_invariant():
    from types import SimpleNamespace

    from selfsup.eval.callbacks import OnlineLinearProbe

    module = SimpleNamespace(encoder=SimpleNamespace(embed_dim=6), device=torch.device("cpu"),
                             log_dict=lambda *a, **k: None)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(num_classes=3, has_labels=True))
    probe = OnlineLinearProbe(batch_norm=True)
    probe.setup(trainer, module, "fit")
    norm = probe.head[0]
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine
    features, labels = torch.randn(32, 6), torch.randint(0, 3, (32,))
    probe.head.train()
    scaled = probe.head(features * torch.tensor([100.0, 0.5, 5.0, 1.0, 20.0, 2.0]) + 7.0)
    assert torch.allclose(scaled, probe.head(features), atol=1e-4)
    probe.on_train_batch_end(trainer, module, {"features": features}, batch_of_labels(labels), 0)
    assert norm.num_batches_tracked.item() >= 1


def batch_of_labels(labels: torch.Tensor) -> Batch:
    return Batch(views=[], labels=labels, index=torch.arange(len(labels)))


@pytest.mark.parametrize("recipe", ["demo", "cifar10", "imagenet"])
def test_recipes_parse(recipe, capsys):
    from selfsup.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", f"recipes/{recipe}/mae.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "selfsup.methods.mae.MAE" in capsys.readouterr().out


@pytest.mark.slow
def test_short_run_on_embedded_data_lowers_reconstruction_loss():
    from tests.methods.mim_training import held_out_loss_drop

    torch.manual_seed(0)
    method = MAE(tiny_vit(image_size=16, in_chans=1, depth=2), decoder_width=32, decoder_depth=1,
                 decoder_heads=2, norm_pix_loss=False)
    before, after = held_out_loss_drop(method, steps=60)
    assert after < 0.75 * before, (before, after)


def test_dynamic_img_size_vit_works_too():
    encoder = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, dynamic_img_size=True,
                      model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    method = tiny_mae(encoder=encoder)
    loss = method.training_loss(batch_of(torch.randn(2, 3, 16, 16)))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert method.encoder.model.pos_embed.grad.abs().sum() > 0


def test_no_weight_decay_names_include_the_mask_token_and_the_encoder_tokens():
    from selfsup.optim import no_weight_decay_names, param_groups

    method = tiny_mae()
    names = no_weight_decay_names(method)
    assert {"decoder.mask_token", "encoder.model.cls_token", "encoder.model.pos_embed"} <= names
    assert "decoder.embed.weight" not in names and "encoder.model.blocks.0.attn.qkv.weight" not in names
    undecayed = {id(p) for g in param_groups(method, 0.05) if g["weight_decay"] == 0 for p in g["params"]}
    assert id(method.decoder.mask_token) in undecayed


@pytest.mark.parametrize("method", ["mae", "simmim"])
@pytest.mark.parametrize("recipe", ["demo", "cifar10", "imagenet"])
def test_mim_recipes_train_as_the_mae_paper(method, recipe):
    import yaml

    config = yaml.safe_load(open(f"recipes/{recipe}/{method}.yaml"))
    encoder = config["model"]["init_args"]["encoder"]["init_args"]
    assert (encoder["pos_embed"], encoder["weight_init"]) == ("sincos", "mae")
    assert config["data"]["interpolation"] == "bicubic"
