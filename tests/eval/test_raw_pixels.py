"""The raw-pixel baseline: RawPixels against a block mean written here, and ProbeReport's raw-pixel kNN
row against a brute-force kNN on the loader's own pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.data.datamodule import SSLDataModule
from selfsup.eval.callbacks import frozen_scores
from selfsup.eval.features import RawPixels
from tests.data.test_probe_splits import write_folder
from tests.eval.test_knn import brute_force_knn


def test_raw_pixels_average_down_to_the_cap_and_flatten_by_channel():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    expected = x.numpy().reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(2, -1)   # 2 x 2 blocks
    np.testing.assert_allclose(RawPixels(max_side=4)(x).numpy(), expected)
    torch.testing.assert_close(RawPixels(max_side=32)(x), x.flatten(1))                # small images: as they are
    with pytest.raises(ValueError, match="max_side"):
        RawPixels(max_side=0)


def test_the_raw_pixel_knn_row_is_knn_on_the_pixels(tmp_path):
    classes = ("a", "b", "c")
    data = SSLDataModule(dataset="folder", image_size=8, num_workers=0, eval_batch_size=16,
                         root=str(write_folder(tmp_path / "train", classes, per_class=8, seed=1)),
                         test_root=str(write_folder(tmp_path / "test", classes, per_class=4, seed=2)))
    scores = frozen_scores(RawPixels(), data, torch.device("cpu"), protocols=("knn",))

    def pixels(split):
        batches = list(data.probe_dataloader(split))
        return (torch.cat([b.views[0].flatten(1) for b in batches]).double().numpy(),
                torch.cat([b.labels for b in batches]).numpy())

    (train, train_y), (test, test_y) = pixels("train"), pixels("test")
    votes = brute_force_knn(train, train_y, test, k=20, temperature=0.07, num_classes=3)
    assert scores["knn_top1"] == pytest.approx(float((votes.argmax(1) == test_y).mean()))
