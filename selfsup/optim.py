"""Optimizers, weight-decay groups and schedules: shared by every method, importing nothing above it.

- :func:`no_weight_decay_names` decides, from names and shapes, which parameters get no weight decay:
  biases and normalisation weights (1-D), and every name a module lists in its ``no_weight_decay()``
  (timm's ``pos_embed``, ``cls_token``, register tokens, Swin's relative position tables; a method's mask
  token). Decide it before DDP or FSDP wrap the model: FSDP's flat 1-D shards would all look like biases.
- :func:`create_optimizer` builds timm's AdamW, SGD, LARS or LAMB over those groups.
- Schedules (:class:`Cosine`, :class:`Linear`, :class:`Constant`) give any scalar per step, with an
  optional linear warmup: the learning rate, and the teacher momentum, teacher temperature or weight decay
  of the self-distillation methods. Each is a class with ``__init__`` arguments, so a recipe names it as
  ``class_path``/``init_args``.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import timm.models
import timm.optim
import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd", "lars", "lamb")
FUSED_OPTIMIZERS = ("adamw", "sgd")  # torch.optim's, which have fused CPU and CUDA kernels
WRAPPER_PREFIXES = ("_forward_module.", "_fsdp_wrapped_module.", "_orig_mod.", "module.",
                    "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name without the prefixes that DDP, FSDP, ``torch.compile`` and checkpoint wrappers add."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model`` that get no weight decay: 1-D ones (biases, norm weights) and
    every name a submodule lists in ``no_weight_decay()`` (relative to that submodule). Call it on the
    unwrapped model, before any flattening."""
    names = {clean_name(n) for n, p in model.named_parameters() if p.ndim <= 1}
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            base = f"{prefix}." if prefix else ""
            names |= {clean_name(base + name) for name in listed()}
    parameters = {clean_name(n) for n, _ in model.named_parameters()}
    return names & parameters


