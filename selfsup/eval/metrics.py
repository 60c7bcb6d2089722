"""Classification metrics beyond top-k for imbalanced or clinical labels, from ``torchmetrics``.

``balanced_accuracy`` (the mean of the per-class recalls), ``macro_auc`` (one-vs-rest ROC AUC of the
predicted probabilities, averaged over classes), ``kappa`` (Cohen's kappa of the predicted labels) and the
accuracy of each class (``class<c>_accuracy``). ``wanted`` decides when they are reported: ``always``,
``never``, or ``auto``: where the labels call for them, for two classes or when the largest class of the
train split has more than 3 times the images of the smallest (a clearly imbalanced problem, not the sampling
noise of a small class-balanced subset).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import (multiclass_accuracy, multiclass_auroc,
                                                    multiclass_cohen_kappa)

WANTED = ("auto", "always", "never")


def calls_for_clinical_metrics(labels: Tensor, num_classes: int, wanted: str = "auto") -> bool:
    """Whether to report :func:`clinical_metrics` for a problem with train ``labels`` (module docstring)."""
    if wanted not in WANTED:
        raise ValueError(f"clinical_metrics={wanted!r} must be one of {WANTED}")
    if wanted != "auto":
        return wanted == "always"
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).float()
    present = counts[counts > 0]
    return num_classes == 2 or bool(present.max() > 3 * present.min())


def clinical_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """The metrics of the module docstring from class ``scores`` ``(N, C)`` (logits) and ``labels`` ``(N,)``."""
    scores, labels = scores.float().cpu(), labels.long().cpu()
    predictions = scores.argmax(1)
    per_class = multiclass_accuracy(predictions, labels, num_classes, average=None)
    out = {"balanced_accuracy": float(multiclass_accuracy(predictions, labels, num_classes, average="macro")),
           "macro_auc": float(multiclass_auroc(scores.softmax(1), labels, num_classes, average="macro")),
           "kappa": float(multiclass_cohen_kappa(predictions, labels, num_classes))}
    out.update({f"class{c}_accuracy": float(a) for c, a in enumerate(per_class)})
    return out
