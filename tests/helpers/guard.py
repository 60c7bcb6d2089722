"""Drive :class:`selfsup.run.NonFiniteGuard` one optimizer step at a time, without a Trainer."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class GuardedModule(torch.nn.Module):
    """What the guard reads of a LightningModule: parameters with gradients and the step's loss terms."""

    def __init__(self, loss: float, gradient: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.weight.grad = torch.full((2,), gradient)
        self.step_terms, self.step_term_names = torch.tensor([loss]), ["loss"]
        self.device, self.logged = torch.device("cpu"), {}

    def log(self, name, value, **_):
        self.logged[name] = value


def guard_step(guard, loss: float, invalid: int = 0, step: int = 0, gradient: float = 1.0,
               module: GuardedModule | None = None, scaled: bool = False) -> bool:
    """One optimizer step through ``guard``; whether it skipped the step (dropped the gradients).
    ``scaled``: under a grad scaler (``16-mixed``), which skips non-finite gradients itself."""
    plugin = SimpleNamespace(scaler=object()) if scaled else SimpleNamespace()
    trainer = SimpleNamespace(global_step=step, precision_plugin=plugin)
    module = module or GuardedModule(loss, gradient)
    guard.on_train_start(trainer, module)
    guard.on_train_batch_start(trainer, module, SimpleNamespace(invalid=invalid), 0)
    guard.on_before_optimizer_step(trainer, module, None)
    return module.weight.grad is None
