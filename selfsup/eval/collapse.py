"""A collapse monitor during fit: RankMe, the effective rank of the embeddings.

Reference: Garrido, Balestriero, Najman and LeCun, "RankMe: Assessing the Downstream Performance of Pretrained
Self-Supervised Representations by Their Rank", ICML 2023. With ``sigma_k`` the singular values of an
``(N, D)`` matrix of embeddings and ``p_k = sigma_k / sum(sigma) + eps``, ``RankMe = exp(-sum_k p_k log p_k)``:
``min(N, D)`` for embeddings spread evenly over every direction, 1 for embeddings that collapsed onto a line.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from selfsup.distributed import gather_rows, world_size


def rankme(embeddings: Tensor, eps: float = 1e-7) -> Tensor:
    """RankMe of ``(N, D)`` embeddings, in float32 (a 0-d tensor; no host synchronisation)."""
    if embeddings.ndim != 2 or min(embeddings.shape) < 1:
        raise ValueError(f"rankme needs (N, D) embeddings, got {tuple(embeddings.shape)}")
    singular = torch.linalg.svdvals(embeddings.float())
    p = singular / singular.sum().clamp_min(1e-30) + eps
    return torch.exp(-(p * p.log()).sum())


class RankMe(L.Callback):
    """Log ``train/rankme`` of the pooled features that ``training_loss`` returns (``"features"``: the first
    view's, of the student or the teacher as the method reports them) every ``every_n_steps`` optimizer steps,
    and warn when it falls below ``warn_fraction`` of its ceiling ``min(N, D)`` (at least 2): a sign of
    (dimensional) collapse.

    The features of the last steps are kept, ``num_samples`` rows over all ranks together (rows gathered from
    every rank on the logging steps, where every rank takes part in the same gather). Reading the value for the
    warning synchronises the host once per logging step, not otherwise.
    """

    def __init__(self, every_n_steps: int = 100, num_samples: int = 4096, warn_fraction: float = 0.01):
        if every_n_steps < 1 or num_samples < 2:
            raise ValueError(f"RankMe: every_n_steps={every_n_steps} must be >= 1 and num_samples={num_samples} >= 2")
        if not 0 <= warn_fraction < 1:
            raise ValueError(f"RankMe: warn_fraction={warn_fraction} must be in [0, 1)")
        self.every_n_steps, self.num_samples, self.warn_fraction = every_n_steps, num_samples, warn_fraction
        self.buffer: list[Tensor] = []
        self.values: list[tuple[int, float]] = []
        self.last_step = -1  # accumulation micro-steps share a step: one value per optimizer step
        self.told = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        features = outputs.get("features") if isinstance(outputs, dict) else None
        if features is None:  # a method that reports none: the same on every rank
            if not self.told:
                rank_zero_info(f"[selfsup] RankMe: {type(pl_module).__name__} reports no features; nothing to monitor")
                self.told = True
            return
        self.buffer.append(features.detach().flatten(1).float())
        per_rank = -(-self.num_samples // world_size())
        while len(self.buffer) > 1 and sum(len(f) for f in self.buffer[1:]) >= per_rank:
            self.buffer.pop(0)
        if trainer.global_step % self.every_n_steps or trainer.global_step == self.last_step:
            return
        self.last_step = trainer.global_step
        everyone = gather_rows(torch.cat(self.buffer)[-per_rank:])
        value = rankme(everyone)
        pl_module.log("train/rankme", value, batch_size=1)
        ceiling = min(everyone.shape)
        value = float(value)
        self.values.append((trainer.global_step, value))
        if value < max(2.0, self.warn_fraction * ceiling):
            rank_zero_warn(f"[selfsup] RankMe {value:.2f} of at most {ceiling} at step {trainer.global_step}: the "
                           "embeddings span very few directions (collapse?)")
