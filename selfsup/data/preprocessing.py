"""Preprocessing: how images become encoder input, stated once per run and stored in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torchvision.transforms.v2 as T


@dataclass
class Preprocessing:
    """How images are turned into encoder input; stored in every checkpoint and used by evaluation.

    ``resize`` is ``"resize_center_crop"``: resize the short side to ``image_size / crop_pct``, then
    centre-crop ``image_size`` (timm's convention), with ``interpolation``.
    """

    image_size: int = 32
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    resize: str = "resize_center_crop"

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if self.image_size <= 0:
            raise ValueError(f"image_size={self.image_size} must be positive")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} must have the same length")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct={self.crop_pct} must be in (0, 1]")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def resize_to(self) -> int:
        """The short side the eval transform resizes to before its centre crop."""
        return round(self.image_size / self.crop_pct)

    def to_tensor(self) -> list[T.Transform]:
        """uint8 image -> normalised float tensor."""
        return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)]

    def eval_transform(self) -> T.Compose:
        """The deterministic transform used for probes, kNN and export."""
        resize_to = self.resize_to
        mode = T.InterpolationMode(self.interpolation)
        return T.Compose([T.ToImage(), T.Resize(resize_to, interpolation=mode, antialias=True),
                          T.CenterCrop(self.image_size), *self.to_tensor()[1:]])
