"""Export round trip: selfsup.load_encoder and plain timm give exactly the checkpoint encoder's features."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch

from selfsup import load_encoder
from selfsup.cli import main
from selfsup.checkpoint import CheckpointError, encoder_from_checkpoint, load_checkpoint
from selfsup.export import export_encoder
from selfsup.run import InitFrom
from selfsup.methods.simclr import SimCLR
from selfsup.models.encoder import Encoder
from tests.helpers.checkpoints import (IMAGE_SIZE, one_thread, tiny_config, tiny_data, tiny_fit,  # noqa: F401
                                      tiny_method)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_fit(tmp_path_factory.mktemp("export"), steps=2)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    encoder = Encoder("vit_tiny_patch16_224", image_size=IMAGE_SIZE, patch_size=4, pool="avg",
                      dynamic_img_size=True, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    method = SimCLR(encoder, proj_hidden_dim=32, proj_dim=16, warmup_epochs=0.0)
    return tiny_fit(tmp_path_factory.mktemp("export_vit"), method, steps=1)


def images() -> torch.Tensor:
    return torch.randn(4, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def reference_features(ckpt: Path) -> torch.Tensor:
    with torch.no_grad():
        return encoder_from_checkpoint(load_checkpoint(ckpt))(images())


@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_export_round_trip_is_exact_in_selfsup_and_plain_timm(which: str, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    run = request.getfixturevalue("run" if which == "resnet" else "vit_run")
    main(["export", "--ckpt", str(run), "--out", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    expected = reference_features(run)
    with torch.no_grad():
        assert torch.equal(load_encoder(tmp_path)(images()), expected)
        assert torch.equal(load_encoder(tmp_path / "model.safetensors")(images()), expected)
        model = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"))).eval()
        assert torch.equal(model(images().expand(-1, 3, -1, -1)), expected)
        local = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
        assert torch.equal(local(images().expand(-1, 3, -1, -1)), expected)
    cfg = config["pretrained_cfg"]
    assert cfg["mean"] == [pytest.approx(0.286)] * 3 and len(cfg["std"]) == 3  # grayscale stats, 3 channels
    assert cfg["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE] and cfg["num_classes"] == 0
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert config["selfsup"]["plain_timm_loadable"] is True
    assert load_encoder(tmp_path).preprocessing["image_size"] == IMAGE_SIZE


def test_cifar_stem_export_warns_and_only_load_encoder_rebuilds_it(tmp_path: Path) -> None:
    ckpt = tiny_fit(tmp_path / "run", tiny_method(cifar_stem=True), steps=1)
    with pytest.warns(UserWarning, match="cifar_stem=True.*use selfsup.load_encoder"):
        export_encoder(ckpt, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["selfsup"]["plain_timm_loadable"] is False and "cifar_stem" in config["selfsup"]["note"]
    with torch.no_grad():
        assert torch.equal(load_encoder(tmp_path / "out")(images()), reference_features(ckpt))
    with pytest.raises(RuntimeError, match="conv1.weight"):  # plain timm fails loudly, never silently
        timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "out" / "model.safetensors")))


class RecordEncoder(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.clone() for k, v in pl_module.encoder.state_dict().items()}


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_init_from_starts_a_new_run_from_the_weights(run: Path, tmp_path: Path, source: str) -> None:
    path = run if source == "checkpoint" else export_encoder(run, tmp_path / "export")
    expected = load_encoder(path).state_dict()
    record = RecordEncoder()
    method = tiny_method()
    assert not torch.equal(method.encoder.state_dict()["model.conv1.weight"], expected["model.conv1.weight"])
    tiny_fit(tmp_path / "new", method, steps=1, callbacks=[InitFrom(str(path)), record])
    assert all(torch.equal(record.state[k], v) for k, v in expected.items())


def test_init_from_on_the_command_line(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["selfsup"])
    main(["fit", "--config", str(tiny_config(tmp_path)), "--init_from.path", str(run), "--model.base_lr", "1e-12"])
    new = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    expected = load_encoder(run).state_dict()
    weights = [k for k in expected if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert all(torch.allclose(new["state_dict"]["encoder." + k], expected[k], atol=1e-6) for k in weights)


def test_init_from_a_different_architecture_is_named(run: Path, tmp_path: Path) -> None:
    method = tiny_method(cifar_stem=True)
    with pytest.raises(CheckpointError, match=r"(?s)do not fit encoder 'resnet18'.*conv1.weight"):
        tiny_fit(tmp_path, method, steps=1, callbacks=[InitFrom(str(run))])


def test_export_of_a_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        export_encoder(tmp_path / "nope.ckpt", tmp_path / "out")
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not written by a selfsup method"):
        export_encoder(tmp_path / "foreign.ckpt", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_encoder(tmp_path)
    assert tiny_data().preprocessing.image_size == IMAGE_SIZE
