"""View transforms: how one image becomes the list of views a method trains on.

Every transform here is configured by its ``__init__`` (and so by the recipe YAML). The data
module then calls :meth:`ViewTransform.bind` with the run's :class:`Preprocessing`, which supplies
the image size and normalisation, so both are stated once per run.

Loader workers only decode, crop, resize and flip: training views leave them as uint8 (a quarter of the
bytes of float32) with their colour parameters, and :mod:`selfsup.data.augment` finishes them batched on
the training device (``SSLDataModule(device_augment=True)``, the default) or they are finished here per
sample (``device_augment=False``); normalisation always happens on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from torch import Tensor

from selfsup.data.augment import BLUR_SIGMA, GRAYSCALE, IDENTITY, SOLARIZE, SOLARIZE_THRESHOLD, blur_kernel_size
from selfsup.data import datasets  # datasets.decode_image looked up at call time (tests record failed decodes)
from selfsup.data.preprocessing import Preprocessing

Range = tuple[float, float]


class ViewTransform:
    """Base class: maps one image to a list of view tensors."""

    #: set by the data module before :meth:`bind`: leave the colour steps to the training device (a transform
    #: that has none, or always applies them itself, may ignore it)
    device_augment: bool = False

    def bind(self, preprocessing: Preprocessing) -> None:
        """Receive the run's preprocessing before the first call."""
        raise NotImplementedError

    def __call__(self, image: Any) -> list[Tensor] | Views:
        """``image`` is a uint8 tensor ``(C, H, W)`` or a PIL image, possibly opened but not yet decoded
        (:func:`selfsup.data.datasets.decode_image` decodes it and raises ``UnreadableImage`` on a bad file).
        Training views are uint8 (normalised on the device); float views pass through unchanged."""
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


@dataclass
class Draw:
    """The random parameters of one view, drawn on a loader worker from the sample's seed.

    ``box`` is ``(top, left, height, width)`` of the crop in the full-resolution image; ``colour`` is the
    view's :data:`~selfsup.data.augment.COLOUR_FIELDS` vector (identity values where a step is not applied)."""

    box: tuple[int, int, int, int]
    flip: bool
    colour: Tensor


