"""Pretraining, probe-train and test splits: probes read labelled data only, with the probe-train classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.data.datamodule import SSLDataModule
from selfsup.data.datasets import SourceInfo, SourceSpec, source
from selfsup.eval.protocols import EvalData


def write_folder(root: Path, classes: tuple[str, ...] = (), per_class: int = 3, seed: int = 0) -> Path:
    """``per_class`` random PNGs in each of ``classes`` (or flat in ``root`` when there are none)."""
    rng = np.random.default_rng(seed)
    for cls in classes or ("",):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def folder_data(tmp_path: Path, **roots: Path) -> SSLDataModule:
    return SSLDataModule(dataset="folder", image_size=8, num_workers=0, eval_batch_size=64,
                         **{k: str(v) for k, v in roots.items()})


def test_flat_pretraining_folder_with_labelled_probe_train_root(tmp_path):
    data = folder_data(tmp_path, root=write_folder(tmp_path / "unlabelled", per_class=5),
                       probe_train_root=write_folder(tmp_path / "probe", ("ant", "bee"), per_class=2),
                       test_root=write_folder(tmp_path / "test", ("ant", "bee"), per_class=3))
    assert data.has_labels and data.num_classes == 2 and data.probe_unavailable_reason is None
    assert len(data.split("train")) == 5 and {label for _, label in data.split("train").files} == {-1}
    train = next(iter(data.probe_dataloader("train")))
    assert len(train) == 4 and sorted(train.labels.tolist()) == [0, 0, 1, 1], "probes fit on the labelled folder"
    test = next(iter(data.val_dataloader()))
    assert sorted(test.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    evaluation = EvalData.from_datamodule(data)
    assert evaluation.classes == ["ant", "bee"] and len(evaluation.train) == 4
    assert all(label >= 0 for _, label in evaluation.train)


def test_flat_folder_without_probe_train_root_has_no_probes_and_says_why(tmp_path):
    data = folder_data(tmp_path, root=write_folder(tmp_path / "unlabelled"),
                       test_root=write_folder(tmp_path / "test", ("ant", "bee")))
    assert not data.has_labels and data.num_classes is None and data.val_dataloader() == []
    reason = data.probe_unavailable_reason
    assert reason == ("probes skipped: data.root is a flat folder without class sub-folders; set "
                      "data.probe_train_root to a labelled folder")
    with pytest.raises(ValueError, match="set data.probe_train_root"):
        data.probe_dataloader("test")
    with pytest.raises(ValueError, match="no labelled probe-train and test splits.*probe_train_root"):
        EvalData.from_datamodule(data)
    with pytest.raises(ValueError, match="set data.probe_train_root"):
        data.probe_dataloader("train")
    images = next(iter(data.probe_dataloader("pretrain")))  # image-only callbacks (reconstructions) still work
    assert len(images) == 3 and (images.labels == -1).all()


def test_labelled_root_is_its_own_probe_train_split_and_a_missing_test_root_is_named(tmp_path):
    data = folder_data(tmp_path, root=write_folder(tmp_path / "train", ("ant", "bee")))
    assert data.split("probe_train") is data.split("train")
    assert not data.has_labels and data.probe_unavailable_reason == (
        "probes skipped: no labelled test split; set data.test_root to a labelled folder")


def test_a_class_missing_from_the_test_split_keeps_the_label_indices(tmp_path):
    data = folder_data(tmp_path, root=write_folder(tmp_path / "train", ("ant", "bee", "cat")),
                       test_root=write_folder(tmp_path / "test", ("ant", "cat"), per_class=2))
    test = data.split("test")
    assert test.classes == ["ant", "bee", "cat"]
    assert {(Path(path).parent.name, label) for path, label in test.files} == {("ant", 0), ("cat", 2)}
    assert data.num_classes == 3


def test_a_test_class_unknown_to_the_probe_train_split_is_an_error(tmp_path):
    data = folder_data(tmp_path, root=write_folder(tmp_path / "train", ("ant", "bee")),
                       test_root=write_folder(tmp_path / "test", ("ant", "wasp")))
    with pytest.raises(ValueError, match=r"\['wasp'\].*classes are \['ant', 'bee'\]"):
        data.split("test")


def test_a_flat_test_root_is_an_error_when_probes_have_classes(tmp_path):
    data = folder_data(tmp_path, root=write_folder(tmp_path / "train", ("ant", "bee")),
                       test_root=write_folder(tmp_path / "test"))
    with pytest.raises(ValueError, match="test has no class sub-folders"):
        data.split("test")


def test_bad_split_names_and_misplaced_probe_train_root_are_named(tmp_path):
    data = SSLDataModule(num_workers=0)
    with pytest.raises(ValueError, match=r"split 'val' is not one of \('train', 'probe_train', 'test'\)"):
        data.split("val")
    with pytest.raises(ValueError, match="probe_train_root='/x' is only for dataset 'folder'"):
        SSLDataModule(dataset="cifar10", probe_train_root="/x")
    with pytest.raises(ValueError, match=r"SourceSpec.splits=\('train', None\) must be"):
        SourceSpec(lambda split, root=None: None, SourceInfo(), ("train", None))


def test_source_split_roles():
    assert source("stl10").splits == ("train+unlabeled", "train", "test")
    for name in ("fashion_mnist_embedded", "fashion_mnist", "cifar10", "cifar100"):
        assert source(name).splits == ("train", "train", "test"), name


def _fake_stl10(root: Path, train: int = 6, unlabeled: int = 9, test: int = 4) -> None:
    """``stl10_binary/`` as torchvision reads it: uint8 images (N, 3, 96, 96) and 1-based uint8 labels."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", train), ("unlabeled", unlabeled), ("test", test)):
        (folder / f"{name}_X.bin").write_bytes(rng.integers(0, 256, count * 3 * 96 * 96, dtype=np.uint8).tobytes())
        if name != "unlabeled":
            (folder / f"{name}_y.bin").write_bytes((np.arange(count) % 10 + 1).astype(np.uint8).tobytes())


def test_stl10_pretrains_on_train_plus_unlabeled_and_probes_on_labelled_train(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    _fake_stl10(tmp_path)
    monkeypatch.setattr(tvd.STL10, "_check_integrity", lambda self: True)  # our files lack the md5 sums
    data = SSLDataModule(dataset="stl10", root=str(tmp_path), image_size=8, num_workers=0)
    pretrain, probe_train = data.split("train"), data.split("probe_train")
    assert len(pretrain) == 15 and (pretrain.labels == -1).sum() == 9
    assert len(probe_train) == 6 and probe_train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert data.has_labels and data.num_classes == 10 and len(data.split("test")) == 4
    evaluation = EvalData.from_datamodule(data)
    assert len(evaluation.train) == 6 and (evaluation.train.labels >= 0).all()
    assert (next(iter(data.probe_dataloader("train"))).labels >= 0).all()
