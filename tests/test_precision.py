"""Mixed precision: every method trains under bf16-mixed on CPU without non-finite values, and its
loss is computed in float32 inside autocast; 32 and 16-mixed work through the same Trainer flag."""

from __future__ import annotations

import pytest
import torch

from selfsup.run import NonFiniteGuard
from tests.helpers.methods import METHODS, build, run_callback, synthetic_batch, tiny_fit


@pytest.mark.parametrize("name", METHODS)
def test_loss_is_float32_under_bf16_autocast(name):
    method, views = build(name)
    batch = synthetic_batch(views, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.training_loss(batch)
    assert terms["loss"].dtype == torch.float32
    assert torch.isfinite(terms["loss"])


class _Losses:
    """Records every step's loss as returned by ``training_step``."""

    def __init__(self):
        self.values: list[float] = []

    def install(self, method) -> None:
        original = method.training_step

        def training_step(batch, batch_idx):
            out = original(batch, batch_idx)
            self.values.append(float("nan") if out is None else out["loss"].item())
            return out

        method.training_step = training_step


@pytest.mark.parametrize(("name", "precision"), [(m, "bf16-mixed") for m in METHODS] +
                         [("simclr", "16-mixed"), ("simclr", "32")])
def test_trains_without_non_finite_values(name, precision, tmp_path):
    import lightning as L

    losses, initial = _Losses(), {}

    class Install(L.Callback):
        def setup(self, trainer, module, stage):
            losses.install(module)
            initial.update({k: v.clone() for k, v in module.state_dict().items()})

    method, trainer = tiny_fit(name, tmp_path, 6, callbacks=[Install()], precision=precision)
    if precision == "16-mixed":  # Lightning has no fp16 AMP on CPU and falls back to bf16 (GPU only)
        assert trainer.precision == "bf16-mixed"
    assert len(losses.values) == 6 and all(torch.isfinite(torch.tensor(losses.values))), losses.values
    assert run_callback(trainer, NonFiniteGuard).skipped_steps == 0
    assert all(torch.isfinite(v).all() for v in method.state_dict().values() if v.is_floating_point())
    assert all(p.dtype == torch.float32 for p in method.parameters()), "mixed precision keeps float32 weights"
    moved = [k for k, v in method.state_dict().items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert moved, "the weights were updated"
