"""DINOv3's Gram anchoring: keep the student's patch-similarity structure close to that of an earlier teacher.

Reference: Simeoni et al., "DINOv3", 2025 (section 4; ``facebookresearch/dinov3``, ``GramLoss`` and
``get_gram_teacher_output``). Per image, the Gram matrix of the L2-normalised patch features,
``G = X X^T`` (``N x N`` cosines), of the student (its masked global crops, after the final norm) is pulled
towards that of a *Gram teacher*: a frozen snapshot of the EMA teacher's encoder, taken when the Gram phase
starts and refreshed on a schedule. ``L_gram = mean over images and entries of (G_student - G_gram)^2``.
The high-resolution variant feeds the Gram teacher larger images and brings its patch features back to the
student's grid by bicubic interpolation, which gives it smoother, cleaner patch similarities.

The reference's ViT-7B recipe: the Gram phase from iteration 1.01M of a 1M-iteration pretraining, the
snapshot refreshed every 10k iterations at most 3 times, weight 2 (``loss_weight_schedule`` end), the Gram
teacher on 512 px crops for 256 px student crops, every patch token used (``tokens_used: all``), per image
(``img_level: true``), negative cosines kept.

Departures: the Gram teacher sees the student's global crops upsampled on the device by ``image_scale``
(the reference crops the image again at the larger size, so its Gram crops keep detail that the student's
resized crop has lost); the loss weight is a constant from ``start_epochs`` on (the reference ramps it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.common import check_arg, full_precision


def gram_loss(student: Tensor, teacher: Tensor, remove_negative: bool = False) -> Tensor:
    """Gram anchoring loss for patch features ``(B, N, D)`` (student) and ``(B, N, D')`` (Gram teacher):
    the mean squared difference of the per-image cosine-similarity matrices, in float32. With
    ``remove_negative`` negative cosines count as 0 in both matrices (the reference's ``remove_neg``)."""
    if student.shape[:2] != teacher.shape[:2] or student.ndim != 3:
        raise ValueError(f"gram_loss needs (B, N, D) features on the same patches, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    with full_precision(student.device.type):
        s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
        gram_s, gram_t = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
        if remove_negative:
            gram_s, gram_t = gram_s.clamp_min(0), gram_t.clamp_min(0)
        return (gram_s - gram_t).pow(2).mean()


@dataclass
class GramAnchoring:
    """When and how DINOv2 anchors its patch features to a Gram teacher (``model.gram`` in a recipe).

    Args:
        weight: the weight of the Gram loss once it is on (2 in the reference's Gram phase).
        start_epochs: when the Gram phase starts (epochs, fractions allowed): the first snapshot of the EMA
            teacher's encoder is taken then, and the loss counts from then on (0 before).
        refresh_epochs: the snapshot is taken again every ``refresh_epochs`` after the start (``None``:
            never refreshed).
        max_refreshes: at most this many refreshes after the first snapshot (``None``: unlimited).
        image_scale: the Gram teacher sees the global crops resized by this factor (2 in the reference's
            high-resolution Gram teacher; needs ``dynamic_img_size``); its patch features are interpolated
            back to the student's grid (bicubic).
        remove_negative: negative cosines count as 0 in both Gram matrices.
    """

    weight: float = 2.0
    start_epochs: float = 0.0
    refresh_epochs: float | None = None
    max_refreshes: int | None = None
    image_scale: float = 1.0
    remove_negative: bool = False

    def __post_init__(self) -> None:
        check_arg("gram.weight", self.weight >= 0, self.weight, ">= 0")
        check_arg("gram.start_epochs", self.start_epochs >= 0, self.start_epochs, ">= 0")
        check_arg("gram.refresh_epochs", self.refresh_epochs is None or self.refresh_epochs > 0,
                  self.refresh_epochs, "positive or null")
        check_arg("gram.max_refreshes", self.max_refreshes is None or self.max_refreshes >= 0,
                  self.max_refreshes, ">= 0 or null")
        check_arg("gram.image_scale", self.image_scale >= 1, self.image_scale, ">= 1")

    def snapshot_step(self, step: int, steps_per_epoch: int) -> int | None:
        """The step whose start took the snapshot in use at optimizer step ``step``; ``None`` before the
        Gram phase. A function of the step alone, so a resumed run takes the snapshots an unbroken one takes."""
        start = round(self.start_epochs * steps_per_epoch)
        if step < start:
            return None
        if self.refresh_epochs is None:
            return start
        every = max(1, round(self.refresh_epochs * steps_per_epoch))
        refreshes = (step - start) // every
        if self.max_refreshes is not None:
            refreshes = min(refreshes, self.max_refreshes)
        return start + refreshes * every


class GramTeacher(nn.Module):
    """A frozen copy of an encoder whose weights are set from the EMA teacher's at each snapshot step.

    ``taken_at`` (a buffer, in checkpoints) is the step of the snapshot in the weights, -1 before the first."""

    def __init__(self, encoder: nn.Module, config: GramAnchoring):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.config = config
        self.register_buffer("taken_at", torch.tensor(-1, dtype=torch.long))
        self._taken_at = -1  # the buffer's value on the host: read once after a load, not every step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._taken_at = int(self.taken_at)

    def active(self, step: int, steps_per_epoch: int) -> bool:
        """Whether the Gram loss counts at optimizer step ``step``."""
        return self.config.snapshot_step(step, steps_per_epoch) is not None

    @torch.no_grad()
    def follow(self, teacher_encoder: nn.Module, step: int, steps_per_epoch: int) -> None:
        """Take the snapshot due at ``step`` from ``teacher_encoder``, unless the weights already are that one.
        Called between optimizer steps (when training starts or resumes, and after each real step)."""
        due = self.config.snapshot_step(step, steps_per_epoch)
        if due is not None and due != self._taken_at:
            for kind in ("parameters", "buffers"):
                mine, theirs = list(getattr(self.encoder, kind)()), list(getattr(teacher_encoder, kind)())
                if mine:
                    torch._foreach_copy_(mine, theirs)
            self.taken_at.fill_(due)
            self._taken_at = due

    @torch.no_grad()
    def patch_features(self, crops: Tensor, grid: tuple[int, int]) -> Tensor:
        """The snapshot's patch tokens ``(B, h * w, D)`` of ``crops`` (resized by ``image_scale``), after its
        final norm, on the student's ``grid`` ``(h, w)``."""
        scale = self.config.image_scale
        if scale != 1:
            crops = F.interpolate(crops, scale_factor=scale, mode="bicubic", align_corners=False)
        self.encoder.eval()
        tokens = self.encoder.forward_tokens(crops)[:, self.encoder.num_prefix_tokens:]
        side = (crops.shape[-2] // self.encoder.patch_size, crops.shape[-1] // self.encoder.patch_size)
        if side != tuple(grid):
            maps = tokens.transpose(1, 2).unflatten(-1, side)
            tokens = F.interpolate(maps, size=tuple(grid), mode="bicubic", align_corners=False).flatten(2)
            tokens = tokens.transpose(1, 2)
        return tokens
