"""Exact resume: a run interrupted at a random step and resumed ends bit-identical to an uninterrupted run.

Covers the optimizer and schedule, the RNG states, the data order and augmentation mid-epoch, and
both ways a run stops: SIGTERM (the preemption checkpoint is written after the step) and a crash
(resume from the last periodic checkpoint, written in ``on_train_batch_end``).
"""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch

from tests.helpers.interrupt import SigtermAt
from tests.helpers.methods import METHODS, same_weights, tiny_fit

MAX_STEPS = 8  # 16 images / batch 4 = 4 steps per epoch: the run crosses an epoch boundary


class CrashAt(L.Callback):
    """Raises after training step ``step``: a node failure that writes nothing."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated node failure")


def _random_step(name: str) -> int:
    step = random.Random(name).randrange(1, MAX_STEPS - 1)
    print(f"interrupting at step {step}")
    return step


@pytest.mark.parametrize("name", METHODS)
def test_sigterm_and_resume_is_bit_identical(name, tmp_path):
    reference, _ = tiny_fit(name, tmp_path / "reference", MAX_STEPS)
    step = _random_step(name)
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        tiny_fit(name, tmp_path / "run", MAX_STEPS, callbacks=[SigtermAt(step)])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == step
    resumed, trainer = tiny_fit(name, tmp_path / "run", MAX_STEPS, ckpt_path=str(last))
    assert trainer.global_step == MAX_STEPS
    assert torch.load(last, weights_only=True)["global_step"] == MAX_STEPS, "last.ckpt holds the newest weights"
    assert not list(last.parent.glob("last-v*")), "the resumed run wrote a versioned copy beside last.ckpt"
    assert same_weights(reference, resumed) == []
    assert not same_weights(reference, tiny_fit(name, tmp_path / "short", MAX_STEPS - 1)[0]) == [], \
        "sanity: one step fewer must differ, else the comparison proves nothing"


@pytest.mark.parametrize("name", METHODS[:1])
@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_crash_and_resume_from_periodic_checkpoint_is_bit_identical(name, num_workers, tmp_path):
    reference, _ = tiny_fit(name, tmp_path / "reference", MAX_STEPS, num_workers=num_workers)
    with pytest.raises(RuntimeError, match="simulated node failure"):
        tiny_fit(name, tmp_path / "run", MAX_STEPS, callbacks=[CrashAt(7)], every_n_train_steps=3,
                 num_workers=num_workers)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6  # mid-epoch: batch 2 of 4 in epoch 1
    resumed, _ = tiny_fit(name, tmp_path / "run", MAX_STEPS, ckpt_path=str(last), num_workers=num_workers)
    assert same_weights(reference, resumed) == []


def test_checkpoint_holds_every_piece_of_run_state(tmp_path):
    with pytest.raises(SystemExit):
        tiny_fit("simclr", tmp_path, MAX_STEPS, callbacks=[SigtermAt(6)])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    states = checkpoint["callbacks"]
    assert set(states["ExactResume"]["rng"][0]) >= {"torch", "numpy", "python"}
    assert states["NonFiniteGuard"] == {"skipped_steps": 0, "consecutive": 0, "requested_skips": 0, "scaler_skips": 0}
    assert states["DataHealth"] == {"skipped_images": 0}
    assert set(checkpoint["selfsup"]) == {"method", "encoder", "preprocessing", "encoder_prefix"}
    assert checkpoint["selfsup"]["encoder_prefix"] == "encoder."  # SimCLR's representation is its student
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["epoch"] == 1 and loader_state["samples_done"] == 2 * 4
