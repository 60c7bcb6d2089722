"""Start a new run from the encoder weights of a selfsup checkpoint or an export."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from selfsup.checkpoint import init_encoder_from
from selfsup.models.teacher import teachers


class InitFrom(L.Callback):
    """Load the encoder weights of ``path`` (a selfsup ``.ckpt``, an export directory or its
    ``model.safetensors``) into ``pl_module.encoder`` when fit sets up, before any wrapping.

    Different from ``--ckpt_path``, which resumes a run: on resume the restored weights win and this
    does nothing. ``path=None`` (the default) does nothing either. EMA teachers are reset to the loaded
    student. The weights read are the checkpoint's representation (its student or its teacher encoder).
    """

    def __init__(self, path: str | None = None):
        self.path = path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.path is None or trainer.ckpt_path:
            return
        init_encoder_from(pl_module.encoder, self.path)
        for _, teacher in teachers(pl_module):  # an EMA teacher starts from the student it follows
            teacher.reset()
        rank_zero_info(f"[selfsup] encoder initialised from {self.path}")
