"""The non-finite guard: a step whose loss or gradient is NaN/Inf leaves no trace, on every rank.

A callback, so a method that overrides a Lightning hook without calling ``super()`` keeps it. It costs
one all-reduce and one host synchronisation per optimizer step: the loss terms the method returned
(:attr:`SSLMethod.step_terms`), the gradient norms and the batch's own request to skip (placeholders for
unreadable images) are checked in one fused tensor, agreed over the ranks, read once.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from selfsup.distributed import all_reduce_max

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps whose loss or gradient is not finite; stops the run after too many in a row.

    A skipped step leaves the weights, the optimizer's moments and the BatchNorm running statistics as
    they were (its gradients are dropped before the optimizer sees them, and the statistics are put back
    from a copy kept in place). After ``max_consecutive`` skipped steps in a row :class:`NonFiniteError`
    names the step and what was not finite. A batch that asks to skip (``Batch.invalid``: placeholders)
    is skipped on every rank too, counted apart, and neither counts towards nor resets that limit. Under
    ``16-mixed`` the grad scaler skips a step with non-finite gradients itself and lowers its scale (routine
    while the scale calibrates): the guard counts that apart too (``scaler_skips``), without stopping the
    run, but still marks the step skipped (no EMA teacher update) and puts the BatchNorm statistics back.

    Args:
        max_consecutive: skipped steps in a row that stop the run.
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"nonfinite.max_consecutive={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.skipped_steps = self.consecutive = self.requested_skips = self.scaler_skips = 0
        self._norm_buffers: list[Tensor] = []
        self._norm_copies: list[Tensor] = []
        self._fresh_copy = False
        self._pending: list[Tensor] = []  # loss terms of accumulation micro-steps not yet judged
        self._skip_requested = 0

    # -- the BatchNorm statistics of the step, kept in place ----------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._norm_buffers = [b for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                              for b in m.buffers(recurse=False)]
        self._norm_copies = [torch.empty_like(b) for b in self._norm_buffers]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._fresh_copy and self._norm_buffers:  # once per optimizer step (the first micro-step)
            torch._foreach_copy_(self._norm_copies, self._norm_buffers)
            self._fresh_copy = True
        self._skip_requested += int(getattr(batch, "invalid", 0) > 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        terms = getattr(pl_module, "step_terms", None)
        if self._fresh_copy and terms is not None:  # an accumulation micro-step: judged with the next step
            self._pending.append(terms)

    # -- the decision ------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        terms = self._pending + [t for t in [getattr(pl_module, "step_terms", None)] if t is not None]
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]  # unscaled, or inf where scaled
        flags = torch.stack([_nonfinite(terms, pl_module.device), _nonfinite_norms(grads, pl_module.device),
                             torch.tensor(float(self._skip_requested > 0), device=pl_module.device)])
        loss_bad, grad_bad, requested = all_reduce_max(flags).tolist()  # the one host synchronisation
        self._pending, self._skip_requested, self._fresh_copy = [], 0, False
        pl_module.step_skipped = bool(loss_bad or grad_bad or requested)  # no EMA teacher update after it
        if not (loss_bad or grad_bad or requested):
            self.consecutive = 0
            return
        step, what = trainer.global_step, ""
        if scaled and grad_bad and not (loss_bad or requested):  # the grad scaler skips this step itself
            self.scaler_skips += 1
            if self._norm_buffers:
                torch._foreach_copy_(self._norm_buffers, self._norm_copies)
            pl_module.log("train/scaler_skips", float(self.scaler_skips))
            return
        if not requested:  # named before the gradients go
            what = (f"loss term(s) {_nonfinite_terms(pl_module) or '(on another rank)'}" if loss_bad else
                    f"gradient of parameter {_first_nonfinite_gradient(pl_module) or '(on another rank)'}")
        for p in pl_module.parameters():
            p.grad = None  # the optimizer then leaves every weight and moment as it was
        if self._norm_buffers:
            torch._foreach_copy_(self._norm_buffers, self._norm_copies)
        if requested:
            self.requested_skips += 1
            log.warning("skipping step %d: a batch holds placeholders for unreadable images (no readable "
                        "replacement found); %d such steps so far", step, self.requested_skips)
            pl_module.log("train/requested_skips", float(self.requested_skips))
            return
        self._skip(f"non-finite {what} at step {step}")
        pl_module.log("train/skipped_steps", float(self.skipped_steps))

    def _skip(self, reason: str) -> None:
        self.skipped_steps += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps were skipped, the last for a {reason}. Training stopped; "
                "the weights hold no non-finite update and the last saved checkpoint is intact. Lower "
                "model.base_lr, use precision bf16-mixed or 32, set trainer.gradient_clip_val, or raise "
                "nonfinite.max_consecutive.")
        log.warning("skipping step: %s (%d skipped so far)", reason, self.skipped_steps)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and (self.skipped_steps or self.requested_skips):
            log.warning("[selfsup] skipped %d steps with a non-finite loss or gradient and %d steps of "
                        "placeholder batches", self.skipped_steps, self.requested_skips)

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive,
                "requested_skips": self.requested_skips, "scaler_skips": self.scaler_skips}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        self.consecutive = state.get("consecutive", 0)
        self.requested_skips = state.get("requested_skips", 0)
        self.scaler_skips = state.get("scaler_skips", 0)


def _nonfinite(terms: list[Tensor], device: torch.device) -> Tensor:
    """1.0 if any loss term is NaN or infinite, as a tensor (no host synchronisation)."""
    if not terms:
        return torch.zeros((), device=device)
    return (~torch.isfinite(torch.cat([t.reshape(-1) for t in terms]))).any().float().to(device)


def _nonfinite_norms(grads: list[Tensor], device: torch.device) -> Tensor:
    """1.0 if any gradient holds a NaN or an infinity: the sum of the per-tensor norms is then not finite."""
    if not grads:
        return torch.zeros((), device=device)
    return (~torch.stack(torch._foreach_norm(grads)).sum().isfinite()).float().to(device)


def _nonfinite_terms(pl_module: nn.Module) -> str:
    """``name=value`` of this step's non-finite loss terms (only when a step is skipped)."""
    terms, names = getattr(pl_module, "step_terms", None), getattr(pl_module, "step_term_names", [])
    if terms is None:
        return ""
    return ", ".join(f"{n}={v:g}" for n, v in zip(names, terms.tolist()) if not math.isfinite(v))


def _first_nonfinite_gradient(module: nn.Module) -> str | None:
    """Name of the first parameter whose gradient holds a NaN or an infinity (only when a step is skipped)."""
    for name, p in module.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None