class Augmentation:
    """The SimCLR augmentation family for one image: random resized crop, horizontal flip, colour jitter,
    grayscale, Gaussian blur and solarisation, in that order (solarisation as in BYOL, threshold 128 of 255).

    The transforms are torchvision v2's, and so are the random draws: each step asks its v2 transform for
    its parameters (``make_params``), in ``T.Compose`` order. :meth:`draw` makes every draw of a view from
    the image's size alone (before decoding), :meth:`geometry` crops, resizes and flips on the worker, and
    the colour steps run either on the worker (:meth:`colour`, torchvision's uint8 kernels) or batched on
    the training device (:func:`selfsup.data.augment.augment_on_device`, the same parameters). ``__call__``
    is the whole per-sample pipeline and equals, for the same seed, ``T.Compose([ToImage(),
    RandomResizedCrop, RandomHorizontalFlip, RandomApply([ColorJitter]), RandomGrayscale,
    RandomApply([GaussianBlur]), ToDtype, Normalize])`` tensor for tensor (``tests/data/test_augmentation.py``).
    Set a probability or the jitter strength to 0 to drop a step.
    """

    def __init__(self, size: int, scale: Range, jitter_strength: float, jitter_p: float, grayscale_p: float,
                 blur_p: float, flip_p: float = 0.5, mean: tuple[float, ...] = Preprocessing.mean,
                 std: tuple[float, ...] = Preprocessing.std, interpolation: str = "bilinear",
                 solarize_p: float = 0.0):
        _check_augmentation(jitter_strength, jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur_p,
                            flip_p=flip_p, solarize_p=solarize_p)
        s = jitter_strength
        self.size = size
        self.interpolation = T.InterpolationMode(interpolation)
        self.crop = T.RandomResizedCrop(size, scale=tuple(scale), interpolation=self.interpolation, antialias=True)
        self.flip_p, self.jitter_p, self.grayscale_p, self.blur_p = flip_p, jitter_p, grayscale_p, blur_p
        self.solarize_p = solarize_p
        self.jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s) if jitter_p > 0 and s > 0 else None
        self.blur = T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))
        self.mean, self.std = list(mean), list(std)

    @property
    def has_colour(self) -> bool:
        """Whether any colour step can apply (else the views need no colour parameters at all)."""
        return self.jitter is not None or self.grayscale_p > 0 or self.blur_p > 0 or self.solarize_p > 0

    def draw(self, image: Any) -> Draw:
        """Every random draw of one view; ``image`` is only asked its size (a lazily opened file is not decoded)."""
        box = self.crop.make_params([image])
        flip = bool(torch.rand(1) < self.flip_p)
        colour = list(IDENTITY)
        if self.jitter is not None and torch.rand(1) < self.jitter_p:
            p = self.jitter.make_params([image])
            factors = (p["brightness_factor"], p["contrast_factor"], p["saturation_factor"], p["hue_factor"])
            colour[:4] = [identity if f is None else f for f, identity in zip(factors, IDENTITY)]
            colour[4:8] = p["fn_idx"].tolist()
        if self.grayscale_p > 0 and torch.rand(1) < self.grayscale_p:
            colour[GRAYSCALE] = 1.0
        if self.blur_p > 0 and torch.rand(1) < self.blur_p:
            colour[BLUR_SIGMA] = self.blur.make_params([image])["sigma"][0]
        if self.solarize_p > 0 and torch.rand(1) < self.solarize_p:
            colour[SOLARIZE] = 1.0
        return Draw((box["top"], box["left"], box["height"], box["width"]), flip,
                    torch.tensor(colour, dtype=torch.float32))

    def geometry(self, image: Tensor, draw: Draw, scale: tuple[float, float] = (1.0, 1.0)) -> Tensor:
        """Crop, resize and flip a uint8 ``(C, H, W)`` image. ``scale`` is ``(height, width)`` of the decoded
        image over the full-resolution one, below 1 for a JPEG decoded at reduced size."""
        top, left, height, width = draw.box
        sy, sx = scale
        if scale != (1.0, 1.0):
            top, left = round(top * sy), round(left * sx)
            height = max(1, min(round(height * sy), image.shape[-2] - top))
            width = max(1, min(round(width * sx), image.shape[-1] - left))
        x = F.resized_crop(image, top, left, height, width, size=self.crop.size, interpolation=self.interpolation,
                           antialias=True)
        return F.horizontal_flip(x) if draw.flip else x

    def colour(self, x: Tensor, draw: Draw) -> Tensor:
        """The colour steps on one uint8 view, with torchvision's kernels (the ``device_augment: false`` path)."""
        c = draw.colour.tolist()
        if c[:8] != list(IDENTITY[:8]):
            params = dict(fn_idx=torch.tensor(c[4:8], dtype=torch.long), brightness_factor=c[0],
                          contrast_factor=c[1], saturation_factor=c[2], hue_factor=c[3])
            x = self.jitter.transform(x, params)
        if c[GRAYSCALE]:
            x = F.rgb_to_grayscale(x, num_output_channels=x.shape[-3])
        if c[BLUR_SIGMA]:
            x = F.gaussian_blur(x, self.blur.kernel_size, [c[BLUR_SIGMA], c[BLUR_SIGMA]])
        if c[SOLARIZE]:
            x = F.solarize(x, threshold=SOLARIZE_THRESHOLD * 255)
        return x

    def __call__(self, image: Any) -> Tensor:
        """The whole pipeline on one image, on this CPU: a normalised float tensor."""
        x = F.to_image(image).as_subclass(Tensor)
        draw = self.draw(x)
        x = self.colour(self.geometry(x, draw), draw)
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)


class Views(NamedTuple):
    """What a training view transform returns: uint8 views and, per view, the colour parameters the device
    applies after the transfer (``None`` where the worker applied them, or the view has no colour steps)."""

    images: list[Tensor]
    colour: list[Tensor | None]


class AugmentedViews(ViewTransform):
    """Views made of :class:`Augmentation` groups: ``(augmentation, count)`` pairs, views in group order.

    One call draws every view's parameters from the image's size, decodes the image once (a JPEG at the
    smallest size that still gives every crop at least its output resolution), then crops, resizes and
    flips each view. With ``device_augment`` the colour steps are left to the training device
    (:mod:`selfsup.data.augment`), which applies the same drawn parameters to the whole batch at once;
    else the worker applies them here. Either way the views leave the worker as uint8."""

    groups: list[tuple[Augmentation, int]] | None = None

    def make_groups(self, preprocessing: Preprocessing) -> list[tuple[Augmentation, int]]:
        raise NotImplementedError

    def bind(self, preprocessing: Preprocessing) -> None:
        self.groups = self.make_groups(preprocessing)

    def __call__(self, image: Any) -> Views:
        if self.groups is None:
            raise RuntimeError(f"{type(self).__name__}.bind(preprocessing) must be called before use")
        plan = [(aug, aug.draw(image)) for aug, count in self.groups for _ in range(count)]
        decoded, scale = _decode_for(image, plan)
        images, colour = [], []
        for aug, draw in plan:
            x = aug.geometry(decoded, draw, scale)
            on_device = self.device_augment and aug.has_colour
            images.append(aug.colour(x, draw) if aug.has_colour and not on_device else x)
            colour.append(draw.colour if on_device else None)
        return Views(images, colour)


