import pytest
import torch
import torchvision.transforms.v2 as T
from jsonargparse import ArgumentParser

from selfsup.data.datamodule import SSLDataModule
from selfsup.data.transforms import Crops, MultiCropViews, Preprocessing
from selfsup.methods.base import SSLMethod
from selfsup.models.encoder import Encoder

GRAY = Preprocessing(image_size=32, mean=(0.286,), std=(0.353,))


def _image() -> torch.Tensor:
    return torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_global_crops_come_first_then_local_crops():
    views = MultiCropViews(Crops(2, 32, (0.14, 1.0)), Crops(4, 16, (0.05, 0.14)))
    views.bind(GRAY)
    out = views(_image()).images
    assert [tuple(v.shape) for v in out] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 4
    assert all(v.dtype == torch.uint8 for v in out)  # normalised on the device, after the transfer
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[2], out[3])   # independent crops


def test_paper_defaults_and_augmentations_on_every_crop():
    views = MultiCropViews()
    assert (views.global_crops.count, views.global_crops.size, tuple(views.global_crops.scale)) == (2, 224, (0.14, 1.0))
    assert (views.local_crops.count, views.local_crops.size, tuple(views.local_crops.scale)) == (6, 96, (0.05, 0.14))
    views.bind(Preprocessing(image_size=224))
    assert [tuple(v.shape) for v in views(torch.zeros(3, 256, 256, dtype=torch.uint8)).images] == \
        [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert [count for _, count in views.groups] == [2, 6]
    for (pipeline, _), size, scale in zip(views.groups, (224, 96), [(0.14, 1.0), (0.05, 0.14)]):
        assert isinstance(pipeline.crop, T.RandomResizedCrop)
        assert (tuple(pipeline.crop.size), tuple(pipeline.crop.scale)) == ((size, size), scale)
        assert (pipeline.jitter_p, pipeline.grayscale_p, pipeline.blur_p) == (0.8, 0.2, 0.5)
        assert pipeline.jitter.brightness == pytest.approx((0.2, 1.8)) and pipeline.jitter.hue == (-0.2, 0.2)


def test_no_local_crops_is_plain_two_crop():
    views = MultiCropViews(Crops(2, 32, (0.14, 1.0)), Crops(0, 16, (0.05, 0.14)))
    views.bind(GRAY)
    assert [tuple(v.shape) for v in views(_image()).images] == [(1, 32, 32)] * 2


@pytest.mark.parametrize("global_crops, local_crops, match", [
    (Crops(0, 32, (0.14, 1.0)), Crops(4, 16, (0.05, 0.14)), "at least one global crop"),
    (Crops(2, 32, (0.0, 1.0)), Crops(4, 16, (0.05, 0.14)), r"global_crops.scale=\(0.0, 1.0\)"),
    (Crops(2, 32, (0.14, 1.2)), Crops(4, 16, (0.05, 0.14)), r"global_crops.scale=\(0.14, 1.2\)"),
    (Crops(2, 32, (0.14, 1.0)), Crops(4, 16, (0.2, 0.1)), r"local_crops.scale=\(0.2, 0.1\)"),
    (Crops(2, 0, (0.14, 1.0)), Crops(4, 16, (0.05, 0.14)), "size=0"),
])
def test_bad_crops_are_rejected(global_crops, local_crops, match):
    with pytest.raises(ValueError, match=match):
        MultiCropViews(global_crops, local_crops)


def test_yaml_form_parses():
    parser = ArgumentParser()
    parser.add_class_arguments(MultiCropViews, "views")
    config = parser.parse_string("""
views:
  global_crops: {count: 2, size: 32, scale: [0.14, 1.0]}
  local_crops: {count: 4, size: 16, scale: [0.05, 0.14]}
  blur_p: 0.0
""")
    views = parser.instantiate(config).views
    assert isinstance(views, MultiCropViews)
    assert views.num_views == 6 and views.local_crops == Crops(4, 16, (0.05, 0.14))
    assert all(p["blur_p"] == 0.0 for p in views.slot_params)


def test_dino_per_crop_probabilities_give_each_global_crop_its_own_pipeline():
    """DINO: global crop 1 always blurred, never solarised; global crop 2 rarely blurred, sometimes
    solarised; every local crop blurred half the time."""
    from selfsup.data.augment import BLUR_SIGMA, SOLARIZE
    from selfsup.data.transforms import Preprocessing

    views = MultiCropViews(Crops(2, 16, (0.4, 1.0)), Crops(3, 8, (0.05, 0.4)),
                           blur_p=[1.0, 0.0, 0.5], solarize_p=[0.0, 1.0, 0.0])
    views.bind(Preprocessing(image_size=16))
    assert [(aug.size, aug.blur_p, aug.solarize_p, n) for aug, n in views.groups] == \
        [(16, 1.0, 0.0, 1), (16, 0.0, 1.0, 1), (8, 0.5, 0.0, 3)]
    views.device_augment = True
    blurred = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = views(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
        assert out.colour[0][BLUR_SIGMA] > 0 and out.colour[0][SOLARIZE] == 0
        assert out.colour[1][BLUR_SIGMA] == 0 and out.colour[1][SOLARIZE] == 1
        assert all(c[SOLARIZE] == 0 for c in out.colour[2:])
        blurred += [float(c[BLUR_SIGMA] > 0) for c in out.colour[2:]]
    assert 0.25 < sum(blurred) / len(blurred) < 0.75
    with pytest.raises(ValueError, match=r"blur_p=\[1.0, 0.1\] has 2 values for 2 global crop\(s\) and the local"):
        MultiCropViews(Crops(2, 16, (0.4, 1.0)), Crops(3, 8, (0.05, 0.4)), blur_p=[1.0, 0.1])


def test_batches_group_by_resolution_and_encode_once_per_resolution():
    views = MultiCropViews(Crops(2, 16, (0.3, 1.0)), Crops(3, 8, (0.1, 0.3)))
    data = SSLDataModule(views=views, image_size=16, batch_size=4, num_workers=0)
    data.setup("fit")
    batch = data.prepare_batch(next(iter(data.train_dataloader())))
    assert [tuple(v.shape) for v in batch.views] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 3

    method = SSLMethod(Encoder("test_resnet")).eval()  # BatchNorm per sample, to compare slices
    calls = []
    method.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    features = method.encode_views(batch.views)
    assert calls == [(8, 1, 16, 16), (12, 1, 8, 8)]
    assert [f.shape for f in features] == [(4, method.encoder.embed_dim)] * 5
    with torch.no_grad():  # each view's slice is that view's own features
        torch.testing.assert_close(features[3], method.encoder(batch.views[3]), rtol=1e-4, atol=1e-5)
