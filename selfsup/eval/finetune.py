"""End-to-end fine-tuning: the whole encoder plus a linear head, as a Lightning run.

Recipe: MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022), appendix A.1
fine-tuning: AdamW (betas 0.9/0.999), base lr 5e-4..1e-3 x batch/256, weight decay 0.05, layer-wise lr
decay 0.65-0.75, drop path 0.1, Mixup 0.8, CutMix 1.0, label smoothing 0.1, RandAugment (9, 0.5),
random erasing 0.25, 5 warmup epochs then cosine over 100 epochs. Scaled down here for small data and
CPU runs: 10 epochs, 1 warmup epoch, batch 64, base lr 1e-3, crops covering 25-100% of the image.
Layer-wise decay comes from timm's parameter groups (``create_optimizer_v2(layer_decay=...)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.data.preprocessing import Preprocessing
from selfsup.data.transforms import ViewTransform
from selfsup.eval.knn import topk_accuracy
from selfsup.eval.protocols import EvalContext, EvalData, register_protocol, score_row
from selfsup.optim import Cosine, lr_scheduler, training_steps
from selfsup.models.encoder import Encoder


class FinetuneView(ViewTransform):
    """Random resized crop, flip, RandAugment and random erasing, then the run's normalisation."""

    def __init__(self, crop_scale: tuple[float, float] = (0.25, 1.0), rand_augment_ops: int = 2,
                 rand_augment_magnitude: int = 9, erasing_p: float = 0.25):
        self.crop_scale, self.erasing_p = tuple(crop_scale), erasing_p
        self.rand_augment = (rand_augment_ops, rand_augment_magnitude)
        self.pipeline: T.Compose | None = None

    def bind(self, preprocessing: Preprocessing) -> None:
        ops: list[T.Transform] = [T.ToImage(), T.RandomResizedCrop(preprocessing.image_size, scale=self.crop_scale,
                                                                   antialias=True), T.RandomHorizontalFlip()]
        if self.rand_augment[0] > 0:
            ops.append(T.RandAugment(num_ops=self.rand_augment[0], magnitude=self.rand_augment[1]))
        ops += preprocessing.to_tensor()[1:]
        if self.erasing_p > 0:
            ops.append(T.RandomErasing(self.erasing_p, value=0))
        self.pipeline = T.Compose(ops)

    def __call__(self, image: Any) -> list[Tensor]:
        return [self.pipeline(image)]


