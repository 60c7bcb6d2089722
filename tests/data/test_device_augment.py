"""The batched on-device augmentation against the per-sample path and against the papers' parameter ranges.

The worker draws every parameter of a view from the sample's seed; ``device_augment: false`` applies them with
torchvision's kernels per sample, ``true`` batched on the device (``selfsup.data.augment``). The references here
are torchvision's kernels and the ranges written down from the SimCLR/BYOL settings, not selfsup's code.
"""

from __future__ import annotations

import io
import sys
from collections import Counter

import matplotlib.cbook
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from selfsup.data.augment import COLOUR_FIELDS, augment_on_device, finish_views
from selfsup.data.datamodule import Batch, SSLDataModule, collate_views
from selfsup.data.datasets import decode_image, load_image
from selfsup.data.transforms import Augmentation, ContrastiveViews, Crops, MultiCropViews, Preprocessing

FIELD = {name: i for i, name in enumerate(COLOUR_FIELDS)}
RGB = Preprocessing(image_size=24, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


def _rgb_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 30, 28), dtype=torch.uint8, generator=g) for _ in range(n)]


def _draws(aug: Augmentation, n: int) -> torch.Tensor:
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.stack([aug.draw(image).colour for _ in range(n)])


def torchvision_colour(x: torch.Tensor, c: list[float], kernel: int) -> torch.Tensor:
    """The reference: torchvision's own kernels, one image at a time, in ColorJitter's per-image order."""
    ops = {0: lambda y: TF.adjust_brightness(y, c[0]), 1: lambda y: TF.adjust_contrast(y, c[1]),
           2: lambda y: TF.adjust_saturation(y, c[2]), 3: lambda y: TF.adjust_hue(y, c[3])}
    for op in c[4:8]:
        x = ops[int(op)](x)
    if c[8]:
        x = TF.rgb_to_grayscale(x, num_output_channels=x.shape[0])
    if c[9]:
        x = TF.gaussian_blur(x, [kernel, kernel], [c[9], c[9]])
    if c[10]:
        x = torch.where(x >= 128 / 255, 1 - x, x)
    return x


@pytest.mark.parametrize("channels", [3, 1])
def test_batched_colour_steps_equal_torchvision_per_image(channels):
    """On float images (no uint8 rounding in between) the batch equals torchvision's kernels image by image."""
    aug = Augmentation(24, (0.3, 1.0), jitter_strength=1.0, jitter_p=0.8, grayscale_p=0.3, blur_p=0.5,
                       solarize_p=0.3)
    colour = _draws(aug, 48)
    x = torch.rand(48, channels, 24, 24, generator=torch.Generator().manual_seed(1))
    got = augment_on_device(x, colour)
    expected = torch.stack([torchvision_colour(x[i], colour[i].tolist(), 3) for i in range(48)])
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert (got - x).abs().amax((1, 2, 3)).gt(0.01).float().mean() > 0.5, "most images are changed"


def test_parameters_follow_the_configured_distribution():
    """SimCLR strength 1.0 jitter (p=0.8), grayscale p=0.2, blur p=0.5 with sigma in [0.1, 2], solarize p=0.2."""
    n = 4000
    c = _draws(Augmentation(32, (0.08, 1.0), 1.0, 0.8, 0.2, 0.5, solarize_p=0.2), n)
    jittered = c[:, FIELD["brightness"]] != 1
    assert abs(jittered.float().mean() - 0.8) < 0.025
    for name, (low, high) in {"brightness": (0.2, 1.8), "contrast": (0.2, 1.8), "saturation": (0.2, 1.8),
                              "hue": (-0.2, 0.2)}.items():
        values = c[jittered, FIELD[name]]
        assert low <= values.min() and values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 0.03 * (high - low), name  # uniform: centred
        assert abs(values.std() - (high - low) / 12 ** 0.5) < 0.03 * (high - low), name
    first = Counter(c[jittered, FIELD["order_0"]].long().tolist())  # each op first a quarter of the time
    assert set(first) == {0, 1, 2, 3} and all(abs(k / jittered.sum() - 0.25) < 0.04 for k in first.values())
    orders = c[jittered, 4:8].sort(dim=1).values
    assert (orders == torch.arange(4.0)).all(), "the order is a permutation"
    assert abs(c[:, FIELD["grayscale"]].mean() - 0.2) < 0.025
    sigma = c[:, FIELD["blur_sigma"]]
    assert abs((sigma > 0).float().mean() - 0.5) < 0.03
    assert 0.1 <= sigma[sigma > 0].min() and sigma.max() <= 2.0 and abs(sigma[sigma > 0].mean() - 1.05) < 0.05
    assert abs(c[:, FIELD["solarize"]].mean() - 0.2) < 0.025


