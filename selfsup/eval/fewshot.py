"""Few-shot (semi-supervised) evaluation: train on 1% / 10% of the labels, class-balanced.

As in SimCLR/BYOL's semi-supervised tables, but on frozen features: for each label fraction and each
of several fixed seeds, draw the same fraction of every class, fit the linear probe and a
nearest-class-mean classifier on those images only, and report mean and standard deviation of test
top-1 over the seeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.eval.knn import topk_accuracy
from selfsup.eval.linear import linear_probe
from selfsup.eval.protocols import EvalContext, register_protocol, score_row


def class_balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of ``round(fraction * count)`` images of every class, drawn with ``seed``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        take = round(fraction * len(members))
        if take == 0:
            raise ValueError(f"label fraction {fraction} gives 0 images of class {label} ({len(members)} "
                             f"images); use a fraction of at least {1 / (2 * len(members)):.3g} or more data")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def nearest_class_mean(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                       num_classes: int) -> Tensor:
    """Cosine similarity ``(N_test, C)`` of each test feature to each class's mean normalised feature."""
    train = F.normalize(train_features.float(), dim=1)
    means = torch.zeros(num_classes, train.shape[1], device=train.device).index_add_(0, train_labels, train)
    return F.normalize(test_features.float(), dim=1) @ F.normalize(means, dim=1).T


@register_protocol("fewshot")
def fewshot(context: EvalContext, fractions: tuple[float, ...] = (0.01, 0.1), seeds: tuple[int, ...] = (0, 1, 2),
            weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2)) -> list[dict]:
    """Linear-probe and nearest-class-mean top-1 with a fraction of the train labels (mean ± std over seeds)."""
    if len(seeds) < 1:
        raise ValueError("fewshot needs at least one seed (3 or more for a meaningful std)")
    f = context.frozen()
    num_classes = context.num_classes
    rows = []
    for fraction in fractions:
        linear_scores, mean_scores = [], []
        for seed in seeds:
            index = class_balanced_subset(f.train_labels, fraction, seed)
            x, y = f.train_features[index], f.train_labels[index]
            linear_scores.append(linear_probe(x, y, f.test_features, f.test_labels, tuple(weight_decays),
                                              seed=seed)["top1"])
            ncm = nearest_class_mean(x, y, f.test_features, num_classes)
            mean_scores.append(topk_accuracy(ncm, f.test_labels))
        for classifier, scores in (("linear", linear_scores), ("nearest_class_mean", mean_scores)):
            values = torch.tensor(scores)
            rows.append(score_row("fewshot", f"{classifier}_top1@{fraction:g}", values.mean().item(),
                                  values.std().item() if len(values) > 1 else 0.0, fraction=fraction,
                                  seeds=list(seeds), images_per_class=len(index) // max(1, len(y.unique()))))
    return rows
