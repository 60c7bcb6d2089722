"""DataWait: ``data/wait_fraction`` matches a loader that sleeps a known time per batch, leaves validation
out, and reads no tensor on the host, calls no collective and hands Lightning only CPU tensors."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from selfsup.run import DataWait, default_callbacks

BATCHES = 10


class SlowImages(Dataset):
    """``BATCHES`` one-number samples, each taking ``seconds`` to load (batch size 1, no workers)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __len__(self) -> int:
        return BATCHES

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.ones(1)


class SlowStep(L.LightningModule):
    """A training step that takes ``seconds``; a validation step that takes ``validation_seconds``."""

    def __init__(self, seconds: float, validation_seconds: float = 0.0):
        super().__init__()
        self.seconds, self.validation_seconds = seconds, validation_seconds
        self.layer = nn.Linear(1, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.layer(batch).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        time.sleep(self.validation_seconds)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(root: Path, load_s: float, step_s: float, callback: DataWait, validation_s: float | None = None) -> list:
    """One epoch of ``BATCHES`` batches, logging every 5 steps to a CSV; the rows of its metrics.csv."""
    validation = {} if validation_s is None else dict(val_check_interval=5, limit_val_batches=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, log_every_n_steps=5, logger=CSVLogger(root, name="run"),
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        **({"limit_val_batches": 0} if validation_s is None else validation))
    loaders = {"train_dataloaders": DataLoader(SlowImages(load_s), batch_size=1)}
    if validation_s is not None:
        loaders["val_dataloaders"] = DataLoader(SlowImages(0.0), batch_size=1)
    trainer.fit(SlowStep(step_s, validation_s or 0.0), **loaders)
    with open(root / "run" / "version_0" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("load_s,step_s", [(0.06, 0.02), (0.02, 0.06)])
def test_the_wait_fraction_is_the_loaders_share_of_the_time(tmp_path, load_s, step_s):
    callback = DataWait()
    rows = fit(tmp_path, load_s, step_s, callback)
    expected = load_s / (load_s + step_s)  # Lightning's own work adds a little to the step
    windows = [float(r["data/wait_fraction"]) for r in rows if r.get("data/wait_fraction")]
    epochs = [float(r["data/wait_fraction_epoch"]) for r in rows if r.get("data/wait_fraction_epoch")]
    assert len(windows) == BATCHES // 5 and len(epochs) == 1, rows
    assert windows == pytest.approx([expected] * len(windows), abs=0.12)
    assert epochs[0] == pytest.approx(expected, abs=0.12)
    assert callback.fit_wait == pytest.approx(BATCHES * load_s, rel=0.5)


def test_a_validation_between_two_batches_is_not_counted_as_waiting(tmp_path):
    callback = DataWait()
    fit(tmp_path, 0.0, 0.02, callback, validation_s=0.25)  # validation after batch 5: 0.25 s against 0.2 s of steps
    assert callback.fit_wait / callback.fit_time < 0.3, (callback.fit_wait, callback.fit_time)
    assert callback.fit_time < BATCHES * 0.02 + 0.2, "the validation is not in the batches' time either"


READS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")


class CountedDataWait(DataWait):
    """DataWait whose every hook runs with the host reads of tensors, CUDA syncs and collectives counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        super().__init__()
        self.monkeypatch, self.calls = monkeypatch, []

    def _counted(self, hook, *args):
        undo = []
        for owner, name in [(torch.Tensor, n) for n in READS] + [(torch.cuda, "synchronize")] + [
                (torch.distributed, n) for n in ("all_reduce", "all_gather", "broadcast", "barrier",
                                                  "broadcast_object_list", "all_gather_object")]:
            original = getattr(owner, name)
            undo.append((owner, name, original))

            def counting(*a, _name=name, _original=original, **k):
                self.calls.append(f"{_name} from {sys._getframe(1).f_code.co_filename}")
                return _original(*a, **k)

            setattr(owner, name, counting)
        try:
            return hook(*args)
        finally:
            for owner, name, original in undo:
                setattr(owner, name, original)

    def on_train_batch_start(self, *args):
        return self._counted(super().on_train_batch_start, *args)

    def on_train_batch_end(self, *args):
        return self._counted(super().on_train_batch_end, *args)

    def on_train_epoch_end(self, *args):
        return self._counted(super().on_train_epoch_end, *args)

    def on_train_end(self, *args):
        return self._counted(super().on_train_end, *args)


def test_no_host_read_no_sync_no_collective_and_only_cpu_tensors_logged(tmp_path, monkeypatch):
    callback = CountedDataWait(monkeypatch)
    fit(tmp_path, 0.0, 0.0, callback)
    assert callback.calls == [], callback.calls
    # Lightning turns a logged Python float into a tensor on the module's device (on a GPU a copy that waits
    # for the queued work); DataWait hands over CPU tensors, whatever the module's device
    logged = {}
    module = SimpleNamespace(device=torch.device("meta"), log=lambda name, value, **kw: logged.update({name: value}))
    wait = DataWait(window=2)
    wait.on_train_start(SimpleNamespace(log_every_n_steps=50), module)
    wait.on_train_epoch_start(None, module)
    for i in range(3):
        wait.on_train_batch_start(None, module, None, i)
        wait.on_train_batch_end(None, module, None, None, i)
    wait.on_train_epoch_end(None, module)
    assert set(logged) == {"data/wait_fraction", "data/wait_fraction_epoch"} and len(wait._recent) == 2
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in logged.values())


def test_selfsup_fit_installs_it():
    assert sum(isinstance(c, DataWait) for c in default_callbacks()) == 1
    with pytest.raises(ValueError, match=r"data_wait.window=0 must be a positive"):
        DataWait(window=0)
