"""Preemption: on SIGTERM save ``last.ckpt`` where ``--ckpt_path last`` finds it, and exit cleanly."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (preemption, ``scancel``, SLURM's time limit) save ``last.ckpt`` and exit cleanly.

    Lightning turns SIGTERM into a ``SIGTERMException`` on every rank after the current step (rank 0's
    signal is broadcast); this saves the complete training state where ``--ckpt_path last`` finds it.
    Under SLURM with auto-requeue, Lightning itself handles the requeue signal (SIGUSR1) by saving
    ``hpc_ckpt_N.ckpt`` and requeuing.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = preemption_checkpoint_path(trainer)
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            # The saved ModelCheckpoint state then names this file as its last checkpoint: resumed, the
            # callback overwrites last.ckpt instead of versioning around it (last-v1.ckpt, last-v2.ckpt...).
            callback.last_model_path = path
        trainer.save_checkpoint(path)
        rank_zero_info(f"[selfsup] SIGTERM at step {trainer.global_step}: saved {path}; "
                       "resume with --ckpt_path last")


def preemption_checkpoint_path(trainer: L.Trainer) -> str:
    """``<checkpoint dir>/last.ckpt`` of the run's ModelCheckpoint, else ``<root>/checkpoints/last.ckpt``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
