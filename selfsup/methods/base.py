"""SSLMethod: the one base class. A method declares its modules and implements ``training_loss``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import timm.optim
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.models.encoder import Encoder

OPTIMIZERS = ("adamw", "sgd", "lars", "lamb")


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Run a block in float32 even inside an autocast region (losses, normalisations, Sinkhorn)."""
    with torch.autocast(device_type, enabled=False):
        yield


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SSLMethod(L.LightningModule):
    """Shared training machinery for every self-supervised method.

    Args:
        encoder: the backbone whose pooled features are the learned representation.
        optimizer: ``adamw``, ``sgd`` (momentum, no Nesterov), ``lars`` or ``lamb``, from ``timm.optim``.
            Biases and normalisation weights get no weight decay (and no LARS adaptation).
        base_lr: learning rate per ``lr_batch_denominator`` images; the effective rate is
            ``base_lr * global_batch / lr_batch_denominator`` with the global batch counting devices,
            nodes and gradient accumulation.
        weight_decay, momentum, betas: optimizer settings (``betas`` for AdamW/LAMB only).
        warmup_epochs: linear warmup length, applied per step; then cosine decay.
        min_lr_ratio: the cosine floor as a fraction of the effective rate.
        lr_batch_denominator: 256 for most methods; SimMIM scales per 512.
        channels_last: use the channels-last memory format (faster convolutions on CPU and GPU).
    """

    def __init__(self, encoder: Encoder, optimizer: str = "adamw", base_lr: float = 1e-3,
                 weight_decay: float = 0.05, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_epochs: float = 10.0, min_lr_ratio: float = 0.0, lr_batch_denominator: int = 256,
                 channels_last: bool = False):
        super().__init__()
        _check("optimizer", optimizer in OPTIMIZERS, optimizer, f"one of {OPTIMIZERS}")
        _check("base_lr", base_lr > 0, base_lr, "positive")
        _check("weight_decay", weight_decay >= 0, weight_decay, ">= 0")
        _check("warmup_epochs", warmup_epochs >= 0, warmup_epochs, ">= 0")
        _check("min_lr_ratio", 0 <= min_lr_ratio <= 1, min_lr_ratio, "in [0, 1]")
        _check("lr_batch_denominator", lr_batch_denominator > 0, lr_batch_denominator, "positive")
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self.preprocessing: dict[str, Any] | None = None
        self.skipped_images = 0
        self.channels_last = channels_last
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)

    # -- the one method a subclass implements ----------------------------------------------------
    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        """Return ``{"loss": scalar, ...}``. Other scalar terms are logged; an optional ``"features"``
        entry (pooled encoder features of the first view) feeds the online probe."""
        raise NotImplementedError

    # -- shared helpers for subclasses -----------------------------------------------------------
    def encode_views(self, views: list[Tensor]) -> list[Tensor]:
        """Pooled features of every view, running the encoder once per distinct resolution."""
        out: list[Tensor | None] = [None] * len(views)
        for shape in dict.fromkeys(v.shape for v in views):
            idx = [i for i, v in enumerate(views) if v.shape == shape]
            x = torch.cat([views[i] for i in idx])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for i, h in zip(idx, self.encoder(x).chunk(len(idx))):
                out[i] = h
        return out  # type: ignore[return-value]

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "preprocessing", None) is not None:
            self.preprocessing = datamodule.preprocessing.as_dict()

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any] | None:
        self.skipped_images += batch.skipped
        if batch.skipped:
            self.log("data/skipped_images", float(self.skipped_images), batch_size=max(1, len(batch)))
        if len(batch) == 0:
            return None
        terms = self.training_loss(batch)
        scalars = {f"train/{k}": v.detach() for k, v in terms.items() if k != "features" and v.ndim == 0}
        self.log_dict(scalars, batch_size=len(batch))
        self.log("loss", terms["loss"].detach(), prog_bar=True, logger=False, batch_size=len(batch))
        return {"loss": terms["loss"], "features": terms.get("features")}

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Features of labelled eval images; the probe callbacks consume them."""
        return {"features": self.encoder(batch.views[0]), "labels": batch.labels}

    def global_batch_size(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError("cannot scale the learning rate: the data module has no batch_size")
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        global_batch = self.global_batch_size()
        lr = hp.base_lr * global_batch / hp.lr_batch_denominator
        extra = {"betas": tuple(hp.betas)} if hp.optimizer in ("adamw", "lamb") else {"momentum": hp.momentum}
        opt = timm.optim.create_optimizer_v2(self, opt="momentum" if hp.optimizer == "sgd" else hp.optimizer,
                                             lr=lr, weight_decay=hp.weight_decay, **extra)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches))
        warmup = min(total, round(hp.warmup_epochs * per_epoch))
        rank_zero_info(f"[selfsup] effective lr {lr:.4g} = base_lr {hp.base_lr} x global batch {global_batch} "
                       f"/ {hp.lr_batch_denominator}; {warmup} warmup + {total - warmup} cosine steps")
        self.effective_lr = lr
        scales = [g.get("lr_scale", 1.0) for g in opt.param_groups]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, [lambda s, k=k: k * warmup_cosine(s, warmup, total, hp.min_lr_ratio) for k in scales])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.logger is not None:
            self.logger.log_hyperparams({"effective_lr": self.effective_lr,
                                         "global_batch_size": self.global_batch_size()})

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=max(1, len(batch)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["selfsup"] = {"method": f"{type(self).__module__}.{type(self).__qualname__}",
                                 "encoder": self.encoder.config, "preprocessing": self.preprocessing}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.preprocessing = checkpoint.get("selfsup", {}).get("preprocessing", self.preprocessing)


def _check(key: str, ok: bool, value: Any, requirement: str) -> None:
    if not ok:
        raise ValueError(f"model.{key}={value!r} is invalid: it must be {requirement}")