def param_groups(model: nn.Module, weight_decay: float, no_decay: set[str] | None = None,
                 lr_scales: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Parameter groups with and without weight decay, by name, split further by learning-rate scale.
    ``no_decay`` is what :func:`no_weight_decay_names` gave before wrapping (computed now when not given);
    ``lr_scales`` maps (clean) names to a factor on the learning rate (layer-wise decay; 1 when absent),
    kept as each group's ``lr_scale``."""
    no_decay = no_weight_decay_names(model) if no_decay is None else no_decay
    lr_scales = lr_scales or {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = clean_name(name)
            groups.setdefault((name not in no_decay, lr_scales.get(name, 1.0)), []).append(p)
    # ``decayed`` marks the groups a weight-decay schedule acts on (:func:`set_weight_decay`)
    order = sorted(groups, key=lambda key: (not key[0], -key[1]))  # decayed first, then by falling scale
    return [{"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0, "decayed": key[0],
             "lr_scale": key[1]} for key in order]


def layer_decay_scales(model: nn.Module, decay: float, prefix: str = "",
                       extra: dict[str, float] | None = None) -> dict[str, float]:
    """Layer-wise learning-rate decay for a timm model (BEiT, DINOv2): ``decay ** (L + 1 - layer)`` per
    parameter, where timm's ``group_matcher`` numbers the layers (0 for the embeddings and tokens, ``i + 1``
    for block ``i``, the final norm with the last of the ``L`` blocks). So the embeddings learn at
    ``decay ** (L + 1)`` and the last block at ``decay``, as DINOv2's ``get_vit_lr_decay_rate``; parameters
    outside ``model`` (heads) keep the full rate. ``extra`` multiplies names starting with a key (DINOv2's
    ``patch_embed_lr_mult: 0.2`` is ``{"patch_embed": 0.2}``). Names get ``prefix`` (the model's path in
    the module that is optimised, such as ``"encoder.model."``)."""
    if not 0 < decay <= 1:
        raise ValueError(f"layer_decay={decay} must be in (0, 1]")
    if not callable(getattr(model, "group_matcher", None)):
        raise ValueError(f"layer decay needs a timm model with group_matcher(), not {type(model).__name__}")
    layers = timm.models.group_parameters(model, model.group_matcher(coarse=False))
    last = max(layers)
    scales = {}
    for layer, names in layers.items():
        for name in names:
            scale = decay ** (last + 1 - layer)
            for start, factor in (extra or {}).items():
                scale *= factor if name.startswith(start) else 1.0
            scales[prefix + name] = scale
    return scales


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set the weight decay of the decayed parameter groups (:func:`param_groups`) to ``value``: a step of a
    weight-decay schedule (DINO's cosine 0.04 -> 0.4). Biases, norms and ``no_weight_decay()`` stay at 0."""
    for group in optimizer.param_groups:
        if group.get("decayed", False):
            group["weight_decay"] = value


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, no_decay: set[str] | None = None,
                     fused: bool = True, lr_scales: dict[str, float] | None = None,
                     **options: Any) -> torch.optim.Optimizer:
    """timm's optimizer ``name`` (``sgd`` is momentum SGD without Nesterov) over :func:`param_groups`, with
    torch's fused kernel for AdamW and SGD when every parameter allows it (and ``fused``). Each group's
    ``lr_scale`` multiplies its learning rate through :func:`lr_scheduler`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not one of {OPTIMIZERS}")
    if fused and name in FUSED_OPTIMIZERS and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                        and type(p) in (torch.Tensor, nn.Parameter) for p in model.parameters()):
        options["fused"] = True
    groups = param_groups(model, weight_decay, no_decay, lr_scales)
    return timm.optim.create_optimizer_v2(groups, opt="momentum" if name == "sgd" else name, lr=lr,
                                          weight_decay=weight_decay, filter_bias_and_bn=False, **options)


# -- schedules -------------------------------------------------------------------------------------
@dataclass
class Schedule(ABC):
    """A scalar per optimizer step: a linear warmup from ``warmup_start`` to ``start`` over ``warmup_epochs``
    (fractions allowed), then the shape of the subclass from ``start`` to ``end`` over the remaining steps.

    Call :meth:`value` with the step, the total number of steps and the steps per epoch (the base
    class knows both from the trainer). Abstract, so a recipe names a subclass with ``class_path``."""

    start: float
    end: float | None = None
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0")
        for key in ("start", "end", "warmup_start"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}.{key}={value} must be finite")

    def value(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup = min(total_steps, round(self.warmup_epochs * max(1, steps_per_epoch)))
        if step < warmup:
            return self.warmup_start + (self.start - self.warmup_start) * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        end = self.start if self.end is None else self.end
        return self.start + (end - self.start) * self.shape(progress)

    @abstractmethod
    def shape(self, progress: float) -> float:
        """0 at the start, 1 at the end of the schedule."""

    @property
    def varies(self) -> bool:
        """Whether the value can change during the run (a warmup, or an ``end`` other than ``start``)."""
        return bool(self.warmup_epochs) or (self.end is not None and self.end != self.start and
                                            self.shape(1.0) != 0.0)


@dataclass
class Cosine(Schedule):
    """Half a cosine from ``start`` to ``end`` (teacher momentum 0.996 -> 1, DINO's weight decay 0.04 -> 0.4,
    the learning rate after its warmup)."""

    def shape(self, progress: float) -> float:
        return 0.5 * (1 - math.cos(math.pi * progress))


@dataclass
class Linear(Schedule):
    """A straight line from ``start`` to ``end``."""

    def shape(self, progress: float) -> float:
        return progress


@dataclass
class Constant(Schedule):
    """``start`` throughout (after the warmup, if any): DINO's teacher temperature is
    ``Constant(0.07, warmup_epochs=30, warmup_start=0.04)``."""

    def shape(self, progress: float) -> float:
        return 0.0


def as_schedule(value: Schedule | dict[str, Any] | float, key: str = "schedule") -> Schedule:
    """A :class:`Schedule` from itself, a number (constant) or its :func:`schedule_config` dictionary;
    ``key`` names the setting in the error."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Constant(float(value))
    if isinstance(value, dict) and "class_path" in value:
        module, _, name = value["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module or "selfsup.optim"), name)
        if not (isinstance(cls, type) and issubclass(cls, Schedule)):
            raise ValueError(f"{key}: {value['class_path']!r} is not a selfsup.optim.Schedule")
        return cls(**value.get("init_args", {}))
    raise ValueError(f"{key}={value!r} must be a Schedule (e.g. selfsup.optim.Cosine), a number or "
                     "{'class_path': 'selfsup.optim.Cosine', 'init_args': {'start': 0.996, 'end': 1.0}}")


def schedule_config(schedule: Schedule) -> dict[str, Any]:
    """Plain-data form of a schedule (for hyper-parameters: checkpoints load with ``weights_only=True``)."""
    return {"class_path": f"{type(schedule).__module__}.{type(schedule).__qualname__}", "init_args": asdict(schedule)}


def training_steps(trainer: Any) -> tuple[int, int]:
    """``(optimizer steps in the run, optimizer steps per epoch)`` of a Lightning trainer, for schedules."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        if trainer.max_steps <= 0:
            raise ValueError("set trainer.max_epochs or trainer.max_steps: the schedule needs a length")
        total = trainer.max_steps
    trainer.fit_loop.setup_data()  # so num_training_batches is known even when max_steps decides
    return int(total), max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))


def global_batch_size(trainer: Any) -> int:
    """Images per optimizer step over every device, node and accumulation micro-step (the lr scaling batch)."""
    per_device = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if per_device is None:
        raise ValueError("cannot scale the learning rate: the data module has no batch_size")
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, total_steps: int,
                 steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every parameter group's learning rate times ``schedule`` per step (times the group's ``lr_scale``,
    timm's layer decay), as a per-step scheduler."""
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, k=k: k * schedule.value(step, total_steps, steps_per_epoch) for k in scales])


def values(schedule: Schedule, total_steps: int, steps_per_epoch: int) -> Iterable[float]:
    """Every step's value (for plots and tests)."""
    return (schedule.value(step, total_steps, steps_per_epoch) for step in range(total_steps))
