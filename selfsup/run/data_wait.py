"""How much of the training loop's time goes to waiting for data: ``data/wait_fraction``, on host clocks."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

SLOW_LOADER = 0.2  # a fit-long fraction above this gets a hint at the end of fit


class DataWait(L.Callback):
    """Logs ``data/wait_fraction``: the share of wall time the training loop spends between the end of one
    batch (``on_train_batch_end``) and the start of the next (``on_train_batch_start``), that is waiting
    for the loader, over the last ``window`` batches (default ``trainer.log_every_n_steps``, so each value
    written covers the batches since the previous one); and ``data/wait_fraction_epoch`` over each epoch.

    A batch's time runs from the previous batch's end to its own end: its wait plus its step. Only host
    clocks are read (``time.perf_counter``): no device synchronisation and no collective, so each rank
    measures its own loop and rank 0's values are logged. Validation runs inside an epoch are left out of
    the wait; what else happens between two batches is in it: moving the batch to the device, Lightning's
    per-step logging, a checkpoint saved mid-epoch. On a GPU the host can run ahead of queued work, so a
    wait also stalls the device only once that queue drains (selfsup's one host sync per step, the
    non-finite guard's, keeps the host close). Near 0 the loader keeps up; a high value means more
    ``data.num_workers``, cheaper CPU augmentation or faster storage would speed training up.
    """

    def __init__(self, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise ValueError(f"data_wait.window={window} must be a positive number of batches "
                             "(or null for trainer.log_every_n_steps)")
        self.window = window
        self._recent: deque[tuple[float, float]] = deque()  # (wait, batch time) of the last batches
        self.epoch_wait = self.epoch_time = 0.0
        self.fit_wait = self.fit_time = 0.0
        self._last_end: float | None = None
        self._batch_start = self._wait = self._paused = 0.0
        self._validation_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._recent = deque(maxlen=self.window or max(1, trainer.log_every_n_steps))
        self.fit_wait = self.fit_time = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_wait = self.epoch_time = self._paused = 0.0
        self._last_end = time.perf_counter()  # the first batch's wait includes starting the loader's workers

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        last = now if self._last_end is None else self._last_end
        self._wait, self._paused, self._batch_start = max(0.0, now - last - self._paused), 0.0, now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        spent = self._wait + (now - self._batch_start)
        self._last_end = now
        self._recent.append((self._wait, spent))
        self.epoch_wait, self.epoch_time = self.epoch_wait + self._wait, self.epoch_time + spent
        self.fit_wait, self.fit_time = self.fit_wait + self._wait, self.fit_time + spent
        wait, total = sum(w for w, _ in self._recent), sum(t for _, t in self._recent)
        if total > 0:
            _log(pl_module, "data/wait_fraction", wait / total, on_step=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is not None:  # a validation between two training batches is not a wait
            self._paused += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epoch_time > 0:
            _log(pl_module, "data/wait_fraction_epoch", self.epoch_wait / self.epoch_time, on_step=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fit_time <= 0:
            return
        fraction = self.fit_wait / self.fit_time
        hint = (": the loader is the bottleneck; raise data.num_workers or make the CPU views cheaper"
                if fraction > SLOW_LOADER else "")
        rank_zero_info(f"[selfsup] the training loop waited for data {100 * fraction:.0f}% of its "
                       f"{self.fit_time:.1f} s (rank 0, data/wait_fraction){hint}")


def _log(pl_module: L.LightningModule, name: str, value: float, on_step: bool) -> None:
    """Log a host value as a CPU tensor: a Python float would become a tensor on the module's device, a
    host-to-device copy that waits for the device's queued work."""
    pl_module.log(name, torch.tensor(value, dtype=torch.float32), on_step=on_step, on_epoch=not on_step,
                  batch_size=1)