class FineTuner(L.LightningModule):
    """An encoder with a classifier (timm's ``reset_classifier``), trained end to end."""

    def __init__(self, encoder: Encoder, num_classes: int, base_lr: float = 1e-3, weight_decay: float = 0.05,
                 layer_decay: float = 0.75, warmup_epochs: float = 1.0, mixup: float = 0.8, cutmix: float = 1.0,
                 label_smoothing: float = 0.1, batch_size: int = 64, lr_batch_denominator: int = 256):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        encoder.model.reset_classifier(num_classes)
        self.network = encoder
        self.mixup = (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                            num_classes=num_classes) if mixup > 0 or cutmix > 0 else None)
        self.soft_target_loss = SoftTargetCrossEntropy()
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []
        self.results: dict[str, float] = {}

    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if len(batch) == 0:
            return None
        images, labels = batch.views[0], batch.labels
        if self.mixup is not None and len(batch) % 2 == 0:
            images, targets = self.mixup(images, labels)
            loss = self.soft_target_loss(self(images), targets)
        else:
            loss = F.cross_entropy(self(images), labels, label_smoothing=self.hparams.label_smoothing)
        self.log("finetune/train_loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if len(batch):
            self._scores.append(self(batch.views[0]).float())
            self._labels.append(batch.labels)

    def on_validation_epoch_end(self) -> None:
        if not self._scores:
            return
        scores, labels = torch.cat(self._scores), torch.cat(self._labels).to(self.device)
        self.results = {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5),
                        "loss": F.cross_entropy(scores, labels).item()}
        self.log_dict({f"finetune/val_{k}": v for k, v in self.results.items()})
        self._scores, self._labels = [], []

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        lr = hp.base_lr * hp.batch_size * self.trainer.accumulate_grad_batches / hp.lr_batch_denominator
        optimizer = create_optimizer_v2(self.network.model, opt="adamw", lr=lr, weight_decay=hp.weight_decay,
                                        layer_decay=hp.layer_decay)
        total, per_epoch = training_steps(self.trainer)
        schedule = lr_scheduler(optimizer, Cosine(1.0, 0.0, warmup_epochs=hp.warmup_epochs), total, per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def finetune_encoder(encoder: Encoder, data: EvalData, epochs: int = 10, batch_size: int = 64,
                     max_steps: int = -1, drop_path_rate: float = 0.1, crop_scale: tuple[float, float] = (0.25, 1.0),
                     rand_augment_ops: int = 2, rand_augment_magnitude: int = 9, erasing_p: float = 0.25,
                     seed: int = 0, accelerator: str = "auto", precision: str = "32-true",
                     log_dir: Path | None = None, score_start: bool = True, **optimisation: Any) -> dict[str, float]:
    """Fine-tune a copy of ``encoder`` on ``data.train``; test top-1/top-5 at the start and at the end.

    ``optimisation`` goes to :class:`FineTuner` (base_lr, weight_decay, layer_decay, warmup_epochs,
    mixup, cutmix, label_smoothing). The given encoder is not modified.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = Encoder(**{**encoder.config, "drop_path_rate": drop_path_rate})
        network.load_state_dict(encoder.state_dict())
        module = FineTuner(network, data.num_classes, batch_size=batch_size, **optimisation)
        view = FinetuneView(crop_scale, rand_augment_ops, rand_augment_magnitude, erasing_p)
        view.bind(data.preprocessing)
        train = data.loader("train", view, batch_size=batch_size, shuffle=True, drop_last=True)
        if len(train) == 0:
            raise ValueError(f"finetune batch_size={batch_size} exceeds the {len(data.train)} training images; "
                             "lower finetune.batch_size")
        trainer = L.Trainer(max_epochs=epochs, max_steps=max_steps, accelerator=accelerator, devices=1,
                            precision=precision, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, logger=_logger(log_dir), log_every_n_steps=10)
        start = _validate(trainer, module, data) if score_start else {}
        trainer.fit(module, train_dataloaders=train)
        end = _validate(trainer, module, data)
    return {**end, **{f"start_{k}": v for k, v in start.items()}, "steps": trainer.global_step}


def _validate(trainer: L.Trainer, module: FineTuner, data: EvalData) -> dict[str, float]:
    trainer.validate(module, dataloaders=data.loader("test"), verbose=False)
    return dict(module.results)


def _logger(log_dir: Path | None) -> Any:
    if log_dir is None:
        return False
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(str(log_dir), name="finetune")


@register_protocol("finetune")
def finetune(context: EvalContext, epochs: int = 10, batch_size: int = 64, max_steps: int = -1,
             base_lr: float = 1e-3, weight_decay: float = 0.05, layer_decay: float = 0.75,
             drop_path_rate: float = 0.1, warmup_epochs: float = 1.0, mixup: float = 0.8, cutmix: float = 1.0,
             label_smoothing: float = 0.1, rand_augment_ops: int = 2, rand_augment_magnitude: int = 9,
             erasing_p: float = 0.25, crop_scale: tuple[float, float] = (0.25, 1.0), seed: int = 0) -> list[dict]:
    """Fine-tune the whole encoder plus a linear head; test top-1 and top-5."""
    if context.encoder is None or context.data is None:
        raise ValueError("finetune needs the encoder and the labelled images, not only cached features")
    optimisation = dict(base_lr=base_lr, weight_decay=weight_decay, layer_decay=layer_decay,
                        warmup_epochs=warmup_epochs, mixup=mixup, cutmix=cutmix, label_smoothing=label_smoothing)
    accelerator = "gpu" if context.device.type == "cuda" else "cpu"
    scores = finetune_encoder(context.encoder, context.data, epochs, batch_size, max_steps, drop_path_rate,
                              tuple(crop_scale), rand_augment_ops, rand_augment_magnitude, erasing_p, seed,
                              accelerator, log_dir=context.out_dir, **optimisation)
    settings = dict(epochs=epochs, steps=scores["steps"], batch_size=batch_size, drop_path_rate=drop_path_rate,
                    rand_augment=f"n{rand_augment_ops}-m{rand_augment_magnitude}", erasing_p=erasing_p,
                    start_top1=round(scores["start_top1"], 4), **optimisation)
    return [score_row("finetune", metric, scores[metric], **settings) for metric in ("top1", "top5")]
