"""SSLMethod: the one base class. A method declares its modules and implements ``training_loss``.

The base owns what every objective shares: the encoder, the optimizer and its schedule, logging, the
``training_loss`` contract and the preprocessing and encoder config written into checkpoints. Run
management (exact resume, the non-finite guard, unreadable-image accounting, preemption, ``init_from``)
lives in :mod:`selfsup.run`, as callbacks a method cannot lose by overriding a hook.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from selfsup.checkpoint import encoder_config
from selfsup.data.datamodule import Batch
from selfsup.methods.common import check_arg
from selfsup.models.encoder import Encoder
from selfsup.models.teacher import representation_encoder, representation_prefix, update_teachers
from selfsup.optim import (OPTIMIZERS, Cosine, Schedule, as_schedule, create_optimizer, lr_scheduler,
                           global_batch_size, no_weight_decay_names, schedule_config, set_weight_decay,
                           training_steps)


class SSLMethod(L.LightningModule):
    """Shared training machinery for every self-supervised method.

    Args:
        encoder: the backbone whose pooled features are the learned representation.
        optimizer: ``adamw``, ``sgd`` (momentum, no Nesterov), ``lars`` or ``lamb``, from ``timm.optim``.
            Biases and normalisation weights get no weight decay (and no LARS adaptation).
        base_lr: learning rate per ``lr_batch_denominator`` images; the effective rate is
            ``base_lr * global_batch / lr_batch_denominator`` with the global batch counting devices,
            nodes and gradient accumulation.
        weight_decay: a number, or a :class:`~selfsup.optim.Schedule` per step (DINO's ``Cosine(0.04, 0.4)``),
            logged as ``train/weight_decay``.
        momentum, betas: optimizer settings (``betas`` for AdamW/LAMB only).
        warmup_epochs: linear warmup length, applied per step; then cosine decay.
        min_lr_ratio: the cosine floor as a fraction of the effective rate.
        lr_batch_denominator: 256 for most methods; SimMIM scales per 512.
        channels_last: use the channels-last memory format (faster convolutions on CPU and GPU).
        micro_batch_size: encode each resolution's views in shuffled chunks of at most this many images
            ("ghost" BatchNorm; bounds activation memory), see :meth:`Encoder.encode_views`. ``None``:
            BatchNorm over all views, as the SimCLR and SwAV papers. Only for methods using :meth:`encode_views`.
        compile: ``torch.compile`` the encoder in place when fit sets up (state-dict keys unchanged):
            each block of a ViT (MAE and SimMIM call the blocks, not the encoder's forward), else its forward.

    ``training_step`` records the scalar loss terms in :attr:`step_terms` for
    :class:`~selfsup.run.guard.NonFiniteGuard`: call ``super().training_step`` if you override it.
    """

    encodes_views = True  # False where training_loss does not go through encode_views (micro-batches)
    representation = "student"  # or "teacher": the encoder that eval, export, load_encoder and init_from read

    def __init__(self, encoder: Encoder, optimizer: str = "adamw", base_lr: float = 1e-3,
                 weight_decay: float | Schedule = 0.05, momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999),
                 warmup_epochs: float = 10.0, min_lr_ratio: float = 0.0, lr_batch_denominator: int = 256,
                 channels_last: bool = False, micro_batch_size: int | None = None, compile: bool = False):
        super().__init__()
        check_arg("optimizer", optimizer in OPTIMIZERS, optimizer, f"one of {OPTIMIZERS}")
        check_arg("base_lr", base_lr > 0, base_lr, "positive")
        wd = self.weight_decay = as_schedule(weight_decay, "model.weight_decay")
        check_arg("weight_decay", min(wd.start, wd.warmup_start, wd.start if wd.end is None else wd.end) >= 0,
                  weight_decay, ">= 0")
        check_arg("warmup_epochs", warmup_epochs >= 0, warmup_epochs, ">= 0")
        check_arg("min_lr_ratio", 0 <= min_lr_ratio <= 1, min_lr_ratio, "in [0, 1]")
        check_arg("lr_batch_denominator", lr_batch_denominator > 0, lr_batch_denominator, "positive")
        check_arg("micro_batch_size", micro_batch_size is None or micro_batch_size > 0, micro_batch_size,
                  "positive or null")
        check_arg("micro_batch_size", micro_batch_size is None or self.encodes_views, micro_batch_size,
                  f"null for {type(self).__name__}, whose encoder runs on tokens, not through encode_views")
        self.save_hyperparameters(ignore=["encoder"])
        if isinstance(weight_decay, Schedule):
            self.hparams["weight_decay"] = schedule_config(weight_decay)  # plain data in checkpoints
        self.schedule_steps = (1, 1)  # (total, per epoch) optimizer steps, set when the optimizer is built
        self.encoder = encoder
        self.preprocessing: dict[str, Any] | None = None
        self.step_terms: Tensor | None = None  # this step's scalar loss terms, for the non-finite guard
        self.step_term_names: list[str] = []
        self.step_skipped = False  # set by NonFiniteGuard per optimizer step: then no EMA teacher update
        self._no_decay: set[str] | None = None
        self.lr_scales: dict[str, float] = {}  # learning-rate factors by parameter name (layer-wise decay)
        self.channels_last, self.micro_batch_size = channels_last, micro_batch_size
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)

    # -- the one method a subclass implements ----------------------------------------------------
    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        """Return ``{"loss": scalar, ...}``. Other scalar terms are logged; an optional ``"features"``
        entry (pooled encoder features of the first view) feeds the online probe."""
        raise NotImplementedError

    # -- shared helpers for subclasses -----------------------------------------------------------
    def encode_views(self, views: list[Tensor]) -> list[Tensor]:
        """Pooled features of every view (:meth:`Encoder.encode_views`: one encoder pass per resolution, in
        shuffled chunks of ``micro_batch_size`` images when set)."""
        return self.encoder.encode_views(views, self.micro_batch_size, self.channels_last)

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._no_decay = no_weight_decay_names(self)  # by name and shape, before DDP/FSDP wrap or flatten
        if stage == "fit":
            self.setup_compile()
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "preprocessing", None) is not None:
            self.preprocessing = datamodule.preprocessing.as_dict()

    def setup_compile(self) -> None:
        """With ``compile``, compile the encoder in place (``nn.Module.compile``: no ``_orig_mod.`` keys)."""
        if not self.hparams.get("compile"):
            return
        blocks = getattr(self.encoder.model, "blocks", None)
        for module in (blocks if self.encoder.is_vit and blocks is not None else [self.encoder]):
            module.compile()

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """``training_loss``, logged. It always returns the loss, so every rank runs the same backward
        and collectives; :class:`~selfsup.run.guard.NonFiniteGuard` then drops a non-finite step's
        gradients on every rank together."""
        terms = self.training_loss(batch)
        scalars = {k: v.detach() for k, v in terms.items() if k != "features" and v.ndim == 0}
        self.step_terms, self.step_term_names = torch.stack([v.float() for v in scalars.values()]), list(scalars)
        self.log_dict({f"train/{k}": v for k, v in scalars.items()}, batch_size=len(batch))
        self.log("loss", scalars["loss"], prog_bar=True, logger=False, batch_size=len(batch))
        return {"loss": terms["loss"], "features": terms.get("features")}

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Features of labelled eval images; the probe callbacks consume them."""
        return {"features": self.encoder(batch.views[0]), "labels": batch.labels}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        global_batch = global_batch_size(self.trainer)
        lr = hp.base_lr * global_batch / hp.lr_batch_denominator
        extra = {"betas": tuple(hp.betas)} if hp.optimizer in ("adamw", "lamb") else {"momentum": hp.momentum}
        # Lightning's mixed-precision plugin cannot clip a fused optimizer's gradients (it unscales inside step)
        fused = not (self.trainer.gradient_clip_val and "mixed" in str(self.trainer.precision))
        total, per_epoch = training_steps(self.trainer)
        wd = self.weight_decay.value(0, total, per_epoch)
        opt = create_optimizer(self, hp.optimizer, lr, wd, self._no_decay, fused, self.lr_scales, **extra)
        warmup = min(total, round(hp.warmup_epochs * per_epoch))
        rank_zero_info(f"[selfsup] effective lr {lr:.4g} = base_lr {hp.base_lr} x global batch {global_batch} "
                       f"/ {hp.lr_batch_denominator}; {warmup} warmup + {total - warmup} cosine steps")
        self.effective_lr, self.global_batch, self.schedule_steps = lr, global_batch, (total, per_epoch)
        schedule = lr_scheduler(opt, Cosine(1.0, hp.min_lr_ratio, warmup_epochs=hp.warmup_epochs), total, per_epoch)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.logger is not None:
            self.logger.log_hyperparams({"effective_lr": self.effective_lr, "global_batch_size": self.global_batch})

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        # a CPU tensor: Lightning would copy a Python float to the device every step
        lr = torch.tensor(float(self.optimizers().param_groups[0]["lr"]))
        self.log("train/lr", lr, batch_size=max(1, len(batch)))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step (Lightning calls this once per real step, not per accumulation micro-step), then the EMA
        teachers' update (:mod:`selfsup.models.teacher`) unless the non-finite guard skipped the step."""
        step = self.trainer.global_step  # before the step: Lightning counts it inside optimizer.step
        wd = self.scheduled(self.weight_decay) if self.weight_decay.varies else None
        if wd is not None:
            set_weight_decay(optimizer, wd)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if wd is not None:  # logged after the step: Lightning drops what this hook logs before the closure runs
            self.log("train/weight_decay", torch.tensor(wd), batch_size=1)
        if not self.step_skipped and (momentum := update_teachers(self, step, *self.schedule_steps)) is not None:
            self.log("train/teacher_momentum", torch.tensor(momentum), batch_size=1)  # CPU tensor, as train/lr

    def scheduled(self, schedule: Schedule) -> float:
        """``schedule`` at the current optimizer step (teacher temperature, weight decay...)."""
        return schedule.value(self.global_step, *self.schedule_steps)

    def represent(self, x: Tensor, tokens: bool = False) -> Tensor:
        """Pooled features of the representation (``representation``: the student's encoder or its EMA teacher
        copy), what probes score and export writes; ``tokens``: its token features (ViTs; the PCA picture)."""
        return representation_encoder(self).forward_tokens(x) if tokens else representation_encoder(self)(x)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["selfsup"] = {"method": f"{type(self).__module__}.{type(self).__qualname__}",
                                 "encoder": self.encoder.config, "preprocessing": self.preprocessing,
                                 "encoder_prefix": representation_prefix(self)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.preprocessing = checkpoint.get("selfsup", {}).get("preprocessing", self.preprocessing)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = True,
                             **kwargs: Any) -> SSLMethod:
        """Lightning's ``load_from_checkpoint``, reading with ``weights_only=True``, with the encoder (a module,
        so not a saved hyper-parameter) rebuilt from ``checkpoint["selfsup"]["encoder"]`` unless given."""
        if "encoder" not in kwargs:
            kwargs["encoder"] = Encoder(**encoder_config(checkpoint_path))
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)
