"""Run management lives in callbacks: a method that overrides Lightning hooks without calling ``super()``
keeps exact resume and the non-finite guard."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from selfsup.run import NonFiniteGuard
from tests.helpers.interrupt import SigtermAt
from tests.helpers.methods import run_callback, same_weights, tiny_fit

MAX_STEPS = 8


def _ignore(*args, **kwargs) -> None:
    return None


CARELESS_HOOKS = ("on_train_start", "on_train_batch_start", "on_train_batch_end", "on_train_epoch_start",
                  "on_train_epoch_end", "on_before_optimizer_step", "on_before_backward", "on_after_backward",
                  "on_save_checkpoint", "on_load_checkpoint", "on_fit_start")


class MakeCareless(L.Callback):
    """Turns the method into a subclass that overrides every training hook with one that does nothing
    (no ``super()``), as a hurried method author might. ``poison`` makes those steps' loss NaN."""

    def __init__(self, poison: frozenset[int] = frozenset()):
        self.poison = poison

    def setup(self, trainer, module, stage):
        module.__class__ = type(f"Careless{type(module).__name__}", (type(module),),
                                {hook: _ignore for hook in CARELESS_HOOKS})
        original, poison = module.training_loss, self.poison

        def training_loss(batch):
            terms = original(batch)
            return dict(terms, loss=terms["loss"] * float("nan")) if module.global_step in poison else terms

        module.training_loss = training_loss


def test_exact_resume_survives_hooks_overridden_without_super(tmp_path):
    reference, _ = tiny_fit("simclr", tmp_path / "reference", MAX_STEPS, callbacks=[MakeCareless()])
    with pytest.raises(SystemExit):
        tiny_fit("simclr", tmp_path / "run", MAX_STEPS, callbacks=[MakeCareless(), SigtermAt(3)])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed, trainer = tiny_fit("simclr", tmp_path / "run", MAX_STEPS, callbacks=[MakeCareless()],
                                ckpt_path=str(last))
    assert type(resumed).__name__ == "CarelessSimCLR" and trainer.global_step == MAX_STEPS
    assert same_weights(reference, resumed) == []


def test_the_guard_survives_hooks_overridden_without_super(tmp_path):
    states = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            states.append({k: v.clone() for k, v in module.state_dict().items()})

    method, trainer = tiny_fit("simclr", tmp_path, 4, callbacks=[MakeCareless(frozenset({2})), Record()])
    assert run_callback(trainer, NonFiniteGuard).skipped_steps == 1
    assert _changed(states[2], states[3]) == [], "the NaN step changed nothing"
    assert _changed(states[1], states[2]) != [], "sanity: a normal step trains"
    assert all(torch.isfinite(v).all() for v in method.state_dict().values() if v.is_floating_point())


def _changed(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]
