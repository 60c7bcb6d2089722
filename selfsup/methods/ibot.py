"""iBOT: DINO's class-token self-distillation plus masked image modeling with an online tokenizer.

Reference: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022 (ViT-S/16, 800
epochs: 77.9% ImageNet linear, 75.2% kNN; ViT-B/16, 400 epochs: 79.5% linear, 77.1% kNN). Paper defaults on
top of DINO's: the student sees its global crops with blockwise-masked patches (BEiT's masking; in the
multi-crop runs half the crops are masked, each at a ratio uniform in [0.1, 0.5], ``--pred_ratio 0 0.3
--pred_ratio_var 0 0.2``), the teacher the unmasked crops; the patch tokens of the masked positions
are distilled from the teacher's patch tokens of the same crop through the head's MLP and a second
weight-normalised prototype layer (8192 patch prototypes; the README's commands share the class token's,
``shared_head: true``) with a centre of their own; both losses weigh 1; teacher patch temperature warmed up 0.04 -> 0.07 like the class token's.

Per step:
    m = blockwise masks for the global crops
    s_cls, s_patch = student(global crops, masked by m); s_cls += student(local crops)
    t_cls, t_patch = teacher(global crops)                         no mask, no gradient
    L_cls = DINO's loss between t_cls and s_cls (every crop against every other global crop)
    L_mim = mean over global crops g, images i of  mean over masked patches p of
                H(softmax((t_patch[g,i,p] - c_patch) / tt_patch), softmax(s_patch[g,i,p] / ts))
    loss = cls_weight * L_cls + patch_weight * L_mim;  both centres updated after the optimizer step

Left from the reference: the teacher's shared last layer under ``shared_head_teacher`` (here the teacher is
an EMA of the student's own structure) and ``pred_start_epoch`` (masking starts at step 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.data.datamodule import Batch
from selfsup.methods.common import check_arg, full_precision
from selfsup.methods.dino import DINO, distillation_loss
from selfsup.models.encoder import Encoder
from selfsup.models.heads import WeightNormLinear
from selfsup.models.masking import blockwise_mask
from selfsup.models.teacher import Center
from selfsup.optim import Constant, Schedule, as_schedule, schedule_config


def masked_patch_loss(student: Tensor, targets: Tensor, mask: Tensor, student_temp: float) -> Tensor:
    """Masked patch distillation for one crop, in float32: per image, the mean over its masked patches of
    the cross-entropy from the teacher's patch distribution ``targets`` to the student's; then the mean over
    images (an image without masked patches counts 0). ``student``/``targets`` ``(B, N, K)``, ``mask``
    ``(B, N)`` 1 where masked."""
    with full_precision(student.device.type):
        ce = -(targets.float() * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1)
        mask = mask.float()
        return ((ce * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()


def ibot_patch_loss(student: Tensor, teacher: Tensor, mask: Tensor, center: Tensor, student_temp: float,
                    teacher_temp: float) -> Tensor:
    """iBOT's :func:`masked_patch_loss` against the centred, sharpened teacher patch distribution."""
    with full_precision(center.device.type):
        targets = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
        return masked_patch_loss(student, targets, mask, student_temp)


