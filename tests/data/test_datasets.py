"""Sources: the shipped subset, IDX files, image folders and torchvision sets, on data made here."""

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.datamodule import SSLDataModule
from selfsup.data.datasets import ImageFolder, embedded_fashion_mnist, fashion_mnist, read_idx, source


def test_embedded_subset_is_class_balanced_and_small():
    from importlib import resources

    train, test = embedded_fashion_mnist("train"), embedded_fashion_mnist("test")
    assert len(train) == 10_000 and len(test) == 2_000
    assert torch.bincount(train.labels).tolist() == [1000] * 10
    assert torch.bincount(test.labels).tolist() == [200] * 10
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and 0 <= label < 10
    asset = resources.files("selfsup.data.assets")
    assert len(asset.joinpath("fashion_mnist_subset.npz").read_bytes()) < 6_000_000
    assert "MIT" in asset.joinpath("LICENSE-fashion-mnist.txt").read_text()


def _write_idx(path, array: np.ndarray, compress: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_directory(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (7, 28, 28)), rng.integers(0, 10, 7)
    ext = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", images, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels, compress)
    ds = fashion_mnist("test", root=str(tmp_path))
    assert len(ds) == 7
    assert torch.equal(ds[3][0][0], torch.from_numpy(images[3].astype(np.uint8))) and ds[3][1] == labels[3]
    with pytest.raises(FileNotFoundError, match="train-images"):
        fashion_mnist("train", root=str(tmp_path))


def test_idx_rejects_truncated_files(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, np.zeros((4, 5, 5)), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def _folder(tmp_path, labelled=True, n=3):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog") if labelled else ("",):
        (tmp_path / cls).mkdir(exist_ok=True, parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    return tmp_path


def test_image_folder_labelled_and_flat(tmp_path):
    labelled = ImageFolder(_folder(tmp_path / "l"))
    assert labelled.classes == ["cat", "dog"] and len(labelled) == 6
    assert sorted(label for _, label in labelled.files) == [0, 0, 0, 1, 1, 1]
    flat = ImageFolder(_folder(tmp_path / "f", labelled=False))
    assert flat.classes == [] and {label for _, label in flat.files} == {-1}
    image, _ = flat[0]
    assert image.mode == "RGB" and image.size == (24, 20)


def test_missing_and_empty_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet42'"):
        source("imagenet42")


def test_corrupt_training_images_are_replaced_and_counted(tmp_path):
    root = _folder(tmp_path, labelled=False, n=6)
    (root / "broken.jpg").write_bytes(b"not an image at all")
    (root / "truncated.png").write_bytes((root / "0.png").read_bytes()[:40])
    data = SSLDataModule(dataset="folder", root=str(root), batch_size=8, num_workers=0, image_size=16,
                         drop_last=False)
    batches = list(data.train_dataloader())
    assert [len(b) for b in batches] == [8], "the batch keeps its size"
    assert sum(b.skipped for b in batches) >= 2 and sum(b.invalid for b in batches) == 0
    files = [data.split("train").files[i][0] for b in batches for i in b.index.tolist()]
    assert not [f for f in files if f.endswith(("broken.jpg", "truncated.png"))], "bad files were replaced"
    assert all(v.shape[1:] == (3, 16, 16) for b in batches for v in b.views)


def test_strict_images_makes_corrupt_files_fatal(tmp_path):
    root = _folder(tmp_path, labelled=False, n=2)
    (root / "broken.jpg").write_bytes(b"garbage")
    data = SSLDataModule(dataset="folder", root=str(root), batch_size=4, num_workers=0, image_size=16,
                         drop_last=False, strict_images=True)
    with pytest.raises(Exception, match="broken.jpg"):
        list(data.train_dataloader())


def _fake_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))


def test_cifar10_loader_reads_local_files_without_download(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    _fake_cifar10(tmp_path)
    # our fake files do not have the published md5 sums
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    train = source("cifar10").build("train", root=str(tmp_path))
    assert len(train) == 20 and train[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source("cifar10").build("train", root=str(tmp_path / "missing"))


def test_datamodule_preprocessing_and_probe_loaders():
    data = SSLDataModule(batch_size=32, num_workers=0, image_size=24)
    assert data.preprocessing.mean == pytest.approx((0.2860,)) and data.num_classes == 10
    batch = next(iter(data.train_dataloader()))
    assert len(batch.views) == 2 and batch.views[0].shape == (32, 1, 24, 24)
    assert not torch.equal(batch.views[0], batch.views[1])  # two different augmentations
    probe = next(iter(data.probe_dataloader("test")))
    assert probe.views[0].shape[1:] == (1, 24, 24) and (probe.labels >= 0).all()


@pytest.mark.parametrize("kwargs,match", [(dict(batch_size=0), "data.batch_size=0"),
                                          (dict(num_workers=-1), "data.num_workers=-1")])
def test_bad_datamodule_values_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSLDataModule(**kwargs)
