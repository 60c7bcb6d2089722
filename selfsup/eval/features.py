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
