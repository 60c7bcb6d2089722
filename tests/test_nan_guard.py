"""The non-finite guard: a NaN/Inf loss or gradient never reaches the weights; the step is skipped and
counted; several in a row stop the run naming the step and the term; the last checkpoint survives."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from selfsup.run import NonFiniteError, NonFiniteGuard
from tests.helpers.dist import run_distributed
from tests.helpers.guard import guard_step
from tests.helpers.methods import METHODS, run_callback, tiny_fit

BAD_STEP = 2


class Snapshot(L.Callback):
    """Parameters, BatchNorm statistics and optimizer step count before and after every step."""

    def __init__(self):
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    @staticmethod
    def _state(trainer, module) -> dict:
        optimizer = trainer.optimizers[0]
        steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
        return {"weights": {k: v.clone() for k, v in module.state_dict().items()}, "optimizer_steps": steps}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = self._state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[len(self.after)] = self._state(trainer, module)


def _poison_loss(method, bad_calls: set[int]):
    """Make ``training_loss`` return NaN on the given call numbers (0-based)."""
    original, calls = method.training_loss, [0]

    def training_loss(batch):
        terms = original(batch)
        if calls[0] in bad_calls:
            terms = dict(terms, loss=terms["loss"] * float("nan"))
        calls[0] += 1
        return terms

    method.training_loss = training_loss


def _install(hook):
    """A callback that runs ``hook(module)`` once, at setup (after the model is built)."""

    class Install(L.Callback):
        def setup(self, trainer, module, stage):
            hook(module)

    return Install()


def _assert_untouched(snapshot: Snapshot, call: int) -> None:
    before, after = snapshot.before[call], snapshot.after[call]
    changed = [k for k in before["weights"] if not torch.equal(before["weights"][k], after["weights"][k])]
    assert changed == [], f"a skipped step changed {changed[:3]}"
    assert before["optimizer_steps"] == after["optimizer_steps"]


@pytest.mark.parametrize("name", METHODS)
def test_nan_loss_step_is_skipped_counted_and_training_continues(name, tmp_path):
    snapshot = Snapshot()
    method, trainer = tiny_fit(name, tmp_path, 5, callbacks=[
        _install(lambda m: _poison_loss(m, {BAD_STEP})), snapshot])
    _assert_untouched(snapshot, BAD_STEP)
    guard = run_callback(trainer, NonFiniteGuard)
    assert guard.skipped_steps == 1 and guard.consecutive == 0
    assert trainer.global_step == 5  # the schedule and step counter still advance
    moved = [k for k, v in snapshot.before[BAD_STEP + 1]["weights"].items()
             if v.is_floating_point() and not torch.equal(v, snapshot.after[BAD_STEP + 1]["weights"][k])]
    assert moved, "the step after a skipped one must train normally"
    assert all(torch.isfinite(p).all() for p in method.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_nan_gradient_is_skipped_and_names_the_parameter(name, tmp_path):
    first = {}

    def poison_gradient(module):
        first["name"], parameter = next((n, p) for n, p in module.named_parameters() if n.startswith("encoder."))
        calls = [0]

        def hook(grad):
            calls[0] += 1
            return grad * float("nan") if calls[0] >= BAD_STEP + 1 else grad

        parameter.register_hook(hook)

    snapshot = Snapshot()
    with pytest.raises(NonFiniteError, match=r"3 consecutive.*gradient of parameter encoder\..*step 4") as error:
        tiny_fit(name, tmp_path, 8, callbacks=[_install(poison_gradient), snapshot], every_n_train_steps=1,
                 max_consecutive_nonfinite=3)
    assert f"parameter {first['name']} at step 4" in str(error.value)
    _assert_untouched(snapshot, BAD_STEP)
    _assert_untouched(snapshot, BAD_STEP + 1)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == BAD_STEP + 2, "the checkpoint of the last completed step is kept"
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_consecutive_nan_losses_stop_with_step_and_term(tmp_path):
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps.*loss=nan at step 3"):
        tiny_fit("simclr", tmp_path, 8, callbacks=[_install(lambda m: _poison_loss(m, set(range(2, 99))))],
                 max_consecutive_nonfinite=2)


def _guard_on_rank(rank: int, world_size: int) -> list:
    guard = NonFiniteGuard(max_consecutive=5)
    skipped = [guard_step(guard, float("nan") if rank == 1 else 1.0, step=7),  # only rank 1 sees the NaN
               guard_step(guard, 2.0, step=8)]
    return [*skipped, guard.skipped_steps]


def test_all_ranks_agree_to_skip():
    results = run_distributed(_guard_on_rank, 2)
    assert results == [[True, False, 1], [True, False, 1]], "both ranks drop the gradients of step 7 only"


def test_grad_scaler_skips_are_marked_counted_apart_and_never_stop_the_run():
    """Under 16-mixed the scaler skips inf-gradient steps itself (many in a row while its scale calibrates):
    the guard marks each skipped (so no EMA teacher update follows) without counting it towards the limit."""
    from tests.helpers.guard import GuardedModule

    guard = NonFiniteGuard(max_consecutive=2)
    for step in range(4):
        module = GuardedModule(1.0, gradient=float("inf"))
        assert not guard_step(guard, 1.0, step=step, module=module, scaled=True), "the scaler's gradients stay"
        assert module.step_skipped is True
    assert (guard.scaler_skips, guard.skipped_steps, guard.consecutive) == (4, 0, 0)
    module = GuardedModule(1.0)
    guard_step(guard, 1.0, step=4, module=module, scaled=True)
    assert module.step_skipped is False
    assert guard_step(guard, float("nan"), step=5, scaled=True), "a NaN loss is still the guard's to skip"
    assert guard.skipped_steps == 1 and guard.state_dict()["scaler_skips"] == 4


def test_guard_rejects_a_bad_limit():
    with pytest.raises(ValueError, match="max_consecutive=0"):
        NonFiniteGuard(0)