def _views_of(device_augment: bool, views, images, preprocessing=RGB) -> list[torch.Tensor]:
    views.device_augment = device_augment
    views.bind(preprocessing)
    samples = []
    for i, image in enumerate(images):
        torch.manual_seed(1000 + i)
        out = views(image)
        samples.append((out.images, -1, i, 0, False, out.colour))
    batch = collate_views(samples)
    return finish_views(batch.views, batch.colour, preprocessing.mean, preprocessing.std)


@pytest.mark.parametrize("views", [
    ContrastiveViews(jitter_strength=1.0, grayscale_p=0.3, blur_p=0.5, solarize_p=0.2),
    MultiCropViews(Crops(2, 24, (0.3, 1.0)), Crops(3, 12, (0.1, 0.3)), solarize_p=0.2),
])
def test_device_and_worker_paths_give_the_same_views(views):
    """Same seeds, same parameters: per image within uint8 rounding, and the same pixel statistics over the
    batch. (The worker path works in uint8 and torchvision truncates to uint8 after every colour step, which
    darkens its views by about a level; the device path keeps floats.)"""
    images = _rgb_images(96)
    device, worker = _views_of(True, views, images), _views_of(False, views, images)
    mean, std = torch.tensor(RGB.mean).view(1, 3, 1, 1), torch.tensor(RGB.std).view(1, 3, 1, 1)
    for d, w in zip(device, worker):
        d, w = (d * std + mean) * 255, (w * std + mean) * 255  # back to 0..255 units
        levels = (d - w).abs()
        assert levels.mean() < 2.0 and levels.amax((1, 2, 3)).median() < 8
        assert torch.allclose(d.mean((0, 2, 3)), w.mean((0, 2, 3)), atol=2.0)
        assert torch.allclose(d.std((0, 2, 3)), w.std((0, 2, 3)), rtol=0.02)


def test_each_image_of_a_batch_gets_its_own_parameters():
    images = [_rgb_images(1)[0]] * 32  # one image 32 times: only the draws differ
    views = ContrastiveViews(crop_scale=(1.0, 1.0), jitter_strength=1.0, jitter_p=1.0, grayscale_p=0.0)
    first = _views_of(True, views, images)[0]
    distinct = {tuple(v.mean((1, 2)).round(decimals=3).tolist()) for v in first}
    assert len(distinct) > 28


def test_no_host_reads_in_the_device_augmentation(monkeypatch):
    """On a GPU a read of a tensor's value waits for the device; the batched path makes none (kornia's
    included), so the copy of the next batch and this step's kernels can overlap."""
    colour = _draws(Augmentation(24, (0.3, 1.0), 1.0, 0.8, 0.3, 0.5, solarize_p=0.3), 16)  # on the worker
    x = torch.rand(16, 3, 24, 24)
    reads = Counter()
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counting(tensor, *args, _name=name, _original=original, **kwargs):
            reads[f"{sys._getframe(1).f_code.co_filename}:{_name}"] += 1
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    augment_on_device(x, colour)
    assert not reads, dict(reads)


def test_training_batches_are_uint8_with_a_quarter_of_the_bytes():
    data = SSLDataModule(batch_size=16, num_workers=0, image_size=16,
                         views=MultiCropViews(Crops(2, 16, (0.3, 1.0)), Crops(2, 8, (0.1, 0.3))))
    data.setup("fit")
    raw = next(iter(data.train_dataloader()))
    assert all(v.dtype == torch.uint8 for v in raw.views)
    assert raw.colour is not None and all(c.shape == (16, len(COLOUR_FIELDS)) for c in raw.colour)
    ready = data.prepare_batch(raw)
    assert all(v.dtype == torch.float32 for v in ready.views) and ready.colour is None
    view_bytes = sum(v.nbytes for v in raw.views)
    assert view_bytes * 4 == sum(v.nbytes for v in ready.views)
    assert sum(c.nbytes for c in raw.colour) == 4 * 16 * len(COLOUR_FIELDS) * 4  # 44 bytes per image and view


def test_the_encoder_refuses_unfinished_uint8_views():
    data = SSLDataModule(batch_size=8, num_workers=0, image_size=16)
    data.setup("fit")
    from selfsup.models.encoder import Encoder
    with pytest.raises(TypeError, match="prepare_batch"):
        Encoder("test_resnet", in_chans=1)(next(iter(data.train_dataloader())).views[0])


