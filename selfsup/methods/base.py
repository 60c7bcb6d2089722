"""SSLMethod: the one base class. A method declares its modules and implements ``training_loss``."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import timm.optim
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from selfsup import reliability
from selfsup.data.datamodule import Batch
from selfsup.models.encoder import Encoder

OPTIMIZERS = ("adamw", "sgd", "lars", "lamb")
FUSED_OPTIMIZERS = ("adamw", "sgd")  # torch.optim's, which have fused CPU and CUDA kernels


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, **options: Any
                     ) -> torch.optim.Optimizer:
    """The optimizer selfsup trains with: timm's factory (bias and norm parameters get no weight decay;
    ``sgd`` is momentum SGD without Nesterov), with torch's fused kernel for AdamW and SGD when every
    parameter allows it: one kernel for all tensors, about 4x faster than the per-tensor loop on CPU
    (``benchmarks/optimizer.py``). ``name`` is one of ``OPTIMIZERS`` (checked where it is configured)."""
    if name in FUSED_OPTIMIZERS and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                        for p in model.parameters()):
        options["fused"] = True
    return timm.optim.create_optimizer_v2(model, opt="momentum" if name == "sgd" else name, lr=lr,
                                          weight_decay=weight_decay, **options)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Run a block in float32 even inside an autocast region (losses, normalisations, Sinkhorn)."""
    with torch.autocast(device_type, enabled=False):
        yield


