"""Exact resume: which checkpoint ``--ckpt_path last`` resumes from, and the run state beside the weights.

:class:`ExactResume` (a callback the CLI installs, so a method cannot lose it by overriding a hook)
saves every rank's torch/CUDA/numpy/python RNG states and, on resume, restores them and the training
loader's position right before the first step: a run killed at any step ends bit-identical to an
uninterrupted one.

Which checkpoint: the newest complete one of a run.

A run leaves two kinds of resumable files: ``<checkpoint dir>/last.ckpt`` (ModelCheckpoint, and the
SIGTERM save of :class:`~selfsup.run.preemption.PreemptionCheckpoint`) and ``<default_root_dir>/hpc_ckpt_N.ckpt``
(Lightning's SLURM requeue save on SIGUSR1). Lightning's own ``"last"`` looks only at the first kind and
would load a half-written file. :func:`find_resume_checkpoint` looks at both, skips incomplete files
with a warning, and picks deterministically (newest modification time, ties broken by name), so every
rank of a DDP job, resolving on its own before the process group exists, picks the same file.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from selfsup.checkpoint import is_complete_checkpoint
from selfsup.distributed import is_distributed, rank, world_size

log = logging.getLogger(__name__)

LAST_PATTERN = "last*.ckpt"  # last.ckpt and older runs' last-vN.ckpt, as ModelCheckpoint's own search
HPC_PATTERN = "hpc_ckpt_*.ckpt"


def resume_candidates(checkpoint_dir: str | Path | None, root_dir: str | Path | None) -> list[Path]:
    """``<checkpoint_dir>/last*.ckpt`` and ``<root_dir>/hpc_ckpt_*.ckpt``, newest first (modification
    time, then name, then path: the same order on every rank and every node of a shared file system)."""
    found: set[Path] = set()
    for folder, pattern in ((checkpoint_dir, LAST_PATTERN), (root_dir, HPC_PATTERN)):
        if folder is not None and Path(folder).is_dir():
            found.update(Path(os.path.normpath(p)) for p in Path(folder).glob(pattern))
    stamped = []
    for path in found:
        try:
            stamped.append((path.stat().st_mtime_ns, path.name, str(path), path))
        except FileNotFoundError:  # removed while we looked (ModelCheckpoint replacing a file)
            continue
    return [path for *_, path in sorted(stamped, reverse=True)]


def find_resume_checkpoint(checkpoint_dir: str | Path | None, root_dir: str | Path | None) -> str | None:
    """The newest complete checkpoint among :func:`resume_candidates`, or ``None`` to start afresh.

    Every incomplete file passed over on the way is named in a warning (it is left on disk).
    """
    for path in resume_candidates(checkpoint_dir, root_dir):
        if is_complete_checkpoint(path):
            rank_zero_info(f"[selfsup] --ckpt_path last: resuming from {path}")
            return str(path)
        rank_zero_warn(f"[selfsup] --ckpt_path last: skipping {str(path)!r}, an incomplete checkpoint (its zip "
                       "directory cannot be read: the save was interrupted); looking for an older one. "
                       "Delete the file to silence this warning.")
    rank_zero_warn(f"[selfsup] --ckpt_path last: no checkpoint in {str(checkpoint_dir)!r} (last*.ckpt) or "
                   f"{str(root_dir)!r} (hpc_ckpt_*.ckpt); starting from scratch.")
    return None


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


def restore_train_loader_state(trainer: L.Trainer) -> None:
    """Load the saved data-loader position now, and restart the training iterator from it.

    Lightning loads loader states in ``FitLoop.setup_data``, which is skipped on resume when
    ``configure_optimizers`` already set the data up through ``trainer.estimated_stepping_batches``
    (as :class:`SSLMethod` does, to size the schedule). Private Lightning attributes, read defensively.
    """
    loop = trainer.fit_loop
    states = getattr(loop, "_combined_loader_states_to_load", None)
    if not states or getattr(loop, "_combined_loader", None) is None or getattr(loop, "_data_fetcher", None) is None:
        return
    loop._combined_loader._load_state_dicts(states)
    loop._combined_loader_states_to_load = []
    iter(loop._data_fetcher)


class ExactResume(L.Callback):
    """Saves every rank's RNG states with each checkpoint; on resume restores them, and the training
    loader's position, right before the first step (after the loaders and workers are set up)."""

    def __init__(self) -> None:
        self._to_restore: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": gather_rng_states()}  # every rank saves (Lightning dumps on all), so all gather

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restore_train_loader_state(trainer)
        if self._to_restore is not None:
            restore_rank_rng_state(self._to_restore)
            self._to_restore = None
