"""``Augmentation`` against torchvision's own ``T.Compose`` of the same v2 transforms: same seed, same tensors."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from selfsup.data.augment import finish_views
from selfsup.data.transforms import (Augmentation, ContrastiveViews, Crops, MaskedImageView, MultiCropViews,
                                     Preprocessing)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _compose(size, scale, jitter_strength, jitter_p, grayscale_p, blur_p, flip_p=0.5, mean=MEAN, std=STD):
    """The reference: the v2 transforms in the order the SimCLR and SwAV papers apply them."""
    s = jitter_strength
    ops = [T.ToImage(), T.RandomResizedCrop(size, scale=scale, antialias=True), T.RandomHorizontalFlip(flip_p)]
    if jitter_p > 0 and s > 0:
        ops.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=jitter_p))
    if grayscale_p > 0:
        ops.append(T.RandomGrayscale(grayscale_p))
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(max(3, (size // 10) | 1), sigma=(0.1, 2.0))], p=blur_p))
    return T.Compose(ops + [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def _images():
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=g)
    rgb = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8, generator=g)
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    return {"gray tensor": gray, "rgb tensor": rgb, "PIL": pil}


SETTINGS = {  # (size, scale, jitter_strength, jitter_p, grayscale_p, blur_p, flip_p)
    "swav local crop": (16, (0.05, 0.14), 1.0, 0.8, 0.2, 0.5, 0.5),
    "swav global crop": (32, (0.14, 1.0), 1.0, 0.8, 0.2, 0.5, 0.5),
    "simclr": (32, (0.08, 1.0), 0.5, 0.8, 0.2, 0.0, 0.5),
    "always jitter, grayscale and blur": (24, (0.3, 1.0), 1.0, 1.0, 1.0, 1.0, 1.0),
    "masked image modeling": (32, (0.2, 1.0), 0.0, 0.0, 0.0, 0.0, 0.5),
    "paper local crop, 96 px (blur kernel 9), no flip": (96, (0.05, 0.14), 1.0, 0.8, 0.2, 0.5, 0.0),
    "jitter probability without strength": (24, (0.3, 1.0), 0.0, 0.8, 0.2, 0.5, 0.5),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("image", ["gray tensor", "rgb tensor", "PIL"])
def test_same_tensors_as_torchvision_compose_for_the_same_seed(setting, image):
    x = _images()[image]
    channels = 1 if image == "gray tensor" else 3
    mean, std = MEAN[:channels], STD[:channels]
    reference = _compose(*SETTINGS[setting], mean=mean, std=std)
    ours = Augmentation(*SETTINGS[setting], mean=mean, std=std)
    outputs = set()
    for seed in range(40):
        torch.manual_seed(seed)
        expected, next_draw = reference(x), torch.rand(1)
        torch.manual_seed(seed)
        got = ours(x)
        assert type(got) is torch.Tensor and got.dtype == torch.float32
        torch.testing.assert_close(got, expected.as_subclass(torch.Tensor), rtol=0, atol=0)
        assert torch.equal(torch.rand(1), next_draw), "the random stream must advance as torchvision's does"
        outputs.add(got.numpy().tobytes())
    assert len(outputs) > 30  # and it does augment: different seeds, different views


@pytest.mark.parametrize("name, value", [("jitter_p", 1.5), ("grayscale_p", -0.1), ("blur_p", 2.0),
                                         ("flip_p", -1.0), ("jitter_strength", -0.5), ("jitter_strength", 3.0)])
def test_bad_probabilities_and_strength_are_rejected(name, value):
    kwargs = dict(size=16, scale=(0.2, 1.0), jitter_strength=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    with pytest.raises(ValueError, match=name):
        Augmentation(**{**kwargs, name: value})


@pytest.mark.parametrize("make", [
    lambda: ContrastiveViews(jitter_p=1.2),
    lambda: ContrastiveViews(jitter_strength=-1.0),
    lambda: ContrastiveViews(jitter_strength=3.0),
    lambda: MultiCropViews(blur_p=-0.5),
    lambda: MaskedImageView(flip_p=2.0),
])
def test_views_reject_bad_probabilities_when_configured(make):
    with pytest.raises(ValueError, match="must be"):
        make()


@pytest.mark.parametrize("views, settings", [
    (ContrastiveViews(num_views=2, crop_scale=(0.2, 1.0), jitter_strength=0.5, blur_p=0.5),
     [(20, (0.2, 1.0), 0.5, 0.8, 0.2, 0.5)] * 2),
    (MultiCropViews(Crops(1, 20, (0.3, 1.0)), Crops(2, 12, (0.05, 0.3))),
     [(20, (0.3, 1.0), 1.0, 0.8, 0.2, 0.5)] + [(12, (0.05, 0.3), 1.0, 0.8, 0.2, 0.5)] * 2),
    (MaskedImageView(crop_scale=(0.5, 1.0), flip_p=0.3), [(20, (0.5, 1.0), 0.0, 0.0, 0.0, 0.0, 0.3)]),
])
def test_views_apply_the_runs_preprocessing(views, settings):
    """Each view is the reference pipeline with the bound preprocessing's size, mean and std."""
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    views.bind(Preprocessing(image_size=20, mean=mean, std=std))  # device_augment=False: colour on the worker
    x = _images()["rgb tensor"]
    torch.manual_seed(7)
    out = views(x)
    assert all(v.dtype == torch.uint8 for v in out.images) and out.colour == [None] * len(out.images)
    got = [v[0] for v in finish_views([v[None] for v in out.images], None, mean, std)]  # as on the device
    torch.manual_seed(7)
    expected = [_compose(*setting, mean=mean, std=std)(x) for setting in settings]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.as_subclass(torch.Tensor), rtol=0, atol=0)


def _masked_view(interpolation: str) -> MaskedImageView:
    view = MaskedImageView(crop_scale=(0.2, 1.0), flip_p=0.5)
    view.bind(Preprocessing(image_size=32, mean=(0.5,), std=(0.25,), interpolation=interpolation))
    return view


def test_masked_image_view_crops_with_the_preprocessing_interpolation():
    """Bicubic and bilinear crops differ for the same seed, and each equals torchvision's RandomResizedCrop
    with that mode."""
    image = _images()["gray tensor"]
    for seed in range(5):
        crops = {}
        for mode in ("bilinear", "bicubic"):
            reference = T.Compose([T.ToImage(), T.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True,
                                                                    interpolation=T.InterpolationMode(mode)),
                                   T.RandomHorizontalFlip(0.5), T.ToDtype(torch.float32, scale=True),
                                   T.Normalize((0.5,), (0.25,))])
            torch.manual_seed(seed)
            expected = reference(image)
            torch.manual_seed(seed)
            crops[mode] = finish_views([_masked_view(mode)(image).images[0][None]], None, (0.5,), (0.25,))[0][0]
            torch.testing.assert_close(crops[mode], expected.as_subclass(torch.Tensor), rtol=0, atol=1e-6)
        assert (crops["bicubic"] - crops["bilinear"]).abs().max() > 0.05
