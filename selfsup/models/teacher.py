"""EMA teacher: a frozen copy of some student modules, moved towards them after every real optimizer step.

``teacher = m * teacher + (1 - m) * student`` for the parameters, with the momentum ``m`` from a
:class:`~selfsup.optim.Schedule` (BYOL, MoCo v3 and DINO: cosine from 0.996 to 1 over training); buffers
(BatchNorm running statistics) are copied from the student. BYOL's target network, MoCo v3's momentum
encoder and DINO's teacher are all this; :class:`Center` is DINO's (and iBOT's) centre of the teacher output.

Where it stands in a run:

- **Not trained.** Its parameters have ``requires_grad=False``, so the optimizer's parameter groups
  (:func:`selfsup.optim.param_groups`) skip them and DDP registers none of them for gradient reduction.
- **Updated only after a real optimizer step**, by :meth:`SSLMethod.optimizer_step`: Lightning calls that hook
  once per optimizer step (never on a gradient-accumulation micro-step), and the update is left out when
  :class:`~selfsup.run.guard.NonFiniteGuard` skipped the step (it sets ``step_skipped`` on the module). The
  same update on identical weights keeps it identical on every rank, with no collective.
- **Saved and resumed** with the method: it is a submodule, so it is in the state dict; the momentum is a
  pure function of the step, so a resumed run continues it bit-exactly.
- **Train/eval mode**: it follows the method's mode like any submodule, but only its normalisation layers
  act on it (in training a BatchNorm uses the batch's statistics, as BYOL's target and MoCo v3's momentum
  encoder do); every other layer runs in eval mode in :meth:`EMATeacher.forward` (dropout and drop-path
  off), so the teacher's output is deterministic.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from selfsup.distributed import all_reduce_sum
from selfsup.optim import Cosine, Schedule, as_schedule

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class EMATeacher(nn.Module):
    """An exponential moving average of ``modules``, applied in sequence (``[encoder, projector]``).

    Args:
        modules: the student modules to follow; the teacher deep-copies them now (keys
            ``copies.<i>.<the module's own keys>``) and keeps a reference to the originals.
        momentum: the momentum per optimizer step (default BYOL's cosine 0.996 -> 1).
    """

    def __init__(self, modules: list[nn.Module] | nn.Module, momentum: Schedule | dict | float = Cosine(0.996, 1.0)):
        super().__init__()
        students = list(modules) if isinstance(modules, (list, tuple)) else [modules]
        if not students:
            raise ValueError("EMATeacher needs at least one module to follow")
        self.copies = nn.ModuleList()
        self._students: tuple[nn.Module, ...] = ()  # a tuple: not registered, so not in the state dict twice
        self.momentum = as_schedule(momentum, "teacher_momentum")
        for student in students:
            self.follow(student)

    def follow(self, student: nn.Module) -> None:
        """Add a frozen copy of one more student module, after the others (iBOT's patch prototypes)."""
        teacher = copy.deepcopy(student).requires_grad_(False)
        if [n for n, _ in student.named_parameters()] != [n for n, _ in teacher.named_parameters()]:
            raise RuntimeError(f"the copy of {type(student).__name__} does not mirror its parameters")
        self.copies.append(teacher)
        self._students += (student,)

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        """Every layer but the normalisations in eval mode for the block (dropout, drop-path off), then back."""
        layers = [m for m in self.copies.modules() if m.training and not isinstance(m, NORM_LAYERS)]
        for m in layers:
            m.training = False
        try:
            yield
        finally:
            for m in layers:
                m.training = True

    def index_of(self, student: nn.Module) -> int | None:
        """Which copy follows ``student`` (``None`` when none does)."""
        return next((i for i, s in enumerate(self._students) if s is student), None)

    @torch.no_grad()
    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        """The copies in sequence on ``x``; a list of views runs once per distinct shape, as
        :meth:`SSLMethod.encode_views` runs the student."""
        if isinstance(x, Tensor):
            with self.deterministic():
                for module in self.copies:
                    x = module(x)
            return x
        out: list[Tensor | None] = [None] * len(x)
        for shape in dict.fromkeys(v.shape for v in x):
            idx = [i for i, v in enumerate(x) if v.shape == shape]
            for i, y in zip(idx, self(torch.cat([x[i] for i in idx])).chunk(len(idx))):
                out[i] = y
        return out  # type: ignore[return-value]

    def _pairs(self, kind: str) -> tuple[list[Tensor], list[Tensor]]:
        teacher = [t for m in self.copies for t in getattr(m, kind)()]
        student = [s for m in self._students for s in getattr(m, kind)()]
        return teacher, student

    @torch.no_grad()
    def update(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """``teacher = m * teacher + (1 - m) * student`` with ``m`` the momentum at ``step``; buffers copied.
        Returns ``m``."""
        m = self.momentum.value(step, total_steps, steps_per_epoch)
        teacher, student = self._pairs("parameters")
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, [s.detach() for s in student], alpha=1.0 - m)
        teacher_buffers, student_buffers = self._pairs("buffers")
        if teacher_buffers:
            torch._foreach_copy_(teacher_buffers, student_buffers)
        return m

    @torch.no_grad()
    def reset(self) -> None:
        """Make the teacher equal to the student again (after ``init_from`` loaded new student weights)."""
        for kind in ("parameters", "buffers"):
            teacher, student = self._pairs(kind)
            if teacher:
                torch._foreach_copy_(teacher, student)


def teachers(module: nn.Module) -> Iterable[tuple[str, EMATeacher]]:
    """``(name, teacher)`` for every :class:`EMATeacher` directly under ``module``."""
    return ((name, child) for name, child in module.named_children() if isinstance(child, EMATeacher))


def update_teachers(module: nn.Module, step: int, total_steps: int, steps_per_epoch: int) -> float | None:
    """Update every teacher of ``module`` for ``step``; the (last) momentum, or ``None`` without teachers."""
    momentum = None
    for _, teacher in teachers(module):
        momentum = teacher.update(step, total_steps, steps_per_epoch)
    return momentum


def representation_prefix(method: nn.Module) -> str:
    """The state-dict prefix of the encoder that is the representation: ``"encoder."`` for
    ``representation = "student"``, else the teacher copy of the encoder (``"teacher.copies.0."``)."""
    which = getattr(method, "representation", "student")
    if which == "student":
        return "encoder."
    if which != "teacher":
        raise ValueError(f"{type(method).__name__}.representation={which!r} must be 'student' or 'teacher'")
    for name, teacher in teachers(method):
        index = teacher.index_of(method.encoder)
        if index is not None:
            return f"{name}.copies.{index}."
    raise ValueError(f"{type(method).__name__}.representation='teacher' but no EMATeacher follows its encoder")


def representation_encoder(method: nn.Module) -> nn.Module:
    """The encoder module that is the representation: ``method.encoder``, or the teacher's copy of it."""
    prefix = representation_prefix(method)
    return method.encoder if prefix == "encoder." else method.get_submodule(prefix.rstrip("."))


class Center(nn.Module):
    """DINO's centre: an exponential moving average of the teacher's mean output over the global batch.

    ``center = m * center + (1 - m) * mean(teacher outputs of the step, all ranks)``. The outputs of a step
    are summed locally by :meth:`accumulate` (every gradient-accumulation micro-step adds to the sum) and
    folded in by :meth:`update` after a real optimizer step, with one all-reduce of the sum and the count;
    a step the non-finite guard skipped calls :meth:`discard` instead, so a NaN never reaches the centre.
    The centre is a buffer: saved in checkpoints, identical on every rank, continued bit-exactly on resume.

    Args:
        dim: width of the teacher output (the number of prototypes).
        momentum: the EMA momentum per optimizer step (0.9 in DINO).
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"center_momentum={momentum} must be in [0, 1)")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))
        self.register_buffer("pending", torch.zeros(dim + 1), persistent=False)  # sum of outputs, then count

    @torch.no_grad()
    def accumulate(self, outputs: Tensor) -> None:
        """Add this rank's ``(N, dim)`` teacher outputs of the step."""
        self.pending[:-1] += outputs.detach().float().sum(0)
        self.pending[-1] += outputs.shape[0]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the step's global mean in (every rank, after the optimizer step); a no-op with nothing pending."""
        total = all_reduce_sum(self.pending.clone())
        count = total[-1].clamp_min(1)  # 0 outputs: nothing to fold, and the weights below keep the centre
        weight = torch.where(total[-1] > 0, 1 - self.momentum, 0.0)
        self.center.mul_(1 - weight).add_(weight * total[:-1] / count)
        self.discard()

    def discard(self) -> None:
        """Drop the step's outputs (a skipped step)."""
        self.pending.zero_()
