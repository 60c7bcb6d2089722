"""Clinical metrics against plain computations, and when the linear protocol reports them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.eval.metrics import calls_for_clinical_metrics, clinical_metrics
from selfsup.eval.protocols import EvalContext, FeatureSet, run_protocols


def pairwise_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney)."""
    wins = sum(float(p > n) + 0.5 * float(p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def test_metrics_match_plain_computations():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    scores = rng.normal(size=(60, 3)) + 1.5 * np.eye(3)[labels]            # informative, not perfect
    got = clinical_metrics(torch.tensor(scores), torch.tensor(labels), 3)
    predicted = scores.argmax(1)
    recalls = [float((predicted[labels == c] == c).mean()) for c in range(3)]
    assert got["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert [got[f"class{c}_accuracy"] for c in range(3)] == pytest.approx(recalls)
    probabilities = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    aucs = [pairwise_auc(probabilities[labels == c, c], probabilities[labels != c, c]) for c in range(3)]
    assert got["macro_auc"] == pytest.approx(np.mean(aucs), abs=1e-6)
    observed = float((predicted == labels).mean())
    expected = sum(float((predicted == c).mean() * (labels == c).mean()) for c in range(3))
    assert got["kappa"] == pytest.approx((observed - expected) / (1 - expected))


def test_a_perfect_and_a_random_classifier():
    labels = torch.arange(4).repeat(25)
    perfect = clinical_metrics(torch.eye(4)[labels] * 5, labels, 4)
    assert perfect["balanced_accuracy"] == 1 and perfect["macro_auc"] == 1 and perfect["kappa"] == pytest.approx(1)
    noise = clinical_metrics(torch.randn(100, 4, generator=torch.Generator().manual_seed(0)), labels, 4)
    assert abs(noise["kappa"]) < 0.2 and 0.3 < noise["macro_auc"] < 0.7


def test_the_linear_protocol_adds_them_where_the_labels_call_for_them():
    generator = torch.Generator().manual_seed(0)
    balanced = torch.arange(3).repeat(20)
    imbalanced = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(5, dtype=torch.long), torch.full((5,), 2)])
    for labels, expect in ((balanced, False), (imbalanced, True), (torch.arange(2).repeat(30), True)):
        features = torch.randn(60, 4, generator=generator) + labels[:, None].float()
        data = FeatureSet(features, labels, features[:30], labels[:30])
        rows = {r["metric"] for r in run_protocols(["linear"], EvalContext(data))}
        assert ("macro_auc" in rows) is expect and {"top1", "top5"} <= rows
    assert calls_for_clinical_metrics(balanced, 3, "always") and not calls_for_clinical_metrics(imbalanced, 3, "never")
    with pytest.raises(ValueError, match="clinical_metrics"):
        calls_for_clinical_metrics(balanced, 3, "sometimes")
