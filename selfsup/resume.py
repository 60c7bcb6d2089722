"""Which checkpoint ``--ckpt_path last`` resumes from: the newest complete one of a run.

A run leaves two kinds of resumable files: ``<checkpoint dir>/last.ckpt`` (ModelCheckpoint, and the
SIGTERM save of :class:`~selfsup.reliability.PreemptionCheckpoint`) and ``<default_root_dir>/hpc_ckpt_N.ckpt``
(Lightning's SLURM requeue save on SIGUSR1). Lightning's own ``"last"`` looks only at the first kind and
would load a half-written file. :func:`find_resume_checkpoint` looks at both, skips incomplete files
with a warning, and picks deterministically (newest modification time, ties broken by name), so every
rank of a DDP job, resolving on its own before the process group exists, picks the same file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

LAST_PATTERN = "last*.ckpt"  # last.ckpt and older runs' last-vN.ckpt, as ModelCheckpoint's own search
HPC_PATTERN = "hpc_ckpt_*.ckpt"


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint that was written to the end.

    ``torch.save`` writes a zip archive whose central directory comes last, so a truncated file has none
    that ``zipfile`` can read. A directory (a sharded FSDP checkpoint) is complete once
    ``torch.distributed.checkpoint`` wrote its ``.metadata``, which it does after every shard.
    """
    path = Path(path)
    if path.is_dir():
        return (path / ".metadata").is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


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