# A JPEG is decoded at reduced size only while every crop keeps at least DRAFT_MARGIN times its output
# resolution, so the final antialiased resize still does the downscaling (DCT scaling alone is coarser).
DRAFT_MARGIN = 2.0


def _decode_at(image: Any, fraction: float) -> Tensor:
    """Decode ``image`` at no less than ``fraction`` of its size per side (a tensor passes through)."""
    if isinstance(image, Tensor):
        return image
    width, height = image.size
    fraction *= DRAFT_MARGIN
    min_size = (math.ceil(width * fraction), math.ceil(height * fraction)) if fraction < 1 else None
    return datasets.decode_image(image, min_size=min_size)


def _decode_for(image: Any, plan: list[tuple[Augmentation, Draw]]) -> tuple[Tensor, tuple[float, float]]:
    """The image as a uint8 tensor, a lazily opened JPEG decoded at reduced size where every crop of ``plan``
    allows it; returns it with its ``(height, width)`` scale against the full size."""
    height, width = F.get_size(image)
    decoded = _decode_at(image, max(max(aug.size / draw.box[2], aug.size / draw.box[3]) for aug, draw in plan))
    return decoded, (decoded.shape[-2] / height, decoded.shape[-1] / width)


PerView = float | list[float]


class ContrastiveViews(AugmentedViews):
    """``num_views`` SimCLR-style augmentations of the same image.

    Defaults follow SimCLR (Chen et al. 2020) with the small-image changes used for CIFAR:
    blur off and a crop scale floor of 0.08. ``solarize_p`` adds BYOL's solarisation (off by default).
    Each probability (``jitter_p``, ``grayscale_p``, ``blur_p``, ``solarize_p``) is one number for every
    view or a list with one per view: BYOL's asymmetric views are ``blur_p: [1.0, 0.1]``,
    ``solarize_p: [0.0, 0.2]``.
    """

    def __init__(self, num_views: int = 2, crop_scale: Range = (0.08, 1.0), jitter_strength: float = 0.5,
                 jitter_p: PerView = 0.8, grayscale_p: PerView = 0.2, blur_p: PerView = 0.0,
                 image_size: int | None = None, solarize_p: PerView = 0.0):
        if num_views < 2:
            raise ValueError(f"num_views={num_views} must be at least 2 for a contrastive loss")
        _check_scale("crop_scale", crop_scale)
        per_view = {name: _per_view(name, p, num_views) for name, p in
                    (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p), ("solarize_p", solarize_p))}
        for v in range(num_views):
            _check_augmentation(jitter_strength, **{name: ps[v] for name, ps in per_view.items()})
        self.num_views, self.image_size = num_views, image_size
        self.view_params = [dict(scale=tuple(crop_scale), jitter_strength=jitter_strength,
                                 **{name: ps[v] for name, ps in per_view.items()}) for v in range(num_views)]

    def make_groups(self, preprocessing: Preprocessing) -> list[tuple[Augmentation, int]]:
        size = self.image_size or preprocessing.image_size

        def augmentation(params: dict[str, Any]) -> Augmentation:
            return Augmentation(size, **params, mean=preprocessing.mean, std=preprocessing.std)

        if all(p == self.view_params[0] for p in self.view_params):  # one group: identical draws either way
            return [(augmentation(self.view_params[0]), self.num_views)]
        return [(augmentation(p), 1) for p in self.view_params]


