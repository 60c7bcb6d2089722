"""Host synchronisations per training step: one, the non-finite guard's, for every method.

On a GPU every read of a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``,
``float(t)``, ``.cpu()``, ``.numpy()``) waits for the device. On CPU nothing waits, so the test counts
those calls instead, made from selfsup's own code (Lightning's logging and progress bar are not ours),
during one whole training step: forward, backward and the optimizer step with the run callbacks that
``selfsup fit`` installs.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.methods import METHODS, tiny_fit

PACKAGE = str(Path(__file__).resolve().parents[1] / "selfsup")
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")
COUNTED_STEP = 2


class CountHostReads(L.Callback):
    """Counts host reads of tensors from selfsup's code between the start and the end of one step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.monkeypatch, self.reads = monkeypatch, Counter()
        self.originals = {name: getattr(torch.Tensor, name) for name in READS}

    def _counting(self, name: str):
        original, reads = self.originals[name], self.reads

        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                reads[f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {name}"] += 1
            return original(tensor, *args, **kwargs)

        return read

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == COUNTED_STEP:
            for name in READS:
                self.monkeypatch.setattr(torch.Tensor, name, self._counting(name))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name in READS:
            self.monkeypatch.setattr(torch.Tensor, name, self.originals[name])


@pytest.mark.parametrize("name", METHODS)
def test_one_host_synchronisation_per_step(name, tmp_path, monkeypatch):
    counter = CountHostReads(monkeypatch)
    tiny_fit(name, tmp_path, COUNTED_STEP + 2, callbacks=[counter])
    assert sum(counter.reads.values()) == 1, dict(counter.reads)
    (where,) = counter.reads
    assert where.startswith("guard.py"), where


def test_the_count_sees_a_read(tmp_path, monkeypatch):
    """Sanity: SwAV's collapse check reads the loss on the host every COLLAPSE_WARNING_INTERVAL steps;
    at an interval of 1 the count sees that read too."""
    from selfsup.methods.swav import SwAV

    monkeypatch.setattr(SwAV, "COLLAPSE_WARNING_INTERVAL", 1)
    counter = CountHostReads(monkeypatch)
    tiny_fit("swav", tmp_path, COUNTED_STEP + 2, callbacks=[counter])
    assert sum(counter.reads.values()) >= 2 and any(k.startswith("swav.py") for k in counter.reads), counter.reads