def test_pin_memory_pins_every_tensor_of_the_batch(monkeypatch):
    """torch's pin-memory thread calls ``Batch.pin_memory``; it must reach views, labels, index and colour."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self.clone())
    views = [torch.zeros(4, 3, 8, 8, dtype=torch.uint8)] * 2
    batch = Batch(views=views, labels=torch.zeros(4, dtype=torch.long), index=torch.arange(4),
                  colour=[torch.zeros(4, 11), None])
    from torch.utils.data._utils.pin_memory import pin_memory
    out = pin_memory(batch)
    assert isinstance(out, Batch) and len(pinned) == 5
    assert all(a is not b for a, b in zip(out.views + [out.labels, out.index], views + [batch.labels, batch.index]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pin_memory_on_cuda():
    batch = Batch(views=[torch.zeros(4, 3, 8, 8, dtype=torch.uint8)], labels=torch.zeros(4, dtype=torch.long),
                  index=torch.arange(4), colour=[torch.zeros(4, 11)])
    out = batch.pin_memory()
    assert out.views[0].is_pinned() and out.labels.is_pinned() and out.colour[0].is_pinned()


# -- JPEG decoding at reduced size -------------------------------------------------------------------------
PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # 512 x 600, ships with matplotlib


def _large_photo(tmp_path) -> str:
    path = str(tmp_path / "large.jpg")
    Image.open(PHOTO).resize((2048, 2400), Image.LANCZOS).save(path, quality=90)
    return path


def test_decode_image_at_reduced_size_keeps_at_least_the_requested_size(tmp_path):
    path = _large_photo(tmp_path)
    full = decode_image(load_image(path))
    assert tuple(full.shape) == (3, 2400, 2048)
    for request, factor in [((1000, 1000), 2), ((500, 500), 4), ((300, 300), 4), ((200, 250), 8),
                            ((1100, 900), 1), ((2048, 2400), 1)]:
        reduced = decode_image(load_image(path), min_size=request)
        assert tuple(reduced.shape[1:]) == (2400 // factor, 2048 // factor), request
        assert reduced.shape[2] >= request[0] and reduced.shape[1] >= request[1], "never below the request"
        if factor == 4:  # and the largest reduction that keeps it
            assert 2400 // 8 < request[1] or 2048 // 8 < request[0]
        torch.testing.assert_close(reduced.float().mean(), full.float().mean(), atol=1.0, rtol=0)
    png = io.BytesIO()
    Image.open(PHOTO).save(png, format="PNG")
    assert decode_image(load_image(io.BytesIO(png.getvalue())), min_size=(64, 64)).shape == (3, 600, 512)


@pytest.mark.parametrize("crops", [(Crops(2, 224, (0.14, 1.0)), Crops(6, 96, (0.05, 0.14))),
                                   (Crops(2, 96, (0.3, 1.0)), Crops(4, 48, (0.05, 0.3)))])
def test_views_from_a_reduced_decode_match_the_full_decode(tmp_path, crops):
    """Same draws, same geometry; pixels within a few levels of the full-resolution decode (the reduced crop
    keeps at least twice the output resolution, so the antialiased resize does the downscaling)."""
    path = _large_photo(tmp_path)
    views = MultiCropViews(*crops, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    views.bind(Preprocessing(image_size=crops[0].size))
    full = decode_image(load_image(path))
    differences = []
    for seed in range(12):
        torch.manual_seed(seed)
        lazy = views(load_image(path)).images
        torch.manual_seed(seed)
        reference = views(full).images
        differences += [(a.float() - b.float()).abs().mean().item() for a, b in zip(lazy, reference)]
    assert np.mean(differences) < 2.0 and max(differences) < 6, (np.mean(differences), max(differences))


def test_no_reduction_where_a_crop_needs_the_full_resolution():
    """512 x 600 photo, 224 px crops: no crop allows half resolution, so the decode is the full one, exactly."""
    views = MultiCropViews(Crops(2, 224, (0.14, 1.0)), Crops(6, 96, (0.05, 0.14)))
    views.bind(Preprocessing(image_size=224))
    full = decode_image(load_image(PHOTO))
    for seed in range(5):
        torch.manual_seed(seed)
        lazy = views(load_image(PHOTO)).images
        torch.manual_seed(seed)
        assert all(torch.equal(a, b) for a, b in zip(lazy, views(full).images))
