"""Unreadable images: counted per step, summed over the ranks, and fatal when nothing decodes."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from selfsup.distributed import all_reduce_sum


class DataHealth(L.Callback):
    """Counts the unreadable files the training loader met (``Batch.skipped``; they were replaced) and
    logs ``data/skipped_images``. At the end of an epoch in which files were read but no rank decoded a
    single image it stops with a clear error; at the end of fit it prints the total over all ranks."""

    def __init__(self) -> None:
        self.skipped_images = 0
        self._decoded = self._skipped = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._decoded = self._skipped = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        skipped, invalid = getattr(batch, "skipped", 0), getattr(batch, "invalid", 0)
        self.skipped_images += skipped
        self._skipped += skipped
        self._decoded += len(batch) - invalid  # placeholders are not decoded images
        if skipped:
            pl_module.log("data/skipped_images", float(self.skipped_images), batch_size=max(1, len(batch)))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        decoded, skipped = totals(self._decoded, self._skipped, device=pl_module.device)
        if decoded == 0 and skipped > 0:
            raise ValueError(f"no training image could be decoded this epoch ({skipped} unreadable files "
                             "skipped): every file is broken or not an image; check data.root and the "
                             "warnings above, or set data.strict_images=true to stop at the first bad file")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (skipped,) = totals(self.skipped_images, device=pl_module.device)
        rank_zero_info(f"[selfsup] skipped {skipped} unreadable images (each replaced by another image)")

    def state_dict(self) -> dict[str, int]:
        return {"skipped_images": self.skipped_images}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_images = state.get("skipped_images", 0)


def totals(*counts: int, device: torch.device | str = "cpu") -> list[int]:
    """The counts summed over every rank (every rank must call this together)."""
    return [int(v) for v in all_reduce_sum(torch.tensor([float(c) for c in counts], device=device)).tolist()]
