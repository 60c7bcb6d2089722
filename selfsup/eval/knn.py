"""Weighted cosine k-nearest-neighbour classification (Wu et al. 2018), as used by DINO and solo-learn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy


@torch.no_grad()
def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk_size: int = 1024) -> Tensor:
    """Class scores ``(N_test, C)``: each of the ``k`` most cosine-similar training samples votes
    for its class with weight ``exp(similarity / temperature)``."""
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} labels")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_features))
    train = F.normalize(train_features.float(), dim=1)
    scores = []
    for chunk in F.normalize(test_features.float(), dim=1).split(chunk_size):
        sim, idx = (chunk @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores (torchmetrics, micro-averaged)."""
    num_classes = scores.shape[1]
    return multiclass_accuracy(scores, labels, num_classes, top_k=min(k, num_classes), average="micro").item()


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Top-1 and top-5 weighted kNN accuracy."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    return {"top1": topk_accuracy(scores, test_labels, 1), "top5": topk_accuracy(scores, test_labels, 5)}
