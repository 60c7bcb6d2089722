"""Weighted cosine kNN against a brute-force NumPy reference, and the registered ``knn`` protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.eval.knn import knn_accuracy, knn_predict
from selfsup.eval.protocols import EvalContext, FeatureSet, run_protocols
from tests.helpers.checkpoints import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_knn(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int, temperature: float,
                    num_classes: int) -> np.ndarray:
    """Explicit loops: cosine similarity to every training sample, the k largest vote exp(sim / T)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    for i, query in enumerate(test):
        query = query / np.linalg.norm(query)
        similarities = [float(query @ row) for row in train]
        for j in sorted(range(len(train)), key=lambda j: -similarities[j])[:k]:
            scores[i, labels[j]] += np.exp(similarities[j] / temperature)
    return scores


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.5), (20, 0.07)])
def test_knn_matches_brute_force(k: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(k)
    train, test = torch.randn(60, 8, generator=generator), torch.randn(25, 8, generator=generator)
    labels = torch.randint(0, 4, (60,), generator=generator)
    ours = knn_predict(train, labels, test, k, temperature, num_classes=4, chunk_size=7).double().numpy()
    reference = brute_force_knn(train.double().numpy(), labels.numpy(), test.double().numpy(), k, temperature, 4)
    np.testing.assert_allclose(ours, reference, rtol=1e-4)


def test_knn_accuracy_top1_top5_against_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(7, 16, generator=generator) * 3
    train_labels, test_labels = torch.arange(140) % 7, torch.arange(70) % 7
    train = centres[train_labels] + torch.randn(140, 16, generator=generator) * 5
    test = centres[test_labels] + torch.randn(70, 16, generator=generator) * 5
    reference = brute_force_knn(train.numpy(), train_labels.numpy(), test.numpy(), 20, 0.07, 7)
    ranked = np.argsort(-reference, axis=1)
    scores = knn_accuracy(train, train_labels, test, test_labels)
    assert scores["top1"] == pytest.approx((ranked[:, 0] == test_labels.numpy()).mean())
    assert scores["top5"] == pytest.approx((ranked[:, :5] == test_labels.numpy()[:, None]).any(1).mean())
    assert 0.3 < scores["top1"] < 1.0 and scores["top5"] >= scores["top1"]


def test_knn_protocol_is_knn_accuracy_with_its_settings() -> None:
    generator = torch.Generator().manual_seed(1)
    features = FeatureSet(torch.randn(50, 6, generator=generator), torch.randint(0, 5, (50,), generator=generator),
                          torch.randn(20, 6, generator=generator), torch.randint(0, 5, (20,), generator=generator))
    rows = run_protocols(["knn"], EvalContext(features), {"knn": {"k": 3, "temperature": 0.2}})
    expected = knn_accuracy(features.train_features, features.train_labels, features.test_features,
                            features.test_labels, 3, 0.2)
    assert {row["metric"]: row["value"] for row in rows} == pytest.approx(expected)
    assert rows[0]["settings"] == {"k": 3, "temperature": 0.2}


def test_unknown_setting_and_protocol_are_named() -> None:
    context = EvalContext(None)
    with pytest.raises(ValueError, match=r"no setting\(s\) \['kk'\]"):
        run_protocols(["knn"], context, {"knn": {"kk": 3}})
    with pytest.raises(ValueError, match="unknown protocol 'lora'.*fewshot"):
        run_protocols(["lora"], context)
