"""Safe checkpoint loading: ``torch.load(weights_only=True)`` with errors that name the problem.

A selfsup checkpoint holds ``checkpoint["selfsup"] = {"method", "encoder", "preprocessing"}`` (written by
:meth:`SSLMethod.on_save_checkpoint`) and the encoder weights under ``state_dict["encoder.*"]``. Nothing
here unpickles arbitrary objects unless the caller asks for it explicitly (``unsafe_load=True``).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfsup.models.encoder import Encoder

ENCODER_PREFIX = "encoder."
UNSAFE_HINT = ("only if you trust where the file came from, allow full unpickling explicitly with "
               "--unsafe-load (unsafe_load=True in Python): unpickling can run arbitrary code")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


def load_checkpoint(path: str | Path, unsafe_load: bool = False) -> dict[str, Any]:
    """Load a ``.ckpt``/``.pt`` file onto the CPU with ``weights_only=True`` (unless ``unsafe_load``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): the write was interrupted?")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            first_line = str(err).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint {str(path)!r} needs full unpickling (it stores Python objects that "
                f"torch.load(weights_only=True) refuses: {first_line}); {UNSAFE_HINT}") from err
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt (unpickling failed: {err})") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt and cannot be read "
                              f"({type(err).__name__}: {str(err).strip().splitlines()[0]})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a "
                              "Lightning checkpoint dictionary")
    return checkpoint


def selfsup_metadata(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>") -> dict[str, Any]:
    """The ``checkpoint["selfsup"]`` entry, or an error saying the file comes from something else."""
    meta = checkpoint.get("selfsup")
    if not isinstance(meta, dict) or "encoder" not in meta:
        found = ", ".join(sorted(map(str, checkpoint))[:8]) or "nothing"
        raise CheckpointError(
            f"checkpoint {str(path)!r} was not written by a selfsup method: it has no 'selfsup' entry with "
            f"the encoder config (found keys: {found}). Score checkpoints of `selfsup fit` runs, or export "
            "other models' backbones with timm instead")
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {str(path)!r} has no 'state_dict' with the encoder weights")
    return meta


def encoder_state(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>") -> dict[str, Tensor]:
    """The encoder's own state dict (keys relative to :class:`Encoder`, e.g. ``model.conv1.weight``)."""
    state = {k[len(ENCODER_PREFIX):]: v for k, v in checkpoint["state_dict"].items()
             if k.startswith(ENCODER_PREFIX)}
    if not state:
        raise CheckpointError(f"checkpoint {str(path)!r} has no weights under '{ENCODER_PREFIX}*'")
    return state


def encoder_from_checkpoint(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>",
                            **overrides: Any) -> Encoder:
    """Build the :class:`Encoder` described by a selfsup checkpoint and load its weights (eval mode).

    ``overrides`` change constructor arguments that do not change the weights, e.g. ``drop_path_rate``.
    """
    meta = selfsup_metadata(checkpoint, path)
    encoder = Encoder(**{**meta["encoder"], **overrides})
    load_into(encoder, encoder_state(checkpoint, path), path)
    return encoder.eval()


def load_into(encoder: Encoder, state: dict[str, Tensor], path: str | Path) -> None:
    """``load_state_dict(strict=True)`` with an error naming the file and the mismatching keys."""
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the weights in {str(path)!r} do not fit encoder "
                              f"{encoder.config['name']!r}: {str(err).strip()[:600]}") from err


def file_digest(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """SHA-256 of a file's content (the identity of a checkpoint in the feature cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (the identity of in-memory weights)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