def check_finite(term: str, value: Tensor, step: int) -> Tensor:
    """Raise ``FloatingPointError`` naming the step and the loss term when ``value`` is NaN or infinite
    (e.g. the known MAE fp16 overflow), so a diverged run stops instead of training on garbage."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"non-finite {term}={value.detach().float().cpu().tolist()} at step {step}; "
                                 "under fp16 try precision=bf16-mixed or 32, or lower model.base_lr")
    return value


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
        micro_batch_size: run the encoder over the views of one resolution in chunks of at most this
            many images, drawn at random from all views of the batch. Each chunk then has its own
            BatchNorm statistics ("ghost" batch norm, as per-device BatchNorm without SyncBatchNorm),
            shuffled so that a view's chunk does not reveal its positives; nothing else changes. It
            bounds activation memory. ``None``: one pass per resolution, BatchNorm over all views of the
            batch as in the SimCLR and SwAV papers. Models without BatchNorm (ViTs) are unaffected
            numerically. Only for methods that encode views with :meth:`encode_views` (SimCLR, SwAV);
            MAE and SimMIM run token-level encoders and reject it.
        max_consecutive_nonfinite: a step whose loss or gradient is NaN/Inf is skipped and counted; this
            many skips in a row stop the run with an error naming the step and the term.
        init_from: start a new run from the encoder weights of a selfsup checkpoint, an exported
            directory or its ``model.safetensors``, loaded when fit sets up. Different from ``--ckpt_path``,
            which resumes a run: its restored weights then replace these.
    """

    encodes_views = True  # False where training_loss does not go through encode_views (micro-batches)

    def __init__(self, encoder: Encoder, optimizer: str = "adamw", base_lr: float = 1e-3,
                 weight_decay: float = 0.05, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_epochs: float = 10.0, min_lr_ratio: float = 0.0, lr_batch_denominator: int = 256,
                 channels_last: bool = False, micro_batch_size: int | None = None, max_consecutive_nonfinite: int = 5,
                 init_from: str | None = None):
        super().__init__()
        _check("optimizer", optimizer in OPTIMIZERS, optimizer, f"one of {OPTIMIZERS}")
        _check("base_lr", base_lr > 0, base_lr, "positive")
        _check("weight_decay", weight_decay >= 0, weight_decay, ">= 0")
        _check("warmup_epochs", warmup_epochs >= 0, warmup_epochs, ">= 0")
        _check("min_lr_ratio", 0 <= min_lr_ratio <= 1, min_lr_ratio, "in [0, 1]")
        _check("lr_batch_denominator", lr_batch_denominator > 0, lr_batch_denominator, "positive")
        _check("micro_batch_size", micro_batch_size is None or micro_batch_size > 0, micro_batch_size,
               "positive or null")
        _check("micro_batch_size", micro_batch_size is None or self.encodes_views, micro_batch_size,
               f"null for {type(self).__name__}, whose encoder runs on tokens, not through encode_views")
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self.preprocessing: dict[str, Any] | None = None
        self.skipped_images = 0
        self.nonfinite = reliability.NonFiniteGuard(max_consecutive_nonfinite)
        self._step_skipped = False
        self._norm_statistics: list | None = None
        self._images_this_epoch = self._skipped_this_epoch = 0
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self.channels_last = channels_last
        self.micro_batch_size = micro_batch_size
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)

    # -- the one method a subclass implements ----------------------------------------------------
    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        """Return ``{"loss": scalar, ...}``. Other scalar terms are logged; an optional ``"features"``
        entry (pooled encoder features of the first view) feeds the online probe."""
        raise NotImplementedError

    # -- shared helpers for subclasses -----------------------------------------------------------
    def encode_views(self, views: list[Tensor]) -> list[Tensor]:
        """Pooled features of every view, running the encoder once per distinct resolution (in chunks of
        ``micro_batch_size`` images when set)."""
        out: list[Tensor | None] = [None] * len(views)
        for shape in dict.fromkeys(v.shape for v in views):
            idx = [i for i, v in enumerate(views) if v.shape == shape]
            x = torch.cat([views[i] for i in idx])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            features = self._encode_in_chunks(x) if self.micro_batch_size else self.encoder(x)
            for i, h in zip(idx, features.chunk(len(idx))):
                out[i] = h
        return out  # type: ignore[return-value]

    def _encode_in_chunks(self, x: Tensor) -> Tensor:
        """The encoder over chunks of ``micro_batch_size`` images of a random permutation of ``x``, its
        features put back in ``x``'s order.

        Shuffled, as MoCo's shuffling BN: split in order, chunk ``i`` of every view would hold the same
        images, so the BatchNorm statistics of a positive's chunk would tell the loss where to look for
        it, the leak that SimCLR's global BatchNorm exists to close. Shuffled, a chunk is a random sample
        of views, and which chunk a view sits in says nothing about which views are its positives."""
        order = torch.randperm(len(x), device=x.device)
        features = torch.cat([self.encoder(chunk) for chunk in x[order].split(self.micro_batch_size)])
        return features[torch.argsort(order)]

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.get("init_from") and not self.trainer.ckpt_path:
            from selfsup.export import init_encoder_from

            init_encoder_from(self.encoder, self.hparams.init_from)
            rank_zero_info(f"[selfsup] encoder initialised from {self.hparams.init_from}")
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "preprocessing", None) is not None:
            self.preprocessing = datamodule.preprocessing.as_dict()

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any] | None:
        self._count_images(batch)
        terms = self._guarded_loss(batch)
        if terms is None:
            return None
        scalars = {f"train/{k}": v.detach() for k, v in terms.items() if k != "features" and v.ndim == 0}
        self.log_dict(scalars, batch_size=len(batch))
        self.log("loss", terms["loss"].detach(), prog_bar=True, logger=False, batch_size=len(batch))
        return {"loss": terms["loss"], "features": terms.get("features")}

    def _count_images(self, batch: Batch) -> None:
        """Count unreadable files met and images decoded (placeholders are not decoded images)."""
        self.skipped_images += batch.skipped
        if batch.skipped:
            self.log("data/skipped_images", float(self.skipped_images), batch_size=max(1, len(batch)))
        self._images_this_epoch += len(batch) - batch.invalid
        self._skipped_this_epoch += batch.skipped

    def _guarded_loss(self, batch: Batch) -> dict[str, Tensor] | None:
        """``training_loss``, or ``None`` (a skipped, counted step) when any rank's loss is not finite or
        any rank's batch holds placeholders. ``training_loss`` runs either way, so every rank runs the
        collectives inside it; one all-reduce then decides for all ranks."""
        self._norm_statistics = reliability.snapshot_norm_statistics(self)
        try:
            terms = self.training_loss(batch)
        except FloatingPointError as err:  # a method's own finiteness check names the term
            terms = {f"loss ({err})": torch.tensor(float("nan"), device=self.device)}
        request = (f"{batch.invalid} of {len(batch)} samples of a batch are placeholders for unreadable images "
                   "(no readable replacement found)") if batch.invalid else None
        requested_before = self.nonfinite.requested_skips
        reason = self.nonfinite.check_loss(terms, self.global_step, self.device, skip_request=request)
        if reason is None:
            return terms
        self._step_skipped = True
        reliability.restore_norm_statistics(self._norm_statistics)
        if self.nonfinite.requested_skips > requested_before:
            self.log("train/requested_skips", float(self.nonfinite.requested_skips), batch_size=max(1, len(batch)))
        else:
            self.log("train/skipped_steps", float(self.nonfinite.skipped_steps), batch_size=max(1, len(batch)))
        return None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step, unless a gradient is not finite: then drop the gradients so the optimizer leaves weights
        and moments untouched. (Checked right after backward, before ``on_before_optimizer_step``, so
        methods may override that hook freely.) Under 16-mixed the grad scaler already skips
        overflowing steps and lowers its scale; those are not counted."""

        def closure() -> Any:
            loss = optimizer_closure() if optimizer_closure is not None else None
            if getattr(self.trainer.precision_plugin, "scaler", None) is None and \
                    self.nonfinite.check_gradients(self, self.global_step, self.device) is not None:
                self._step_skipped = True
                optimizer.zero_grad(set_to_none=True)
                reliability.restore_norm_statistics(self._norm_statistics)
                self.log("train/skipped_steps", float(self.nonfinite.skipped_steps))
            return loss

        optimizer.step(closure=closure)

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
        opt = create_optimizer(self, hp.optimizer, lr, hp.weight_decay, **extra)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            if self.trainer.max_steps <= 0:
                raise ValueError("set trainer.max_epochs or trainer.max_steps: the schedule needs a length")
            total = self.trainer.max_steps
        total = int(total)
        self.trainer.fit_loop.setup_data()  # so num_training_batches is known even when max_steps decides
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
        reliability.restore_train_loader_state(self.trainer)
        if self._rng_to_restore is not None:  # restored here, after data loading set up, for exact resume
            reliability.restore_rank_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if self.logger is not None:
            self.logger.log_hyperparams({"effective_lr": self.effective_lr,
                                         "global_batch_size": self.global_batch_size()})

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        if not self._step_skipped:
            self.nonfinite.passed()
        self._step_skipped, self._norm_statistics = False, None
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=max(1, len(batch)))

    def on_train_epoch_start(self) -> None:
        self._images_this_epoch = self._skipped_this_epoch = 0

    def on_train_epoch_end(self) -> None:
        reliability.check_some_images_decoded(self._images_this_epoch, self._skipped_this_epoch, self.device)

    def on_train_end(self) -> None:
        reliability.report_skips(self.skipped_images, self.nonfinite.skipped_steps, self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["selfsup"] = {"method": f"{type(self).__module__}.{type(self).__qualname__}",
                                 "encoder": self.encoder.config, "preprocessing": self.preprocessing,
                                 "skipped_images": self.skipped_images, "nonfinite": self.nonfinite.state_dict(),
                                 "rng": reliability.gather_rng_states()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("selfsup", {})
        self.preprocessing = state.get("preprocessing", self.preprocessing)
        self.skipped_images = state.get("skipped_images", self.skipped_images)
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        self._rng_to_restore = state.get("rng")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = True,
                             **kwargs: Any) -> SSLMethod:
        """Lightning's ``load_from_checkpoint``, with the encoder rebuilt from the checkpoint's own
        ``checkpoint["selfsup"]["encoder"]`` config unless ``encoder=`` is given (the encoder is a module,
        so it is not among the saved hyper-parameters). Reads with ``weights_only=True`` by default."""
        if "encoder" not in kwargs:
            if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path):
                checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
            elif isinstance(checkpoint_path, (str, os.PathLike)):  # remote: fsspec, as Lightning reads it
                with get_filesystem(checkpoint_path).open(str(checkpoint_path), "rb") as f:
                    checkpoint = torch.load(f, map_location="cpu", weights_only=True)
            else:  # an open file: read it, then leave it where Lightning expects to start
                start = checkpoint_path.tell()
                checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
                checkpoint_path.seek(start)
            config = checkpoint.get("selfsup", {}).get("encoder") if isinstance(checkpoint, dict) else None
            if config is None:
                raise ValueError(f"checkpoint {str(checkpoint_path)!r} holds no encoder config "
                                 "(checkpoint['selfsup']['encoder']), so it was not written by a selfsup method; "
                                 f"pass encoder=Encoder(...) to {cls.__name__}.load_from_checkpoint")
            kwargs["encoder"] = Encoder(**config)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)


def _check(key: str, ok: bool, value: Any, requirement: str) -> None:
    if not ok:
        raise ValueError(f"model.{key}={value!r} is invalid: it must be {requirement}")
