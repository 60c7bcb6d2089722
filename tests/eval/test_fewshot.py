"""Few-shot protocol: class-balanced deterministic label fractions, nearest-class-mean, mean ± std rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.eval.fewshot import class_balanced_subset, nearest_class_mean
from selfsup.eval.protocols import EvalContext, FeatureSet, run_protocols
from tests.helpers.checkpoints import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def imbalanced_labels() -> torch.Tensor:
    counts = {0: 300, 1: 200, 2: 100, 3: 400}
    labels = torch.cat([torch.full((n,), c) for c, n in counts.items()])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


def test_fractions_are_class_balanced_and_deterministic() -> None:
    labels = imbalanced_labels()
    index = class_balanced_subset(labels, 0.1, seed=0)
    counts = torch.bincount(labels[index]).tolist()
    assert counts == [30, 20, 10, 40]  # 10% of every class
    assert len(set(index.tolist())) == len(index)
    assert torch.equal(index, class_balanced_subset(labels, 0.1, seed=0))
    assert not torch.equal(index, class_balanced_subset(labels, 0.1, seed=1))


def test_a_fraction_that_empties_a_class_is_an_error() -> None:
    labels = imbalanced_labels()
    with pytest.raises(ValueError, match=r"label fraction 0.001 gives 0 images of class \d \(\d+ images\)"):
        class_balanced_subset(labels, 0.001, seed=0)
    with pytest.raises(ValueError, match="must be in"):
        class_balanced_subset(labels, 0.0, seed=0)


def test_nearest_class_mean_matches_numpy() -> None:
    generator = torch.Generator().manual_seed(0)
    train, labels = torch.randn(40, 5, generator=generator), torch.arange(40) % 4
    test = torch.randn(10, 5, generator=generator)
    unit = train.numpy() / np.linalg.norm(train.numpy(), axis=1, keepdims=True)
    means = np.stack([unit[labels.numpy() == c].mean(0) for c in range(4)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    reference = (test.numpy() / np.linalg.norm(test.numpy(), axis=1, keepdims=True)) @ means.T
    np.testing.assert_allclose(nearest_class_mean(train, labels, test, 4).numpy(), reference, rtol=1e-5, atol=1e-6)


def test_fewshot_rows_mean_and_std_over_seeds() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=generator) * 3
    train_labels, test_labels = torch.arange(1000) % 5, torch.arange(200) % 5
    features = FeatureSet(centres[train_labels] + torch.randn(1000, 16, generator=generator), train_labels,
                          centres[test_labels] + torch.randn(200, 16, generator=generator), test_labels)
    rows = run_protocols(["fewshot"], EvalContext(features), {"fewshot": {"weight_decays": [1e-3]}})
    assert [row["metric"] for row in rows] == ["linear_top1@0.01", "nearest_class_mean_top1@0.01",
                                               "linear_top1@0.1", "nearest_class_mean_top1@0.1"]
    for row in rows:
        assert row["value"] > 0.8 and row["std"] is not None and row["std"] >= 0
        assert row["settings"]["seeds"] == [0, 1, 2]
    assert rows[0]["settings"]["images_per_class"] == 2 and rows[2]["settings"]["images_per_class"] == 20
