"""Retrieval on frozen features: each test image queries the train split by cosine similarity.

``rank1``: the share of queries whose nearest train image has the query's label. ``map``: the mean over
queries of the average precision of the whole ranked train split, an image of the query's label counting as
relevant (queries whose label no train image has are left out). Queries are ranked in chunks, so memory grows
with ``chunk_size x train images``; the ranking itself costs ``train log train`` per query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.eval.protocols import EvalContext, register_protocol, score_row


@torch.no_grad()
def retrieval_scores(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor,
                     chunk_size: int = 256) -> dict[str, float]:
    """Rank-1 and mAP of cosine nearest neighbours from ``test`` queries into the ``train`` gallery."""
    if len(train) == 0 or len(test) == 0:
        raise ValueError("retrieval needs train and test features")
    gallery, queries = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    ranks = torch.arange(1, len(gallery) + 1, device=gallery.device, dtype=torch.float32)
    hits, precisions, counted = 0.0, 0.0, 0
    for start in range(0, len(queries), chunk_size):
        q, y = queries[start:start + chunk_size], test_labels[start:start + chunk_size].to(gallery.device)
        order = (q @ gallery.T).argsort(dim=1, descending=True)
        relevant = (train_labels.to(gallery.device)[order] == y[:, None]).float()    # (q, N) in ranked order
        hits += float(relevant[:, 0].sum())
        total = relevant.sum(1)
        average_precision = (relevant.cumsum(1) / ranks * relevant).sum(1) / total.clamp_min(1)
        precisions += float(average_precision[total > 0].sum())
        counted += int((total > 0).sum())
    return {"rank1": hits / len(queries), "map": precisions / max(counted, 1)}


@register_protocol("retrieval")
def retrieval(context: EvalContext, chunk_size: int = 256) -> list[dict]:
    """Rank-1 and mAP of cosine retrieval from the test split into the train split (frozen features)."""
    f = context.frozen()
    scores = retrieval_scores(f.train_features, f.train_labels, f.test_features, f.test_labels, chunk_size)
    return [score_row("retrieval", metric, scores[metric]) for metric in ("rank1", "map")]