class IBOT(DINO):
    """iBOT: :class:`DINO` on the class token plus masked patch-token distillation (ViT encoders only).

    Args:
        encoder: a timm ViT with a class token (``pool: token``); ``dynamic_img_size: true`` for local crops.
        patch_out_dim: patch prototypes (8192 in the paper); ignored with ``shared_head``.
        shared_head: the patch tokens use the class token's prototype layer too (the head's MLP is always
            shared).
        cls_weight, patch_weight: the weights of the two losses (1 and 1).
        teacher_patch_temp: the teacher's patch temperature (:class:`~selfsup.optim.Schedule`, logged).
        patch_center_momentum: EMA momentum of the patch centre.
        mask_ratio: the range of the per-image masked fraction of a global crop's patches.
        mask_probability: the share of global crops masked at all (0.5 in iBOT's multi-crop runs and DINOv2).
        **dino: :class:`DINO`'s head, temperatures, momentum and optimizer settings.
    """

    encodes_views = False  # global crops go through the masked token path

    def __init__(self, encoder: Encoder, patch_out_dim: int = 8192, shared_head: bool = False,
                 cls_weight: float = 1.0, patch_weight: float = 1.0,
                 teacher_patch_temp: Schedule | float = Constant(0.07, warmup_epochs=30, warmup_start=0.04),
                 patch_center_momentum: float = 0.9, mask_ratio: tuple[float, float] = (0.1, 0.5),
                 mask_probability: float = 0.5, **dino):
        if not encoder.is_vit or not hasattr(encoder.model, "blocks") or encoder.num_prefix_tokens < 1 or \
                getattr(encoder.model, "global_pool", "token") != "token":
            pool = getattr(encoder.model, "global_pool", None)
            raise ValueError(f"{type(self).__name__} needs a timm ViT with a class token and pool: token, not "
                             f"{encoder.config['name']!r} (global_pool={pool!r})")
        super().__init__(encoder, **dino)
        check_arg("cls_weight", cls_weight >= 0, cls_weight, ">= 0")
        check_arg("patch_weight", patch_weight >= 0, patch_weight, ">= 0")
        check_arg("mask_ratio", len(mask_ratio) == 2 and 0 <= mask_ratio[0] <= mask_ratio[1] < 1, list(mask_ratio),
                  "a range [low, high] with 0 <= low <= high < 1")
        check_arg("mask_probability", 0 <= mask_probability <= 1, mask_probability, "in [0, 1]")
        tt = self.teacher_patch_temp = as_schedule(teacher_patch_temp, "model.teacher_patch_temp")
        check_arg("teacher_patch_temp", tt.start > 0 and (tt.end is None or tt.end > 0) and tt.warmup_start >= 0,
                  teacher_patch_temp, "positive")
        bottleneck = self.head.last_layer.weight_v.shape[1]
        out_dim = self.head.last_layer.weight_v.shape[0] if shared_head else patch_out_dim
        self.patch_layer = self.head.last_layer if shared_head else \
            WeightNormLinear(bottleneck, out_dim, train_norm=self.head.last_layer.weight_g.requires_grad)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.model.patch_embed.proj.out_channels))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if not shared_head:
            self.teacher.follow(self.patch_layer)
        self.patch_center = Center(out_dim, patch_center_momentum)
        self.cls_weight, self.patch_weight = cls_weight, patch_weight
        self.mask_ratio, self.mask_probability = tuple(mask_ratio), mask_probability
        self.hparams["teacher_patch_temp"] = schedule_config(self.teacher_patch_temp)

    def no_weight_decay(self) -> set[str]:
        """The mask token: a learned input, not a weight to shrink (as SimMIM's)."""
        return {"mask_token"}

    def tokens_to_logits(self, tokens: Tensor, head: nn.Module, patch_layer: nn.Module) -> tuple[Tensor, Tensor]:
        """Class-token and patch-token prototype scores ``(B, K)``, ``(B, N, K')`` from encoder tokens."""
        prefix = self.encoder.num_prefix_tokens
        return head(tokens[:, 0]), patch_layer(head.project(tokens[:, prefix:]))

    def teacher_targets(self, t_cls: Tensor, t_patch: Tensor, masks: Tensor, temperature: float,
                        patch_temperature: float) -> tuple[Tensor, Tensor]:
        """The teacher's class-token ``(G*B, K)`` and patch-token ``(G*B, N, K')`` distributions: centred and
        sharpened (the centres take this step's outputs); DINOv2 overrides it with Sinkhorn-Knopp."""
        with full_precision(t_cls.device.type):
            cls = F.softmax((t_cls.float() - self.center.center) / temperature, dim=-1)
            patch = F.softmax((t_patch.float() - self.patch_center.center) / patch_temperature, dim=-1)
        self.center.accumulate(t_cls)
        self.patch_center.accumulate(t_patch.flatten(0, 1))
        return cls, patch

    def distill(self, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
        """The two losses and the logged terms, and the student's tokens of the masked global crops
        ``(G*B, prefix + N, D)`` (DINOv2 adds its KoLeo term on their class tokens)."""
        views, g = batch.views, self.global_crops
        if len(views) < max(2, g):
            raise ValueError(f"{type(self).__name__} needs at least {max(2, g)} views ({g} global crops first), "
                             f"the batch has {len(views)}; use data.views: MultiCropViews")
        self.encoder.check_view_sizes(views)
        grid = views[0].shape[-2] // self.encoder.patch_size, views[0].shape[-1] // self.encoder.patch_size
        masks = torch.cat([blockwise_mask(len(views[0]), grid, self.mask_ratio, self.mask_probability,
                                          device=views[0].device) for _ in range(g)]).flatten(1)
        crops = torch.cat(views[:g])  # the global crops: masked for the student, whole for the teacher
        tokens = self.encoder.encode_masked(crops, masks, self.mask_token)
        s_cls, s_patch = self.tokens_to_logits(tokens, self.head, self.patch_layer)
        s_cls = list(s_cls.chunk(g)) + [self.head(h) for h in self.encoder.encode_views(views[g:])]
        with torch.no_grad(), self.teacher.deterministic():
            t_encoder, t_head = self.teacher.copies[0], self.teacher.copies[1]
            t_patch_layer = self.teacher.copies[2] if len(self.teacher.copies) > 2 else t_head.last_layer
            t_tokens = t_encoder.forward_tokens(crops)
            t_cls, t_patch = self.tokens_to_logits(t_tokens, t_head, t_patch_layer)
        temperature = self.scheduled(self.teacher_temp)
        cls_targets, patch_targets = self.teacher_targets(t_cls, t_patch, masks, temperature,
                                                          self.scheduled(self.teacher_patch_temp))
        cls_loss = distillation_loss(s_cls, list(cls_targets.chunk(g)), self.student_temp)
        patch_loss = torch.stack([masked_patch_loss(s, t, m, self.student_temp) for s, t, m in
                                  zip(s_patch.chunk(g), patch_targets.chunk(g), masks.chunk(g))]).mean()
        loss = self.cls_weight * cls_loss + self.patch_weight * patch_loss
        return {"loss": loss, "cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach(),
                "masked_fraction": masks.float().mean(), "teacher_temp": loss.new_tensor(temperature),
                "features": t_tokens[:len(views[0]), 0].detach()}, tokens

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        return self.distill(batch)[0]
