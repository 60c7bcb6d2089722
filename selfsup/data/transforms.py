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
import torchvision.transforms.v2.functional as F
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


def _check_augmentation(jitter_strength: float = 0.0, **probabilities: float) -> None:
    for name, p in probabilities.items():
        if not 0 <= p <= 1:
            raise ValueError(f"{name}={p} must be a probability in [0, 1]")
    if not 0 <= jitter_strength <= 2.5:  # hue jitter is 0.2 * strength, and hue shifts stop at half a turn
        raise ValueError(f"jitter_strength={jitter_strength} must be in [0, 2.5]")


class Augmentation:
    """The SimCLR augmentation family for one image: random resized crop, horizontal flip, colour jitter,
    grayscale and Gaussian blur, then the conversion to a normalised float tensor.

    The transforms are torchvision v2's, and so are the random draws: each step asks its v2 transform for
    its parameters (``make_params``) and calls its kernel, in ``T.Compose`` order. The output equals, for the
    same seed, ``T.Compose([ToImage(), RandomResizedCrop, RandomHorizontalFlip, RandomApply([ColorJitter]),
    RandomGrayscale, RandomApply([GaussianBlur]), ToDtype, Normalize])`` tensor for tensor
    (``tests/data/test_augmentation.py``). What it leaves out is v2's per-call input handling (pytree
    flattening, type checks, dispatch), which on small crops costs more than the kernels: a SwAV crop of a
    28 px image takes about 260 us instead of 390 (``benchmarks/augmentation.py``, one thread). Set a
    probability or the jitter strength to 0 to drop a step.
    """

    def __init__(self, size: int, scale: Range, jitter_strength: float, jitter_p: float, grayscale_p: float,
                 blur_p: float, flip_p: float = 0.5, mean: tuple[float, ...] = Preprocessing.mean,
                 std: tuple[float, ...] = Preprocessing.std, interpolation: str = "bilinear"):
        _check_augmentation(jitter_strength, jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur_p, flip_p=flip_p)
        s = jitter_strength
        self.interpolation = T.InterpolationMode(interpolation)
        self.crop = T.RandomResizedCrop(size, scale=tuple(scale), interpolation=self.interpolation, antialias=True)
        self.flip_p, self.jitter_p, self.grayscale_p, self.blur_p = flip_p, jitter_p, grayscale_p, blur_p
        self.jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s) if jitter_p > 0 and s > 0 else None
        self.blur = T.GaussianBlur(max(3, (size // 10) | 1), sigma=(0.1, 2.0))  # about 10% of the image, odd
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Any) -> Tensor:
        x = F.to_image(image).as_subclass(Tensor)
        x = F.resized_crop(x, **self.crop.make_params([x]), size=self.crop.size, interpolation=self.interpolation,
                           antialias=True)
        if torch.rand(1) < self.flip_p:
            x = F.horizontal_flip(x)
        if self.jitter is not None and torch.rand(1) < self.jitter_p:
            x = self.jitter.transform(x, self.jitter.make_params([x]))
        if self.grayscale_p > 0 and torch.rand(1) < self.grayscale_p:
            x = F.rgb_to_grayscale(x, num_output_channels=x.shape[-3])
        if self.blur_p > 0 and torch.rand(1) < self.blur_p:
            x = F.gaussian_blur(x, self.blur.kernel_size, **self.blur.make_params([x]))
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)


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
        augment = dict(jitter_strength=jitter_strength, jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur_p)
        _check_augmentation(**augment)
        self.num_views, self.image_size = num_views, image_size
        self.params = dict(scale=tuple(crop_scale), **augment)
        self.pipeline: Augmentation | None = None

    def bind(self, preprocessing: Preprocessing) -> None:
        size = self.image_size or preprocessing.image_size
        self.pipeline = Augmentation(size, **self.params, mean=preprocessing.mean, std=preprocessing.std)

    def __call__(self, image: Any) -> list[Tensor]:
        if self.pipeline is None:
            raise RuntimeError("ContrastiveViews.bind(preprocessing) must be called before use")
        return [self.pipeline(image) for _ in range(self.num_views)]


@dataclass
class Crops:
    """``count`` random resized crops of ``size`` pixels covering ``scale`` of the image area.

    In YAML: ``{count: 2, size: 224, scale: [0.14, 1.0]}``.
    """

    count: int
    size: int
    scale: Range

    def check(self, name: str) -> None:
        if self.count < 0 or self.size <= 0:
            raise ValueError(f"{name}: count={self.count} must be >= 0 and size={self.size} positive")
        _check_scale(f"{name}.scale", self.scale)


class MultiCropViews(ViewTransform):
    """Multi-crop (Caron et al. 2020, SwAV): a few large global crops and several small local crops.

    The views are the global crops first, then the local crops, so each resolution is one contiguous
    group and the method's encoder runs once per resolution. Paper defaults: 2x224 at scale
    (0.14, 1) and 6x96 at (0.05, 0.14); colour jitter (strength 1.0, p=0.8), grayscale (p=0.2) and
    Gaussian blur (p=0.5) on every crop. ``local_crops: {count: 0, ...}`` turns multi-crop off.

    On small images scale the local crops up: on 28 px Fashion-MNIST, (0.05, 0.14) cuts 6-10 px regions
    that say little about the garment; ``recipes/demo/swav.yaml`` uses (0.14, 0.4) and records what it
    changes.
    """

    def __init__(self, global_crops: Crops = Crops(2, 224, (0.14, 1.0)),
                 local_crops: Crops = Crops(6, 96, (0.05, 0.14)), jitter_strength: float = 1.0,
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: float = 0.5):
        global_crops, local_crops = _as_crops(global_crops), _as_crops(local_crops)
        global_crops.check("global_crops")
        local_crops.check("local_crops")
        if global_crops.count < 1:
            raise ValueError(f"global_crops.count={global_crops.count}: multi-crop needs at least one global "
                             "crop (the paper uses 2)")
        self.global_crops, self.local_crops = global_crops, local_crops
        self.params = dict(jitter_strength=jitter_strength, jitter_p=jitter_p, grayscale_p=grayscale_p,
                           blur_p=blur_p)
        _check_augmentation(**self.params)
        self.pipelines: list[Augmentation] | None = None

    @property
    def num_views(self) -> int:
        return self.global_crops.count + self.local_crops.count

    def bind(self, preprocessing: Preprocessing) -> None:
        self.pipelines = [Augmentation(crops.size, tuple(crops.scale), **self.params, mean=preprocessing.mean,
                                       std=preprocessing.std)
                          for crops in (self.global_crops, self.local_crops) if crops.count]

    def __call__(self, image: Any) -> list[Tensor]:
        if self.pipelines is None:
            raise RuntimeError("MultiCropViews.bind(preprocessing) must be called before use")
        counts = [c.count for c in (self.global_crops, self.local_crops) if c.count]
        return [pipeline(image) for pipeline, count in zip(self.pipelines, counts) for _ in range(count)]


def _as_crops(crops: Crops | dict[str, Any]) -> Crops:
    return Crops(**crops) if isinstance(crops, dict) else Crops(crops.count, crops.size, tuple(crops.scale))


class MaskedImageView(ViewTransform):
    """One lightly augmented view for masked image modeling: random resized crop and flip only.

    MAE uses ``crop_scale=(0.2, 1.0)``; SimMIM ``(0.67, 1.0)``. Masking happens in the method. The crops
    are resized with the run's ``Preprocessing.interpolation`` (bicubic in the MAE and SimMIM recipes, as
    both papers' ``RandomResizedCrop(..., interpolation=3)``), the same mode the eval transform uses.
    """

    def __init__(self, crop_scale: Range = (0.2, 1.0), flip_p: float = 0.5, image_size: int | None = None):
        _check_scale("crop_scale", crop_scale)
        _check_augmentation(flip_p=flip_p)
        self.crop_scale, self.flip_p, self.image_size = tuple(crop_scale), flip_p, image_size
        self.pipeline: Augmentation | None = None

    def bind(self, preprocessing: Preprocessing) -> None:
        size = self.image_size or preprocessing.image_size
        self.pipeline = Augmentation(size, self.crop_scale, 0.0, 0.0, 0.0, 0.0, self.flip_p,
                                     mean=preprocessing.mean, std=preprocessing.std,
                                     interpolation=preprocessing.interpolation)

    def __call__(self, image: Any) -> list[Tensor]:
        if self.pipeline is None:
            raise RuntimeError("MaskedImageView.bind(preprocessing) must be called before use")
        return [self.pipeline(image)]


@dataclass
class EvalView(ViewTransform):
    """One deterministic view (the eval transform), for probes and feature extraction."""

    pipeline: Any = field(default=None)

    def bind(self, preprocessing: Preprocessing) -> None:
        self.pipeline = preprocessing.eval_transform()

    def __call__(self, image: Any) -> list[Tensor]:
        return [self.pipeline(image)]