def _per_view(name: str, value: PerView, num_views: int, what: str = "") -> list[float]:
    """One probability per view from a number or a list of ``num_views`` numbers (``what`` says what each
    value is for, in the error)."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_views
    values = [float(v) for v in value]
    if len(values) != num_views:
        raise ValueError(f"{name}={list(value)} has {len(values)} values for {what or f'num_views={num_views}'}: "
                         "give one number for every view or one per view")
    return values


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


class MultiCropViews(AugmentedViews):
    """Multi-crop (Caron et al. 2020, SwAV): a few large global crops and several small local crops.

    The views are the global crops first, then the local crops, so each resolution is one contiguous
    group and the method's encoder runs once per resolution. Paper defaults: 2x224 at scale
    (0.14, 1) and 6x96 at (0.05, 0.14); colour jitter (strength 1.0, p=0.8), grayscale (p=0.2) and
    Gaussian blur (p=0.5) on every crop. ``local_crops: {count: 0, ...}`` turns multi-crop off.

    Each probability is one number for every crop or a list with one value per global crop, then one for
    all the local crops: DINO's ``blur_p: [1.0, 0.1, 0.5]`` and ``solarize_p: [0.0, 0.2, 0.0]``.

    On small images scale the local crops up: on 28 px Fashion-MNIST, (0.05, 0.14) cuts 6-10 px regions
    that say little about the garment; ``recipes/demo/swav.yaml`` uses (0.14, 0.4) and records what it
    changes.
    """

    def __init__(self, global_crops: Crops = Crops(2, 224, (0.14, 1.0)),
                 local_crops: Crops = Crops(6, 96, (0.05, 0.14)), jitter_strength: float = 1.0,
                 jitter_p: PerView = 0.8, grayscale_p: PerView = 0.2, blur_p: PerView = 0.5,
                 solarize_p: PerView = 0.0):
        global_crops, local_crops = _as_crops(global_crops), _as_crops(local_crops)
        global_crops.check("global_crops")
        local_crops.check("local_crops")
        if global_crops.count < 1:
            raise ValueError(f"global_crops.count={global_crops.count}: multi-crop needs at least one global "
                             "crop (the paper uses 2)")
        self.global_crops, self.local_crops = global_crops, local_crops
        slots = global_crops.count + bool(local_crops.count)  # each global crop, then all the local ones
        what = f"{global_crops.count} global crop(s)" + (" and the local crops" if local_crops.count else "")
        per_slot = {name: _per_view(name, p, slots, what) for name, p in
                    (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p), ("solarize_p", solarize_p))}
        self.slot_params = [dict(jitter_strength=jitter_strength, **{n: ps[i] for n, ps in per_slot.items()})
                            for i in range(slots)]
        for params in self.slot_params:
            _check_augmentation(**params)

    @property
    def num_views(self) -> int:
        return self.global_crops.count + self.local_crops.count

    def make_groups(self, preprocessing: Preprocessing) -> list[tuple[Augmentation, int]]:
        def augmentation(crops: Crops, params: dict[str, Any]) -> Augmentation:
            return Augmentation(crops.size, tuple(crops.scale), **params, mean=preprocessing.mean,
                                std=preprocessing.std)

        n = self.global_crops.count
        if all(p == self.slot_params[0] for p in self.slot_params[:n]):  # one group for identical global crops
            groups = [(augmentation(self.global_crops, self.slot_params[0]), n)]
        else:
            groups = [(augmentation(self.global_crops, p), 1) for p in self.slot_params[:n]]
        if self.local_crops.count:
            groups.append((augmentation(self.local_crops, self.slot_params[n]), self.local_crops.count))
        return groups


def _as_crops(crops: Crops | dict[str, Any]) -> Crops:
    return Crops(**crops) if isinstance(crops, dict) else Crops(crops.count, crops.size, tuple(crops.scale))


class MaskedImageView(AugmentedViews):
    """One lightly augmented view for masked image modeling: random resized crop and flip only.

    MAE uses ``crop_scale=(0.2, 1.0)``; SimMIM ``(0.67, 1.0)``. Masking happens in the method. The crops
    are resized with the run's ``Preprocessing.interpolation`` (bicubic in the MAE and SimMIM recipes, as
    both papers' ``RandomResizedCrop(..., interpolation=3)``), the same mode the eval transform uses.
    """

    def __init__(self, crop_scale: Range = (0.2, 1.0), flip_p: float = 0.5, image_size: int | None = None):
        _check_scale("crop_scale", crop_scale)
        _check_augmentation(flip_p=flip_p)
        self.crop_scale, self.flip_p, self.image_size = tuple(crop_scale), flip_p, image_size

    def make_groups(self, preprocessing: Preprocessing) -> list[tuple[Augmentation, int]]:
        size = self.image_size or preprocessing.image_size
        return [(Augmentation(size, self.crop_scale, 0.0, 0.0, 0.0, 0.0, self.flip_p, mean=preprocessing.mean,
                              std=preprocessing.std, interpolation=preprocessing.interpolation), 1)]


@dataclass
class EvalView(ViewTransform):
    """One deterministic view (the eval transform), for probes and feature extraction."""

    pipeline: Any = field(default=None)
    resize_to: int = 0

    def bind(self, preprocessing: Preprocessing) -> None:
        self.pipeline, self.resize_to = preprocessing.eval_transform(), preprocessing.resize_to

    def __call__(self, image: Any) -> list[Tensor]:
        """A lazily opened JPEG is decoded at reduced size where its short side still reaches the resize."""
        return [self.pipeline(_decode_at(image, self.resize_to / min(F.get_size(image))))]
