"""init_from with a timm model's weights file (saved here from a local timm model, nothing downloaded), and
the head warm-up that keeps the pretrained encoder still while fresh heads adapt."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from selfsup.checkpoint import CheckpointError, init_encoder_from, is_timm_weights
from selfsup.models.encoder import Encoder
from selfsup.run import InitFrom

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def _timm_vit(tmp_path, suffix: str):
    """A 3-channel, 32 px, patch-8 timm ViT with a 10-class head, its weights saved as timm saves them."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, **TINY)
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    return model, path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_reach_a_grayscale_encoder_on_another_grid(tmp_path, suffix):
    model, path = _timm_vit(tmp_path, suffix)
    assert is_timm_weights(path)
    encoder = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=8, in_chans=1, model_kwargs=TINY)
    init_encoder_from(encoder, path)
    source, target = model.state_dict(), encoder.model.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "norm.weight", "cls_token"):
        assert torch.equal(target[key], source[key]), key
    # one input channel: timm sums the RGB filters
    torch.testing.assert_close(target["patch_embed.proj.weight"], source["patch_embed.proj.weight"].sum(1, keepdim=True))
    # a 2 x 2 grid instead of 4 x 4: the patch positions resampled (bicubic), the class position kept
    assert target["pos_embed"].shape == (1, 1 + 4, 32)
    torch.testing.assert_close(target["pos_embed"][:, 0], source["pos_embed"][:, 0])
    grid = source["pos_embed"][0, 1:].reshape(4, 4, 32).permute(2, 0, 1)[None]
    means = torch.nn.functional.avg_pool2d(grid, 2)[0].permute(1, 2, 0).reshape(4, 32)
    assert (target["pos_embed"][0, 1:] - means).norm() < 0.5 * (source["pos_embed"][0, 1:5] - means).norm() + 1e-6
    assert "head.weight" not in target and encoder(torch.randn(2, 1, 16, 16)).shape == (2, 32)


def test_timm_weights_of_another_architecture_are_named(tmp_path):
    _, path = _timm_vit(tmp_path, ".safetensors")
    encoder = Encoder("resnet18")
    with pytest.raises(CheckpointError, match="resnet18"):
        init_encoder_from(encoder, path)


def test_head_warm_up_keeps_the_pretrained_encoder_still(tmp_path):
    """DINOv2 from timm weights with a 2-step head warm-up: after 2 steps the student's and the teacher's
    encoders are still the timm weights and the heads have moved; after 4 the encoder has moved too."""
    from lightning.pytorch.callbacks import Callback

    from tests.helpers.methods import tiny_fit

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=10,
                              depth=1, embed_dim=32, num_heads=2)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    expected = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("head.")}

    class Record(Callback):
        states: dict = {}

        def on_train_batch_end(self, trainer, module, *args):
            self.states[trainer.global_step] = {k: v.clone() for k, v in module.state_dict().items()}

    record = Record()
    tiny_fit("dinov2", tmp_path / "run", 4,
             callbacks=[InitFrom(str(path), freeze_encoder_steps=2), record])
    for step, still in ((1, True), (2, True), (4, False)):
        state = record.states[step]
        same = all(torch.equal(state[f"encoder.{k}"], v) for k, v in expected.items())
        assert same is still, step
        assert all(torch.equal(state[f"teacher.copies.0.{k}"], v) for k, v in expected.items()) or not still
    assert not torch.equal(record.states[2]["head.mlp.0.weight"], record.states[1]["head.mlp.0.weight"])
    with pytest.raises(ValueError, match="freeze_encoder_steps"):
        InitFrom(str(path), freeze_encoder_steps=-1)


def test_domain_recipe_runs_from_timm_weights_on_grayscale_files(tmp_path):
    """recipes/domain/dinov2_grayscale_from_timm.yaml, shrunk (1 block, 56 px, CPU): grayscale PNGs in a
    folder, timm weights of the recipe's architecture saved locally (518 px positions, resampled to the
    recipe's 224 px grid); a head warm-up step, then one that trains the encoder."""
    import numpy as np
    from PIL import Image

    from selfsup.cli import main

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L").save(root / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", depth=1)   # 518 px, 37 x 37 positions, as released
    weights = tmp_path / "vits14.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    main(["fit", "--config", "recipes/domain/dinov2_grayscale_from_timm.yaml", "--trainer.accelerator", "cpu",
          "--trainer.precision", "32", "--trainer.max_steps", "2", "--trainer.callbacks", "[]",
          "--trainer.default_root_dir", str(tmp_path / "run"), "--init_from.path", str(weights),
          "--init_from.freeze_encoder_steps", "1", "--data.root", str(root), "--data.batch_size", "4",
          "--data.num_workers", "0", "--data.image_size", "56",
          "--model.init_args.encoder.init_args.model_kwargs", '{"depth": 1}',
          "--model.init_args.out_dim", "64", "--model.init_args.patch_out_dim", "64",
          "--model.init_args.hidden_dim", "32", "--model.init_args.bottleneck_dim", "16",
          "--data.views.init_args.global_crops", '{"count": 2, "size": 56, "scale": [0.32, 1.0]}',
          "--data.views.init_args.local_crops", '{"count": 2, "size": 28, "scale": [0.05, 0.32]}'])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    source = model.state_dict()
    assert state["encoder.model.pos_embed"].shape == (1, 1 + 16 * 16, 384)   # 37 x 37 resampled to 224 px
    moved = [k for k in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
             if not torch.equal(state[f"encoder.model.{k}"], source[k])]
    assert moved, "after the warm-up step the encoder trains"
