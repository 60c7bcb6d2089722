"""Frozen-feature extraction: run an encoder once over a labelled loader."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                     bf16: bool = False) -> tuple[Tensor, Tensor]:
    """Pooled float32 features and labels for every readable image of ``loader`` (eval mode)."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    feats, labels = [], []
    try:
        with autocast:
            for batch in loader:
                if len(batch) == 0:
                    continue
                feats.append(encoder(batch.views[0].to(device)).float().cpu())
                labels.append(batch.labels)
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("no readable images to extract features from")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def recalibrate_batchnorm(encoder: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                          max_batches: int = 20) -> nn.Module:
    """Re-estimate BatchNorm running statistics from ``loader`` images (no labels, no gradient).

    A randomly initialised network has no BatchNorm statistics, so in eval mode its activations are
    not normalised at all; scoring it that way would flatter any pretrained encoder. This gives the
    random baseline the same benefit a trained network has.
    """
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return encoder
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was_training = encoder.training
    encoder.train()
    try:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            if len(batch):
                encoder(batch.views[0].to(device))
    finally:
        encoder.train(was_training)
        for m, momentum in saved:
            m.momentum = momentum
    return encoder
