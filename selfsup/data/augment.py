"""Batched augmentation on the training device: the colour steps of a whole batch at once.

Loader workers draw every random parameter of a view from the sample's seed (so exact resume and the
choice of worker change nothing) and ship it beside the uint8 view as one small vector, laid out as
:data:`COLOUR_FIELDS`. After the host-to-device copy, :func:`augment_on_device` applies colour jitter
(brightness, contrast, saturation and hue in each image's own random order, as torchvision's
``ColorJitter``), grayscale, Gaussian blur and solarisation to the batch, each image with its own
parameters, then normalises. The per-sample path (``device_augment: false``) applies the same
parameters with torchvision's kernels on the worker, so the two give the same distribution of views
(``tests/data/test_device_augment.py``).

Hue and the per-image blur kernels are kornia's; the blends are one line of tensor arithmetic each. Nothing here
reads a value back to the host: every choice is a ``torch.where`` over the batch.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as F
from kornia.enhance import adjust_hue
from kornia.filters import filter2d_separable, get_gaussian_kernel1d
from torch import Tensor

COLOUR_FIELDS = ("brightness", "contrast", "saturation", "hue", "order_0", "order_1", "order_2", "order_3",
                 "grayscale", "blur_sigma", "solarize")
IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0)  # the vector of a view with no colour step
GRAYSCALE, BLUR_SIGMA, SOLARIZE = 8, 9, 10
SOLARIZE_THRESHOLD = 128 / 255  # BYOL's: pixels at or above half the range are inverted
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def blur_kernel_size(size: int) -> int:
    """The Gaussian blur kernel for a view of ``size`` pixels: about 10% of the side, odd, at least 3."""
    return max(3, (size // 10) | 1)


def grayscale(x: Tensor) -> Tensor:
    """``(B, 1, H, W)`` luma of ``(B, C, H, W)`` images in [0, 1] (a one-channel image is its own)."""
    if x.shape[1] == 1:
        return x
    weights = x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def jitter(x: Tensor, colour: Tensor) -> Tensor:
    """Brightness, contrast, saturation and hue with per-image factors, in per-image order (positions
    ``order_0..3``: 0 brightness, 1 contrast, 2 saturation, 3 hue). At each position an image's other three
    operations get their identity factor, which leaves it exactly unchanged."""
    order = colour[:, 4:8]
    for position in range(4):
        step = order[:, position]
        b = _per_image(torch.where(step == 0, colour[:, 0], 1.0))
        x = (x * b).clamp(0, 1)
        c = _per_image(torch.where(step == 1, colour[:, 1], 1.0))
        x = (c * x + (1 - c) * grayscale(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
        if x.shape[1] == 3:  # saturation and hue leave a one-channel image alone, as torchvision does
            s = _per_image(torch.where(step == 2, colour[:, 2], 1.0))
            x = (s * x + (1 - s) * grayscale(x)).clamp(0, 1)
            h = torch.where(step == 3, colour[:, 3], 0.0)
            shifted = adjust_hue(x, 2 * math.pi * h)
            x = torch.where(_per_image(h != 0), shifted, x)
    return x


def augment_on_device(x: Tensor, colour: Tensor) -> Tensor:
    """The colour steps of :class:`~selfsup.data.transforms.Augmentation` on a batch ``(B, C, H, W)`` in [0, 1],
    image ``i`` with the parameters ``colour[i]`` (:data:`COLOUR_FIELDS`)."""
    if colour.shape != (x.shape[0], len(COLOUR_FIELDS)):
        raise ValueError(f"colour parameters of shape {tuple(colour.shape)} for a batch of {x.shape[0]} views; "
                         f"expected ({x.shape[0]}, {len(COLOUR_FIELDS)})")
    colour = colour.to(x.dtype)
    x = jitter(x, colour)
    if x.shape[1] == 3:
        x = torch.where(_per_image(colour[:, GRAYSCALE] > 0), grayscale(x).expand_as(x), x)
    sigma = colour[:, BLUR_SIGMA]
    kernel = blur_kernel_size(x.shape[-1])
    # the 1-D kernels built from the per-image sigmas, then one separable filter (kornia's gaussian_blur2d
    # would read its sigmas back to the host to check them)
    taps = get_gaussian_kernel1d(kernel, sigma.clamp_min(0.1).unsqueeze(1))
    blurred = filter2d_separable(x, taps, taps, border_type="reflect")
    x = torch.where(_per_image(sigma > 0), blurred, x)
    solarize = _per_image(colour[:, SOLARIZE] > 0) & (x >= SOLARIZE_THRESHOLD)
    return torch.where(solarize, 1 - x, x)


def finish_views(views: list[Tensor], colour: list[Tensor | None] | None, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> list[Tensor]:
    """uint8 views -> augmented (where ``colour`` is given) and normalised float32, on their device. Views that
    are already floating point (eval views, views built by hand) pass through unchanged."""
    colour = colour or [None] * len(views)
    finished = []
    for view, params in zip(views, colour):
        if view.dtype != torch.uint8:
            finished.append(view)
            continue
        x = F.to_dtype(view, torch.float32, scale=True)
        if params is not None:
            x = augment_on_device(x, params)
        if len(mean) != x.shape[1]:
            raise ValueError(f"views have {x.shape[1]} channel(s) but the preprocessing has {len(mean)} mean/std "
                             "values: set data.mean and data.std per channel")
        finished.append(F.normalize(x, list(mean), list(std)))
    return finished
