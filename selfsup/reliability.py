"""Keeping long runs alive: the non-finite guard, atomic checkpoints, preemption and exact RNG state.

Every mechanism lives here and is wired in by :class:`~selfsup.methods.base.SSLMethod` (the guard, the
RNG state), :mod:`selfsup.data.datamodule` (resumable sampling) and :mod:`selfsup.cli` (the plugins
and the preemption callback), so it applies to every method.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from selfsup.distributed import is_distributed, rank, world_size

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read."""


# -- non-finite guard ------------------------------------------------------------------------------
def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True if ``flag`` is true on any rank, so every rank takes the same branch (skip or step)."""
    return any_ranks([flag], device)[0]


def any_ranks(flags: list[bool], device: torch.device | str = "cpu") -> list[bool]:
    """For each flag, whether it is true on any rank: several agreements in one all-reduce."""
    if not is_distributed():
        return list(flags)
    value = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def nonfinite_terms(terms: dict[str, Tensor]) -> list[str]:
    """Names of the scalar loss terms that are NaN or infinite."""
    return [k for k, v in terms.items() if k != "features" and v.ndim == 0 and not torch.isfinite(v.detach())]


def first_nonfinite_gradient(module: nn.Module) -> str | None:
    """Name of the first parameter whose gradient holds a NaN or an infinity (``None`` if all finite)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads or torch.stack(torch._foreach_norm(grads)).sum().isfinite():
        return None
    for name, p in module.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None


def snapshot_norm_statistics(module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Copies of every BatchNorm running statistic, so a skipped step can undo its forward pass."""
    return [(buffer, buffer.clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            for buffer in m.buffers(recurse=False)]


def restore_norm_statistics(snapshot: list[tuple[Tensor, Tensor]] | None) -> None:
    for buffer, saved in snapshot or []:
        buffer.copy_(saved)


class NonFiniteGuard:
    """Skips steps whose loss or gradient is not finite; stops the run after too many in a row.

    A skipped step leaves the weights, the optimizer state and its moments untouched. After
    ``max_consecutive`` skipped steps in a row :class:`NonFiniteError` names the step and the term.
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"model.max_consecutive_nonfinite={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0
        self.requested_skips = 0  # steps a rank asked to skip (placeholders); this process's count, not saved

    def check_loss(self, terms: dict[str, Tensor], step: int, device: torch.device,
                   skip_request: str | None = None) -> str | None:
        """The reason to skip this step's loss, agreed across ranks, or ``None`` to go ahead.

        ``skip_request`` is this rank's own reason to skip (e.g. its batch holds placeholders); it joins
        the same all-reduce, so every rank skips together. Such a step wins over a non-finite loss (its
        loss is not meaningful), is counted in ``requested_skips`` and neither counts towards nor resets
        the run of consecutive non-finite steps."""
        bad = nonfinite_terms(terms)
        nonfinite, requested = any_ranks([bool(bad), skip_request is not None], device)
        if requested:
            self.requested_skips += 1
            reason = f"{skip_request or 'another rank asked to skip'} at step {step}"
            log.warning("skipping step: %s (%d such steps so far)", reason, self.requested_skips)
            return reason
        if not nonfinite:
            return None
        values = ", ".join(f"{k}={terms[k].item()}" for k in bad) or "on another rank"
        return self._skip(f"non-finite loss term(s) {values} at step {step}")

    def check_gradients(self, module: nn.Module, step: int, device: torch.device) -> str | None:
        """The reason to skip this optimizer step, agreed across ranks, or ``None`` to go ahead."""
        name = first_nonfinite_gradient(module)
        if not any_rank(name is not None, device):
            return None
        return self._skip(f"non-finite gradient of parameter {name or '(on another rank)'} at step {step}")

    def passed(self) -> None:
        """A step went through: reset the run of consecutive skips."""
        self.consecutive = 0

    def _skip(self, reason: str) -> str:
        self.skipped_steps += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps were skipped, the last for a {reason}. Training stopped; "
                "the weights hold no non-finite update and the last saved checkpoint is intact. Lower "
                "model.base_lr, use precision bf16-mixed or 32, set trainer.gradient_clip_val, or raise "
                "model.max_consecutive_nonfinite.")
        log.warning("skipping step: %s (%d skipped so far)", reason, self.skipped_steps)
        return reason

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_steps, self.consecutive = state.get("skipped_steps", 0), state.get("consecutive", 0)


def check_some_images_decoded(decoded: int, skipped: int, device: torch.device | str = "cpu") -> None:
    """At the end of an epoch: fail clearly when files were read but no rank decoded a single image."""
    totals = torch.tensor([float(decoded), float(skipped)], device=device)
    if is_distributed():
        dist.all_reduce(totals)
    if totals[0] == 0 and totals[1] > 0:
        raise ValueError(f"no training image could be decoded this epoch ({int(totals[1])} unreadable files "
                         "skipped): every file is broken or not an image; check data.root and the "
                         "warnings above, or set data.strict_images=true to stop at the first bad file")


