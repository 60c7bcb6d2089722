"""register_source: a source of one's own, used by name through SSLDataModule and a fit; duplicates, bad
arguments and unknown names are errors that say what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import selfsup.data
from selfsup.data import datasets
from selfsup.data.datamodule import SSLDataModule
from selfsup.data.datasets import ArrayImages, SourceInfo, register_source, source
from tests.helpers.methods import tiny_fit


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Each test registers into a copy of the registry: nothing it adds outlives it."""
    monkeypatch.setattr(datasets, "_SOURCES", dict(datasets._SOURCES))


def checkerboards(split: str, root: str | None = None) -> ArrayImages:
    """3 classes of 16 x 16 RGB images (the class is the brightness), 24 to train on and 6 to test."""
    count = {"train": 24, "test": 6}[split]
    labels = np.arange(count) % 3
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = (rng.integers(0, 40, (count, 16, 16, 3)) + 100 * labels[:, None, None, None]).astype(np.uint8)
    return ArrayImages(images, labels)


def test_a_registered_source_works_through_the_data_module_and_a_fit(tmp_path):
    spec = register_source("checkerboards", checkerboards, SourceInfo(mean=(0.4,) * 3, std=(0.3,) * 3, num_classes=3))
    assert source("checkerboards") is spec and selfsup.data.register_source is register_source
    data = SSLDataModule(dataset="checkerboards", image_size=16, batch_size=8, eval_batch_size=64, num_workers=0)
    data.setup("fit")
    assert data.preprocessing.mean == (0.4,) * 3, "the source's statistics are the default preprocessing"
    assert data.has_labels and data.num_classes == 3 and data.split("probe_train") is data.split("train")
    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 8 and batch.views[0].shape == (8, 3, 16, 16)
    test = next(iter(data.probe_dataloader("test")))
    assert sorted(test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    _, trainer = tiny_fit("simclr", tmp_path, 2, dataset="checkerboards")
    assert trainer.global_step == 2 and trainer.datamodule.dataset == "checkerboards"


def test_an_unlabelled_source_has_no_probes_and_says_so():
    register_source("noise", lambda split, root=None: ArrayImages(np.zeros((4, 8, 8), np.uint8), None),
                    splits=("train", None, None))
    data = SSLDataModule(dataset="noise", image_size=8, batch_size=2, num_workers=0)
    assert not data.has_labels and "dataset 'noise' has no labelled probe-train split" in data.probe_unavailable_reason


def test_a_duplicate_name_is_an_error_unless_overwrite():
    register_source("mine", checkerboards)
    with pytest.raises(ValueError, match=r"'mine' is already registered \(.*checkerboards\).*overwrite=True"):
        register_source("mine", lambda split, root=None: None)
    with pytest.raises(ValueError, match="'folder' is already registered"):
        register_source("folder", checkerboards)
    replacement = register_source("mine", checkerboards, splits=("train", None, None), overwrite=True)
    assert source("mine") is replacement and replacement.splits == ("train", None, None)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(name="", build=checkerboards), ValueError, "non-empty string"),
    (dict(name="x", build="checkerboards"), TypeError, "is not callable"),
    (dict(name="x", build=checkerboards, splits=("train", "test")), ValueError, r"must be \(pretraining split"),
])
def test_bad_registrations_name_the_problem(kwargs, error, match):
    with pytest.raises(error, match=match):
        register_source(**kwargs)
    assert "x" not in datasets._SOURCES, "a rejected registration leaves nothing behind"


def test_the_built_in_sources_are_registered_and_an_unknown_name_points_to_register_source():
    built_in = {"fashion_mnist_embedded", "fashion_mnist", "cifar10", "cifar100", "stl10", "folder"}
    assert built_in <= set(datasets._SOURCES)
    assert source("stl10").splits == ("train+unlabeled", "train", "test") and source("cifar100").info.num_classes == 100
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet42'.*register your own with "
                                         r"selfsup.data.register_source"):
        source("imagenet42")


def test_module_colon_name_imports_the_module_that_registers_the_source(tmp_path, monkeypatch):
    (tmp_path / "lab_sources.py").write_text(
        "import numpy as np\n"
        "from selfsup.data import register_source\n"
        "from selfsup.data.datasets import ArrayImages\n"
        "register_source('scans', lambda split, root=None: ArrayImages(np.zeros((4, 8, 8), np.uint8), None),\n"
        "                splits=('train', None, None), overwrite=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = SSLDataModule(dataset="lab_sources:scans", image_size=8, batch_size=2, num_workers=0)
    image, label = data.split("train")[0]
    assert len(data.split("train")) == 4 and torch.equal(image, torch.zeros(1, 8, 8, dtype=torch.uint8)) and label == -1
    with pytest.raises(ValueError, match="registered no source 'typo'"):
        source("lab_sources:typo")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_here'"):
        source("no_such_module_here:scans")
