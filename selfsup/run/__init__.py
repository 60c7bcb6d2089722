"""Run management as Lightning callbacks and plugins: exact resume, the non-finite guard, unreadable-image
accounting, the loader wait (``data/wait_fraction``), preemption, ``init_from``, atomic checkpoints and
SyncBatchNorm on CPU.

They sit beside the method, not in it, so a method author cannot break them by overriding a hook
without ``super()``. ``selfsup fit`` installs all of them; from plain Python::

    trainer = L.Trainer(callbacks=selfsup.run.default_callbacks(), plugins=selfsup.run.default_plugins(None, False))
"""

from __future__ import annotations

from lightning.pytorch import Callback

from selfsup.run.data_health import DataHealth
from selfsup.run.data_wait import DataWait
from selfsup.run.guard import NonFiniteError, NonFiniteGuard
from selfsup.run.init_from import InitFrom
from selfsup.run.plugins import SyncBatchNormPlugin, default_plugins
from selfsup.run.preemption import PreemptionCheckpoint
from selfsup.run.resume import ExactResume, find_resume_checkpoint

__all__ = ["DataHealth", "DataWait", "ExactResume", "InitFrom", "NonFiniteError", "NonFiniteGuard",
           "PreemptionCheckpoint", "SyncBatchNormPlugin", "default_callbacks", "default_plugins",
           "find_resume_checkpoint"]


def default_callbacks(max_consecutive_nonfinite: int = 5, init_from: str | None = None) -> list[Callback]:
    """The run-management callbacks ``selfsup fit`` installs, for a Trainer built in Python."""
    return [ExactResume(), NonFiniteGuard(max_consecutive_nonfinite), DataHealth(), DataWait(),
            PreemptionCheckpoint(), InitFrom(init_from)]
