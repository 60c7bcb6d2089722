"""Retrieval: Rank-1 and mAP against a loop over the ranked gallery, a separable case it must solve, a random one
it must not, and the registered protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.eval.protocols import EvalContext, FeatureSet, run_protocols
from selfsup.eval.retrieval import retrieval_scores


def loop_retrieval(train, train_y, test, test_y):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    hits, aps = 0, []
    for query, label in zip(test, test_y):
        query = query / np.linalg.norm(query)
        ranked = sorted(range(len(train)), key=lambda j: -float(query @ train[j]))
        hits += int(train_y[ranked[0]] == label)
        found, precision_sum = 0, 0.0
        for position, j in enumerate(ranked, start=1):
            if train_y[j] == label:
                found += 1
                precision_sum += found / position
        if found:
            aps.append(precision_sum / found)
    return hits / len(test), float(np.mean(aps))


def test_rank1_and_map_match_a_loop():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(40, 6)), rng.normal(size=(15, 6))
    train_y, test_y = rng.integers(0, 3, 40), rng.integers(0, 4, 15)          # label 3: no relevant image
    got = retrieval_scores(torch.tensor(train), torch.tensor(train_y), torch.tensor(test), torch.tensor(test_y),
                           chunk_size=4)
    rank1, mean_ap = loop_retrieval(train, train_y, test, test_y)
    assert got["rank1"] == pytest.approx(rank1) and got["map"] == pytest.approx(mean_ap, rel=1e-5)


def test_separable_classes_are_retrieved_perfectly_and_random_ones_at_chance():
    centres = torch.eye(4) * 10
    labels = torch.arange(4).repeat_interleave(25)
    generator = torch.Generator().manual_seed(0)
    train = centres[labels] + torch.randn(100, 4, generator=generator)
    test = centres[labels] + torch.randn(100, 4, generator=generator)
    assert retrieval_scores(train, labels, test, labels) == {"rank1": 1.0, "map": pytest.approx(1.0)}
    noise = retrieval_scores(torch.randn(400, 16, generator=generator), torch.randint(0, 4, (400,), generator=generator),
                             torch.randn(200, 16, generator=generator), torch.randint(0, 4, (200,), generator=generator))
    assert 0.1 < noise["rank1"] < 0.4 and 0.2 < noise["map"] < 0.32          # chance: 0.25


def test_the_protocol_reports_both_rows():
    features = FeatureSet(torch.randn(20, 3), torch.randint(0, 2, (20,)), torch.randn(6, 3), torch.randint(0, 2, (6,)))
    rows = run_protocols(["retrieval"], EvalContext(features))
    assert [(r["protocol"], r["metric"]) for r in rows] == [("retrieval", "rank1"), ("retrieval", "map")]
    assert all(0 <= r["value"] <= 1 for r in rows)