def report_skips(skipped_images: int, skipped_steps: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """At the end of fit: one line with the unreadable images and non-finite steps skipped, over all ranks.
    Returns the totals."""
    totals = torch.tensor([float(skipped_images), float(skipped_steps)], device=device)
    if is_distributed():
        dist.all_reduce(totals)
        totals[1] /= world_size()  # every rank skips the same steps
    rank_zero_info(f"[selfsup] skipped {int(totals[0])} unreadable images and {int(totals[1])} steps with a "
                   "non-finite loss or gradient")
    return int(totals[0]), int(totals[1])


# -- random number generator state -----------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and python RNG states, in a ``weights_only``-loadable form."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": list(python_state), "gauss": python_gauss}}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states that :func:`rng_state` collected."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (index = rank); every rank must call this together."""
    if not is_distributed():
        return [rng_state()]
    states: list[Any] = [None] * world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rank_rng_state(states: list[dict[str, Any]]) -> None:
    """Restore this rank's entry of :func:`gather_rng_states`; a different world size cannot be exact."""
    if len(states) != world_size():
        log.warning("checkpoint holds RNG states of %d ranks but the run has %d: resume is not bit-exact",
                    len(states), world_size())
    set_rng_state(states[rank() % len(states)])


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of workers, ranks and resumes."""
    return (base_seed * 1_000_003 + epoch * 2_147_483_647 + index * 6_700_417) % (2**63 - 1)


def restore_train_loader_state(trainer: L.Trainer) -> None:
    """Load the saved data-loader position now, and restart the training iterator from it.

    Lightning loads loader states in ``FitLoop.setup_data``, which is skipped on resume when
    ``configure_optimizers`` already set the data up through ``trainer.estimated_stepping_batches``
    (as :class:`SSLMethod` does, to size the schedule). Call from ``on_train_start``.
    """
    loop = trainer.fit_loop
    states = getattr(loop, "_combined_loader_states_to_load", None)
    if not states or getattr(loop, "_combined_loader", None) is None or getattr(loop, "_data_fetcher", None) is None:
        return
    loop._combined_loader._load_state_dicts(states)
    loop._combined_loader_states_to_load = []
    iter(loop._data_fetcher)


def ignore_termination_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores SIGTERM/SIGUSR1 so only the trainer reacts.

    Clusters signal every process of a job; a worker killed by it would crash the trainer before it
    could save. Workers still exit when the trainer shuts them down or dies.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


# -- checkpoints -----------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same directory, then renames it into place.

    A crash or a full disk during a save leaves the previous checkpoint untouched. A checkpoint that
    cannot be read raises :class:`CorruptCheckpointError` naming the file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as err:  # truncated zip, garbage bytes, wrong pickle: all mean "unreadable"
            detail = (str(err).strip().splitlines() or [""])[0][:160]
            raise CorruptCheckpointError(
                f"checkpoint {str(path)!r} is corrupt or not a checkpoint ({type(err).__name__}: {detail}). "
                "Resume from an earlier checkpoint in the same directory, or start without --ckpt_path."
            ) from err


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (preemption, ``scancel``, SLURM's time limit) save ``last.ckpt`` and exit cleanly.

    Lightning turns SIGTERM into a ``SIGTERMException`` after the current step; this saves the
    complete training state where ``--ckpt_path last`` finds it. Under SLURM with auto-requeue,
    Lightning itself handles the requeue signal (SIGUSR1) by saving ``hpc_ckpt_N.ckpt`` and requeuing.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = preemption_checkpoint_path(trainer)
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            # The saved ModelCheckpoint state then names this file as its last checkpoint: resumed, the
            # callback overwrites last.ckpt instead of versioning around it (last-v1.ckpt, last-v2.ckpt...).
            callback.last_model_path = path
        trainer.save_checkpoint(path)
        rank_zero_info(f"[selfsup] SIGTERM at step {trainer.global_step}: saved {path}; "
                       "resume with --ckpt_path last")


def preemption_checkpoint_path(trainer: L.Trainer) -> str:
    """``<checkpoint dir>/last.ckpt`` of the run's ModelCheckpoint, else ``<root>/checkpoints/last.ckpt``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")


# -- Trainer plugins -------------------------------------------------------------------------------
class SyncBatchNormPlugin(TorchSyncBatchNorm):
    """``Trainer(sync_batchnorm=True)`` with :class:`selfsup.models.sync_batchnorm.SyncBatchNorm`,
    which also runs on CPU (gloo), where ``torch.nn.SyncBatchNorm`` refuses the input."""

    def apply(self, model: nn.Module) -> nn.Module:
        from selfsup.models.sync_batchnorm import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        from selfsup.models.sync_batchnorm import revert_sync_batchnorm

        return revert_sync_batchnorm(model)


def default_plugins(plugins: Any, sync_batchnorm: bool) -> list[Any]:
    """The user's plugins plus the atomic checkpoint writer (unless a CheckpointIO is given) and,
    with ``sync_batchnorm``, the CPU-capable SyncBatchNorm plugin (unless a LayerSync is given)."""
    from lightning.pytorch.plugins import CheckpointIO
    from lightning.pytorch.plugins.layer_sync import LayerSync

    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if sync_batchnorm and not any(isinstance(p, LayerSync) for p in plugins):
        plugins.append(SyncBatchNormPlugin())
    return plugins
