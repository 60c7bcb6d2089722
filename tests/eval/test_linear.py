"""The L-BFGS linear probe: high accuracy on separable features, chance on shuffled labels, and a
weight-decay sweep that never looks at the test split."""

from __future__ import annotations

import pytest
import torch

from selfsup.eval import linear as linear_module
from selfsup.eval.linear import linear_probe
from selfsup.eval.protocols import EvalContext, FeatureSet, run_protocols
from tests.helpers.checkpoints import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def separable(n: int, classes: int = 5, dim: int = 32, seed: int = 0, spread: float = 2.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes along different directions with a margin, plus noise and a large per-feature scale spread."""
    directions = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)))[0][:classes] * 4
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    features = directions[labels] + 0.5 * torch.randn(n, dim, generator=generator)
    return features * torch.logspace(-spread, spread, dim), labels


@pytest.mark.parametrize("batchnorm", [True, False])
def test_linearly_separable_features_are_classified(batchnorm: bool) -> None:
    spread = 2.0 if batchnorm else 0.0  # standardising is what makes a 1e4 scale spread easy for L-BFGS
    train, train_labels = separable(500, spread=spread)
    test, test_labels = separable(200, seed=1, spread=spread)
    scores = linear_probe(train, train_labels, test, test_labels, batchnorm=batchnorm)
    assert scores["top1"] > 0.95


def test_shuffled_labels_give_chance() -> None:
    train, train_labels = separable(500)
    test, test_labels = separable(500, seed=1)
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(3))]
    scores = linear_probe(train, shuffled, test, test_labels)
    assert abs(scores["top1"] - 0.2) < 0.08, scores  # 5 classes


def test_weight_decay_is_chosen_without_the_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    train, train_labels = separable(300)
    test, test_labels = separable(100, seed=1)
    seen: list[int] = []
    original = linear_module.fit_logistic

    def spy(features: torch.Tensor, *args, **kwargs):
        seen.append(len(features))
        return original(features, *args, **kwargs)

    monkeypatch.setattr(linear_module, "fit_logistic", spy)
    chosen = linear_probe(train, train_labels, test, test_labels)["weight_decay"]
    garbage = torch.randint(0, 5, (100,), generator=torch.Generator().manual_seed(9))
    assert linear_probe(train, train_labels, test, garbage)["weight_decay"] == chosen
    assert seen[:4] == [270, 270, 270, 300]  # three fits on 90% of train for the sweep, then all of train


def test_linear_protocol_reports_settings() -> None:
    train, train_labels = separable(200)
    test, test_labels = separable(100, seed=1)
    rows = run_protocols(["linear"], EvalContext(FeatureSet(train, train_labels, test, test_labels)),
                         {"linear": {"weight_decays": [1e-3], "batchnorm": False}})
    assert [row["metric"] for row in rows] == ["top1", "top5"]
    assert rows[0]["value"] > 0.9
    assert rows[0]["settings"]["weight_decay"] == 1e-3 and rows[0]["settings"]["batchnorm"] is False
