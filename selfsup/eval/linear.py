"""Linear probe on frozen features: multinomial logistic regression fitted by full-batch L-BFGS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.eval.knn import topk_accuracy
from selfsup.eval.metrics import calls_for_clinical_metrics
from selfsup.eval.metrics import clinical_metrics as metrics


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = 100, init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Weights ``(D, C)`` and bias ``(C,)`` minimising cross entropy + ``weight_decay/2 * |W|^2``,
    starting from zeros or from ``init`` (a warm start: the problem is convex, only speed changes)."""
    zeros = dict(device=features.device)
    weight = torch.zeros(features.shape[1], num_classes, **zeros) if init is None else init[0].clone()
    bias = torch.zeros(num_classes, **zeros) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Scale every feature by the train split's mean and std (BatchNorm without affine, frozen)."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2), holdout_fraction: float = 0.1,
                 max_iter: int = 100, seed: int = 0, batchnorm: bool = True,
                 clinical_metrics: str = "never") -> dict[str, float]:
    """Test accuracy of a logistic-regression probe.

    The weight decay is chosen on a held-out ``holdout_fraction`` of the train split (never on the
    test split), then the probe is refitted on the whole train split. ``batchnorm`` standardises the
    features first (BatchNorm without affine, as in the MAE linear probe). ``clinical_metrics``
    (``auto``/``always``/``never``) adds balanced accuracy, macro AUC, Cohen's kappa and per-class accuracy
    (:mod:`selfsup.eval.metrics`).
    """
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train, test = train_features.float(), test_features.float()
    if batchnorm:
        train, test = standardise(train, test)
    best_wd, start = weight_decays[0], None
    if len(weight_decays) > 1:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        n_hold = max(1, int(len(train) * holdout_fraction))
        hold, fit = perm[:n_hold], perm[n_hold:]
        accs, solutions, previous = {}, {}, None
        for wd in sorted(weight_decays, reverse=True):  # strongest first, each warm-starting the next
            previous = solutions[wd] = fit_logistic(train[fit], train_labels[fit], num_classes, wd, max_iter,
                                                    init=previous)
            accs[wd] = topk_accuracy(train[hold] @ solutions[wd][0] + solutions[wd][1], train_labels[hold])
        best_wd = max(weight_decays, key=accs.__getitem__)
        start = solutions[best_wd]
    w, b = fit_logistic(train, train_labels, num_classes, best_wd, max_iter, init=start)
    scores = test @ w + b
    out = {"top1": topk_accuracy(scores, test_labels, 1), "top5": topk_accuracy(scores, test_labels, 5),
           "weight_decay": best_wd}
    if calls_for_clinical_metrics(train_labels, num_classes, clinical_metrics):
        out.update(metrics(scores, test_labels, num_classes))
    return out
