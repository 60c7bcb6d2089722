"""DINOv2: iBOT's two self-distillation losses with Sinkhorn-Knopp centering, the KoLeo regulariser and
layer-wise learning-rate decay.

Reference: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024 (ViT-L/16
on ImageNet-1k for 100 epochs, the reference README's short recipe: 81.6% kNN, 82.9% linear). Defaults on
top of :class:`~selfsup.methods.ibot.IBOT`'s: the teacher's class- and patch-token targets balanced by 3
Sinkhorn-Knopp iterations at the teacher temperature (over the global batch; for the patches, over the
masked tokens only) instead of a centre; KoLeo on the student's class tokens of each global crop, weight
0.1, summed over the crops; layer-wise lr decay 0.9 with the patch embedding's lr times 0.2; drop path
(the encoder's ``drop_path_rate``; the teacher runs without) and register tokens (timm's ``reg_tokens``)
come from the encoder's ``model_kwargs``.

Per step:
    m = blockwise masks for the global crops
    s_cls, s_patch = student(global crops, masked by m); s_cls += student(local crops); z = student cls tokens
    t_cls, t_patch = teacher(global crops)
    q_cls = sinkhorn(t_cls / tt);  q_patch = sinkhorn(t_patch[m] / tt_patch)
    loss = L_cls(q_cls, s_cls) + L_mim(q_patch, s_patch[m]) + koleo_weight * sum over global crops of KoLeo(z)
    with gram (DINOv3), once its phase has started:
    loss += gram.weight * gram_loss(student patch tokens, snapshot(global crops x gram.image_scale))

Departures: KoLeo's nearest neighbour is searched over the global batch (the reference: each rank's rows),
so that 2 ranks give what 1 process gives; the final norm shares the last block's learning rate (timm's
layer grouping). Left from the reference: its separate ``dino_head`` / ``ibot_head`` sizes per model, the
teacher's own drop path rate, and ``layerwise_decay`` on the heads. DINOv3's Gram anchoring is the ``gram``
option (:mod:`selfsup.methods.gram`, which lists what of the DINOv3 recipe it implements).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.distributed import gather_with_grad, rank
from selfsup.methods.common import check_arg, full_precision
from selfsup.methods.gram import GramAnchoring, GramTeacher, gram_loss
from selfsup.methods.ibot import IBOT
from selfsup.methods.swav import sinkhorn
from selfsup.models.encoder import Encoder
from selfsup.optim import layer_decay_scales

CENTERINGS = ("sinkhorn", "center")


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """The Kozachenko-Leonenko entropy estimator as a loss: ``-mean_i log(min_{j != i} |x_i - x_j| + eps)``
    over L2-normalised rows, in float32. It spreads the features uniformly on the sphere.

    The nearest neighbour is searched over the global batch (every rank's rows, gathered with gradient), so
    2 ranks of B rows give what 1 process of 2B gives. Guards against the reference's failure modes: a
    distance of ``sqrt(d^2 + eps^2)`` keeps duplicate rows finite with a zero gradient, and a global batch
    of one row (no neighbour) gives 0.
    """
    with full_precision(x.device.type):
        x = F.normalize(x.float(), dim=-1, eps=eps)
        everyone = gather_with_grad(x).flatten(0, 1)                     # (W * B, D)
        if everyone.shape[0] < 2:
            return x.sum() * 0.0
        rows = torch.arange(len(x), device=x.device)
        with torch.no_grad():
            similarity = x @ everyone.T
            similarity[rows, rows + rank() * len(x)] = -float("inf")     # not its own neighbour
            nearest = similarity.argmax(dim=1)
        distance = ((x - everyone[nearest]).pow(2).sum(-1) + eps ** 2).sqrt()
        return -torch.log(distance + eps).mean()


class DINOv2(IBOT):
    """DINOv2: :class:`IBOT` with Sinkhorn-Knopp centering, KoLeo and layer-wise lr decay (ViT encoders).

    Args:
        encoder: a timm ViT with a class token (``pool: token``); ``reg_tokens`` and ``drop_path_rate`` in
            its ``model_kwargs``; ``dynamic_img_size: true`` for local crops.
        koleo_weight: the weight of the KoLeo term (0.1).
        centering: ``sinkhorn`` (DINOv2) or ``center`` (iBOT's EMA centres).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        layer_decay: layer-wise learning-rate decay of the encoder (0.9; 1 turns it off).
        patch_embed_lr_mult: a further factor on the patch embedding's learning rate (0.2).
        gram: DINOv3's Gram anchoring (:class:`~selfsup.methods.gram.GramAnchoring`); ``None``: off.
        **ibot: :class:`IBOT`'s and :class:`~selfsup.methods.dino.DINO`'s settings.
    """

    def __init__(self, encoder: Encoder, koleo_weight: float = 0.1, centering: str = "sinkhorn",
                 sinkhorn_iterations: int = 3, layer_decay: float = 0.9, patch_embed_lr_mult: float = 0.2,
                 gram: GramAnchoring | None = None, **ibot):
        super().__init__(encoder, **ibot)
        check_arg("koleo_weight", koleo_weight >= 0, koleo_weight, ">= 0")
        check_arg("centering", centering in CENTERINGS, centering, f"one of {CENTERINGS}")
        check_arg("sinkhorn_iterations", sinkhorn_iterations >= 1, sinkhorn_iterations, ">= 1")
        check_arg("patch_embed_lr_mult", patch_embed_lr_mult > 0, patch_embed_lr_mult, "positive")
        self.koleo_weight, self.centering, self.sinkhorn_iterations = koleo_weight, centering, sinkhorn_iterations
        if centering == "sinkhorn":  # no EMA centres: none in checkpoints, no all-reduce of them per step
            self.center = self.patch_center = None
        self.lr_scales = layer_decay_scales(self.encoder.model, layer_decay, "encoder.model.",
                                            {"patch_embed": patch_embed_lr_mult})
        gram = GramAnchoring(**gram) if isinstance(gram, dict) else gram  # a checkpoint's hparams give a dict
        if gram is not None and gram.image_scale != 1 and not getattr(encoder.model, "dynamic_img_size", False):
            raise ValueError(f"model.gram.image_scale={gram.image_scale} needs an encoder with dynamic_img_size: true")
        self.gram_teacher = None if gram is None else GramTeacher(self.encoder, gram)
        if gram is not None:
            self.hparams["gram"] = dataclasses.asdict(gram)  # plain data in checkpoints

    def teacher_targets(self, t_cls: Tensor, t_patch: Tensor, masks: Tensor, temperature: float,
                        patch_temperature: float) -> tuple[Tensor, Tensor]:
        """Sinkhorn-Knopp targets: the class tokens of all global crops together, the masked patches only."""
        if self.centering == "center":
            return super().teacher_targets(t_cls, t_patch, masks, temperature, patch_temperature)
        # unit prototypes on a normalised bottleneck give cosines (<= 1); trained norms need the global max
        bound = None if self.head.last_layer.weight_g.requires_grad else 1.0
        cls = sinkhorn(t_cls, self.sinkhorn_iterations, temperature, max_score=bound)
        patch = sinkhorn(t_patch.flatten(0, 1), self.sinkhorn_iterations, patch_temperature,
                         weights=masks.flatten(), max_score=bound)
        return cls, patch.view_as(t_patch)

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        out, tokens = self.distill(batch)
        koleo = torch.stack([koleo_loss(z) for z in tokens[:, 0].chunk(self.global_crops)]).sum()
        out["loss"] = out["loss"] + self.koleo_weight * koleo
        out["koleo_loss"] = koleo.detach()
        if self.gram_teacher is not None:
            gram = self.gram_anchoring(batch, tokens[:, self.encoder.num_prefix_tokens:])
            out["loss"] = out["loss"] + self.gram_teacher.config.weight * gram
            out["gram_loss"] = gram.detach()
        return out

    def gram_anchoring(self, batch: Batch, student_patches: Tensor) -> Tensor:
        """The Gram loss of the student's patch tokens of its (masked) global crops against the Gram teacher
        on the same crops; 0, and no Gram teacher pass, before the Gram phase."""
        if not self.gram_teacher.active(self.global_step, self.schedule_steps[1]):
            return student_patches.sum() * 0.0
        crops = torch.cat(batch.views[:self.global_crops])
        grid = (crops.shape[-2] // self.encoder.patch_size, crops.shape[-1] // self.encoder.patch_size)
        return gram_loss(student_patches, self.gram_teacher.patch_features(crops, grid),
                         self.gram_teacher.config.remove_negative)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.refresh_gram_teacher()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The step, teacher and centres (parent classes), then the Gram teacher's snapshot for the next step;
        a skipped step takes none (the next real step takes it, from a teacher the skip left unchanged)."""
        step = self.trainer.global_step  # this step's index: Lightning counts the step after this hook
        super().optimizer_step(*args, **kwargs)
        if not self.step_skipped:
            self.refresh_gram_teacher(step + 1)

    def refresh_gram_teacher(self, step: int | None = None) -> None:
        """The snapshot of the EMA teacher's encoder due at optimizer step ``step`` (default: the current
        one; :class:`~selfsup.methods.gram.GramAnchoring`)."""
        if self.gram_teacher is not None:
            step = self.global_step if step is None else step
            self.gram_teacher.follow(self.teacher.copies[0], step, self.schedule_steps[1])
