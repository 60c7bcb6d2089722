"""View transforms: how one image becomes the list of views a method trains on.

Every transform here is configured by its ``__init__`` (and so by the recipe YAML). The data
module then calls :meth:`ViewTransform.bind` with the run's :class:`Preprocessing`, which supplies
the image size and normalisation, so both are stated once per run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torchvision.transforms.v2 as T
from torch import Tensor

Range = tuple[float, float]


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

    def to_tensor(self) -> list[T.Transform]:
        """uint8 image -> normalised float tensor."""
        return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)]

    def eval_transform(self) -> T.Compose:
        """The deterministic transform used for probes, kNN and export."""
        resize_to = round(self.image_size / self.crop_pct)
        mode = T.InterpolationMode(self.interpolation)
        return T.Compose([T.ToImage(), T.Resize(resize_to, interpolation=mode, antialias=True),
                          T.CenterCrop(self.image_size), *self.to_tensor()[1:]])


class ViewTransform:
    """Base class: maps one image to a list of view tensors."""

    def bind(self, preprocessing: Preprocessing) -> None:
        """Receive the run's preprocessing before the first call."""
        raise NotImplementedError

    def __call__(self, image: Any) -> list[Tensor]:
        raise NotImplementedError


def _check_scale(name: str, scale: Range) -> None:
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"{name}={tuple(scale)} must satisfy 0 < low <= high <= 1")


def augmentation(size: int, scale: Range, jitter_strength: float, jitter_p: float, grayscale_p: float,
                 blur_p: float, flip_p: float = 0.5) -> list[T.Transform]:
    """The SimCLR augmentation family: crop, flip, colour distortion, grayscale and blur."""
    s = jitter_strength
    ops: list[T.Transform] = [T.ToImage(), T.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
                              T.RandomHorizontalFlip(flip_p)]
    if jitter_p > 0 and s > 0:
        ops.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=jitter_p))
    if grayscale_p > 0:
        ops.append(T.RandomGrayscale(grayscale_p))
    if blur_p > 0:
        kernel = max(3, (size // 10) | 1)  # about 10% of the image, odd
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
    return ops


class ContrastiveViews(ViewTransform):
    """``num_views`` independent SimCLR-style augmentations of the same image.

    Defaults follow SimCLR (Chen et al. 2020) with the small-image changes used for CIFAR:
    blur off and a crop scale floor of 0.08.
    """

    def __init__(self, num_views: int = 2, crop_scale: Range = (0.08, 1.0), jitter_strength: float = 0.5,
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: float = 0.0,
                 image_size: int | None = None):
        if num_views < 2:
            raise ValueError(f"num_views={num_views} must be at least 2 for a contrastive loss")
        _check_scale("crop_scale", crop_scale)
        self.num_views, self.image_size = num_views, image_size
        self.params = dict(scale=tuple(crop_scale), jitter_strength=jitter_strength, jitter_p=jitter_p,
                           grayscale_p=grayscale_p, blur_p=blur_p)
        self.pipeline: T.Compose | None = None

    def bind(self, preprocessing: Preprocessing) -> None:
        size = self.image_size or preprocessing.image_size
        self.pipeline = T.Compose(augmentation(size, **self.params) + preprocessing.to_tensor()[1:])

    def __call__(self, image: Any) -> list[Tensor]:
        if self.pipeline is None:
            raise RuntimeError("ContrastiveViews.bind(preprocessing) must be called before use")
        return [self.pipeline(image) for _ in range(self.num_views)]


@dataclass
class EvalView(ViewTransform):
    """One deterministic view (the eval transform), for probes and feature extraction."""

    pipeline: Any = field(default=None)

    def bind(self, preprocessing: Preprocessing) -> None:
        self.pipeline = preprocessing.eval_transform()

    def __call__(self, image: Any) -> list[Tensor]:
        return [self.pipeline(image)]
