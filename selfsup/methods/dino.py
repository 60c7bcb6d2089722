"""DINO: self-distillation with no labels; the student matches the EMA teacher's sharpened, centred output.

Reference: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021 (ViT-S/16,
800 epochs: 77.0% ImageNet linear, 74.5% kNN). Paper defaults: head MLP 2048-2048 (GELU) to a 256-d
L2-normalised bottleneck, then a weight-normalised linear layer to 65536 prototypes whose norms are fixed
(``norm_last_layer``) and which is frozen for the first epoch; student temperature 0.1, teacher temperature
warmed up linearly from 0.04 to 0.07 over 30 epochs; centre momentum 0.9; teacher (encoder + head) an EMA of
the student, momentum cosine 0.996 -> 1; AdamW, lr 5e-4 x B/256 (B = 1024) after 10 warmup epochs, cosine to
1e-6; weight decay cosine 0.04 -> 0.4; gradient clipping 3.0; drop path 0.1; multi-crop 2 x 224 (scale
0.4-1; blur p 1.0 / 0.1, solarisation p 0 / 0.2) and 8 x 96 (10 in the 800-epoch ViT-S/16 run; scale
0.05-0.4, blur p 0.5). The teacher's
encoder is the representation (the paper evaluates the teacher).

Per step (the paper's Algorithm 1):
    s = student(all crops)              encoder -> head, every crop, one encoder pass per resolution
    t = teacher(global crops)           the EMA copy, no gradient
    loss = mean over (global crop g, crop v != g) of  H(softmax((t_g - center) / tt), softmax(s_v / ts))
    center = m * center + (1 - m) * mean(t over the global batch)        after the optimizer step
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.methods.base import SSLMethod
from selfsup.methods.common import check_arg, full_precision
from selfsup.models.encoder import Encoder
from selfsup.models.heads import DINOHead
from selfsup.models.teacher import Center, EMATeacher
from selfsup.optim import Constant, Cosine, Schedule, as_schedule, schedule_config


def distillation_loss(student: list[Tensor], targets: list[Tensor], student_temp: float) -> Tensor:
    """Cross-entropy from each global crop's target distribution to the student's distribution of every
    other crop, averaged over the pairs, in float32. ``targets`` holds the global crops' teacher
    probabilities; the global crops are also the first ``len(targets)`` entries of ``student``."""
    with full_precision(student[0].device.type):
        log_predictions = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
        pairs = [-(q * log_p).sum(-1).mean() for g, q in enumerate(targets)
                 for v, log_p in enumerate(log_predictions) if v != g]
        return torch.stack(pairs).mean()


def dino_loss(student: list[Tensor], teacher: list[Tensor], center: Tensor, student_temp: float,
              teacher_temp: float) -> Tensor:
    """:func:`distillation_loss` against the centred, sharpened teacher distributions of the global crops."""
    with full_precision(center.device.type):
        targets = [F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher]
        return distillation_loss(student, targets, student_temp)


class DINO(SSLMethod):
    """DINO: ``encoder -> DINOHead`` against the EMA ``teacher(encoder -> DINOHead)`` on the global crops.

    Args:
        encoder: the backbone; for a ViT with multi-crop, ``dynamic_img_size: true``.
        out_dim, hidden_dim, bottleneck_dim, head_layers, head_batch_norm, norm_last_layer: the head
            (:class:`~selfsup.models.heads.DINOHead`).
        global_crops: how many of the views (the first ones) are global crops, seen by the teacher.
        student_temp: temperature of the student's softmax.
        teacher_temp: temperature of the teacher's softmax (:class:`~selfsup.optim.Schedule`, logged).
        center_momentum: EMA momentum of the centre.
        teacher_momentum: EMA momentum of the teacher per optimizer step.
        freeze_last_layer_epochs: epochs during which the head's last layer gets no update.
        **base: optimizer and schedule settings of :class:`SSLMethod` (DINO's ``weight_decay`` is a
            ``Cosine(0.04, 0.4)`` schedule).
    """

    representation = "teacher"

    def __init__(self, encoder: Encoder, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 head_layers: int = 3, head_batch_norm: bool = False, norm_last_layer: bool = True,
                 global_crops: int = 2, student_temp: float = 0.1,
                 teacher_temp: Schedule | float = Constant(0.07, warmup_epochs=30, warmup_start=0.04),
                 center_momentum: float = 0.9, teacher_momentum: Schedule | float = Cosine(0.996, 1.0),
                 freeze_last_layer_epochs: float = 1.0, **base):
        super().__init__(encoder, **base)
        check_arg("global_crops", global_crops >= 1, global_crops, ">= 1 (the paper uses 2)")
        check_arg("student_temp", student_temp > 0, student_temp, "positive")
        check_arg("freeze_last_layer_epochs", freeze_last_layer_epochs >= 0, freeze_last_layer_epochs, ">= 0")
        tt = self.teacher_temp = as_schedule(teacher_temp, "model.teacher_temp")
        check_arg("teacher_temp", tt.start > 0 and (tt.end is None or tt.end > 0) and tt.warmup_start >= 0,
                  teacher_temp, "positive")
        self.head = DINOHead(encoder.embed_dim, out_dim, hidden_dim, bottleneck_dim, head_layers, head_batch_norm,
                             norm_last_layer)
        self.teacher = EMATeacher([self.encoder, self.head], teacher_momentum)
        self.center = Center(out_dim, center_momentum)
        self.global_crops, self.student_temp = global_crops, student_temp
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.hparams["teacher_momentum"] = schedule_config(self.teacher.momentum)  # plain data in checkpoints
        self.hparams["teacher_temp"] = schedule_config(self.teacher_temp)

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        views = batch.views
        if len(views) < max(2, self.global_crops):
            raise ValueError(f"DINO needs at least {max(2, self.global_crops)} views ({self.global_crops} global "
                             f"crops first), the batch has {len(views)}; use data.views: MultiCropViews")
        self.encoder.check_view_sizes(views)
        h = self.encode_views(views)
        student = self.head(torch.cat(h)).chunk(len(h))
        teacher = self.teacher(views[:self.global_crops])
        temperature = self.scheduled(self.teacher_temp)
        loss = dino_loss(list(student), teacher, self.center.center, self.student_temp, temperature)
        self.center.accumulate(torch.cat(teacher))
        with torch.no_grad(), full_precision(loss.device.type):  # ln K: uniform (collapsed); 0: one-hot
            p = F.softmax((teacher[0].float() - self.center.center) / temperature, dim=-1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": loss, "teacher_entropy": entropy, "teacher_temp": loss.new_tensor(temperature),
                "features": h[0].detach()}

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """The head's last layer gets no gradient, so no update, for ``freeze_last_layer_epochs``."""
        super().on_before_optimizer_step(optimizer)
        if self.global_step < round(self.freeze_last_layer_epochs * self.schedule_steps[1]):
            for p in self.head.last_layer.parameters():
                p.grad = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The step and the teacher's update (base class), then the centres': skipped steps leave them as they were."""
        super().optimizer_step(*args, **kwargs)
        for center in (m for m in self.children() if isinstance(m, Center)):
            if self.step_skipped:
                center.discard()
            else:
                center.update()
