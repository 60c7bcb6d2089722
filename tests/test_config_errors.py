"""Bad config values, given through the ``selfsup`` command line, fail before training with an error
that names the key (and the value); FSDP's configuration is validated."""

from __future__ import annotations

import re

import pytest

from selfsup.cli import SelfSupCLI, main, selfsup_cli
from selfsup.checkpoint import AtomicCheckpointIO
from selfsup.run import (DataHealth, DataWait, ExactResume, InitFrom, NonFiniteGuard, PreemptionCheckpoint,
                         SyncBatchNormPlugin)

SIMCLR, MAE = "recipes/demo/simclr.yaml", "recipes/demo/mae.yaml"

CASES = [
    (SIMCLR, "--model.base_lr", "-0.1", r"model\.base_lr=-0\.1"),
    (SIMCLR, "--model.weight_decay", "-1", r"model\.weight_decay=-1"),
    (SIMCLR, "--model.optimizer", "adam", r"model\.optimizer='adam'"),
    (SIMCLR, "--nonfinite.max_consecutive", "0", r"nonfinite\.max_consecutive=0"),
    (SIMCLR, "--data_wait.window", "0", r"data_wait\.window=0"),
    (SIMCLR, "--model.temperature", "0", r"model\.temperature=0"),
    (SIMCLR, "--data.batch_size", "0", r"data\.batch_size=0"),
    (SIMCLR, "--data.num_workers", "-1", r"data\.num_workers=-1"),
    (SIMCLR, "--data.dataset", "imagenet_typo", r"unknown dataset 'imagenet_typo'"),
    (SIMCLR, "--data.image_size", "0", r"image_size=0"),
    (SIMCLR, "--trainer.precision", "8-mixed", r"trainer\.precision.*8-mixed"),
    (MAE, "--model.mask_ratio", "1.5", r"model\.mask_ratio=1\.5"),
]


@pytest.mark.parametrize(("recipe", "key", "value", "message"), CASES, ids=[c[1] for c in CASES])
def test_bad_value_names_the_key(recipe, key, value, message, tmp_path, capsys):
    if "mask_ratio" in key:
        pytest.importorskip("selfsup.methods.mae")
    with pytest.raises((ValueError, SystemExit)) as error:
        main(["fit", "--config", recipe, "--trainer.default_root_dir", str(tmp_path), key, value])
    text = str(error.value) + capsys.readouterr().err
    assert re.search(message, text, re.S), text[-2000:]


def _cli(tmp_path, *args: str) -> SelfSupCLI:
    return selfsup_cli(["--config", SIMCLR, "--trainer.default_root_dir", str(tmp_path), *args], run=False)


def test_cli_installs_atomic_checkpoints_the_run_callbacks_and_cpu_sync_batchnorm(tmp_path):
    trainer = _cli(tmp_path, "--trainer.sync_batchnorm", "true").trainer
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    for kind in (PreemptionCheckpoint, ExactResume, NonFiniteGuard, DataHealth, DataWait, InitFrom):
        assert sum(isinstance(c, kind) for c in trainer.callbacks) == 1, kind
    assert isinstance(trainer._accelerator_connector._layer_sync, SyncBatchNormPlugin)
    plain = _cli(tmp_path).trainer
    assert plain._accelerator_connector._layer_sync is None, "BatchNorm is synced only when asked"


def test_progress_bar_and_checkpointing_can_be_turned_off(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    def kinds(trainer):
        return {kind for kind in (ProgressBar, ModelCheckpoint, PreemptionCheckpoint)
                if any(isinstance(c, kind) for c in trainer.callbacks)}

    assert kinds(_cli(tmp_path).trainer) == {ProgressBar, ModelCheckpoint, PreemptionCheckpoint}
    quiet = _cli(tmp_path, "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false")
    assert kinds(quiet.trainer) == set()
    assert kinds(_cli(tmp_path, "--trainer.enable_progress_bar", "false").trainer) == {ModelCheckpoint,
                                                                                       PreemptionCheckpoint}


def test_fsdp_configuration_is_validated(tmp_path):
    fsdp = ["--trainer.strategy", "lightning.pytorch.strategies.FSDPStrategy",
            "--trainer.strategy.auto_wrap_policy", "[timm.models.vision_transformer.Block]",
            "--trainer.strategy.state_dict_type", "full"]
    with pytest.raises(ValueError, match=r"fsdp.*requires a GPU accelerator"):
        _cli(tmp_path, *fsdp)
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block

    strategy = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="FULL_SHARD")
    assert strategy.kwargs["auto_wrap_policy"] is not None  # the recipe snippet in the README builds


def test_fsdp_recipe_parses(tmp_path, capsys):
    pytest.importorskip("selfsup.methods.mae")
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", MAE, "--config", "recipes/slurm/fsdp.yaml", "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "FSDPStrategy" in printed and "timm.models.vision_transformer.Block" in printed


def test_sync_batchnorm_is_torchs_own_on_an_accelerator_and_selfsups_on_cpu():
    from types import SimpleNamespace

    import torch
    from torch import nn

    from selfsup.models.sync_batchnorm import SyncBatchNorm

    for device, expected in (("cuda", nn.SyncBatchNorm), ("cpu", SyncBatchNorm)):
        module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        converted = SyncBatchNormPlugin().apply(module)
        assert type(converted[1]) is expected, device
