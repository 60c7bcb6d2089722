"""Trainer plugins selfsup installs: the atomic checkpoint writer, and SyncBatchNorm that runs on CPU."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from torch import nn

from selfsup.checkpoint import AtomicCheckpointIO


class SyncBatchNormPlugin(TorchSyncBatchNorm):
    """``Trainer(sync_batchnorm=True)``: torch's own ``nn.SyncBatchNorm`` on accelerators, and on CPU
    (gloo, where torch's refuses the input) :class:`selfsup.models.sync_batchnorm.SyncBatchNorm`."""

    def apply(self, model: nn.Module) -> nn.Module:
        if _training_device(model) != "cpu":  # applied before the model moves to its device: ask the trainer
            return super().apply(model)
        from selfsup.models.sync_batchnorm import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        from selfsup.models.sync_batchnorm import revert_sync_batchnorm

        return revert_sync_batchnorm(super().revert(model))


def _training_device(model: nn.Module) -> str:
    """The device type the trainer will train ``model`` on (a LightningModule knows its trainer)."""
    try:
        return model.trainer.strategy.root_device.type
    except (AttributeError, RuntimeError):  # no trainer attached: where the parameters are
        return next((p.device.type for p in model.parameters()), "cpu")


def default_plugins(plugins: Any, sync_batchnorm: bool) -> list[Any]:
    """The user's plugins plus the atomic checkpoint writer (unless a CheckpointIO is given) and,
    with ``sync_batchnorm``, :class:`SyncBatchNormPlugin` (unless a LayerSync is given)."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if sync_batchnorm and not any(isinstance(p, LayerSync) for p in plugins):
        plugins.append(SyncBatchNormPlugin())
    return plugins
