"""Callbacks that interrupt a fit the way a cluster does, in this process (no subprocess to time out)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after training step ``step``, as a cluster preempting the job would.

    Lightning's signal handler notes it; after the step the fit stops with ``SIGTERMException`` (a
    ``SystemExit``) and :class:`~selfsup.run.PreemptionCheckpoint` saves ``last.ckpt``.
    """

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
