"""Checkpoint I/O shared by methods, run callbacks, eval and export: safe loading, atomic saving and the
encoder's state.

- :func:`load_checkpoint`: ``torch.load(weights_only=True)`` with errors that name the problem.
- :class:`AtomicCheckpointIO`: Lightning's writer, through a temporary file and a rename.
- :func:`read_encoder_weights`, :func:`load_encoder`, :func:`init_encoder_from`: an encoder from a selfsup
  checkpoint, an export directory (``model.safetensors`` + ``config.json``) or the safetensors file.

A selfsup checkpoint holds ``checkpoint["selfsup"] = {"method", "encoder", "preprocessing"}`` (written by
:meth:`SSLMethod.on_save_checkpoint`) and the encoder weights under ``state_dict["encoder.*"]``. Nothing
here unpickles arbitrary objects unless the caller asks for it explicitly (``unsafe_load=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file
from torch import Tensor

from selfsup.models.encoder import Encoder

ENCODER_PREFIX = "encoder."
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"  # an export directory
MODEL_PREFIX = "model."  # Encoder's keys for the timm model's own state dict
UNSAFE_HINT = ("only if you trust where the file came from, allow full unpickling explicitly with "
               "--unsafe-load (unsafe_load=True in Python): unpickling can run arbitrary code")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (raised when a run resumes from it)."""


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
    """The state dict of the encoder that is the method's representation (keys relative to :class:`Encoder`,
    e.g. ``model.conv1.weight``): the student's ``encoder.*``, or the EMA teacher's copy of it where the
    method scores its teacher (``checkpoint["selfsup"]["encoder_prefix"]``, e.g. ``teacher.copies.0.``)."""
    prefix = (checkpoint.get("selfsup") or {}).get("encoder_prefix", ENCODER_PREFIX)
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint {str(path)!r} has no weights under '{prefix}*'")
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


def encoder_config(path: str | Path | Any) -> dict[str, Any]:
    """The :class:`Encoder` config stored in a selfsup checkpoint: a local path (memory-mapped, so the
    weights are not read) or an open file (read, then put back where it was)."""
    if isinstance(path, (str, os.PathLike)):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    else:
        start = path.tell()
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        path.seek(start)
    config = checkpoint.get("selfsup", {}).get("encoder") if isinstance(checkpoint, dict) else None
    if config is None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no encoder config (checkpoint['selfsup']['encoder']), "
                              "so it was not written by a selfsup method; pass encoder=Encoder(...) explicitly")
    return config


# -- encoders from checkpoints and exports --------------------------------------------------------
def read_encoder_weights(path: str | Path, unsafe_load: bool = False
                         ) -> tuple[dict[str, Tensor], dict[str, Any] | None, dict[str, Any] | None]:
    """Encoder state dict (keys relative to :class:`Encoder`), encoder config and preprocessing from a
    selfsup ``.ckpt``, an export directory or its ``model.safetensors``. Config is ``None`` when unknown."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        folder, weights = (path, path / WEIGHTS_FILE) if path.is_dir() else (path.parent, path)
        if not weights.is_file():
            raise CheckpointError(f"no {WEIGHTS_FILE} in {str(folder)!r}: export one with "
                                  "`selfsup export --ckpt RUN.ckpt --out DIR`")
        try:
            state = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{str(weights)!r} is truncated or corrupt: {err}") from err
        config_file = folder / CONFIG_FILE
        document = json.loads(config_file.read_text()) if config_file.is_file() else {}
        extra = document.get("selfsup", {})
        return ({MODEL_PREFIX + k: v for k, v in state.items()}, extra.get("encoder"), extra.get("preprocessing"))
    checkpoint = load_checkpoint(path, unsafe_load)
    meta = selfsup_metadata(checkpoint, path)
    return encoder_state(checkpoint, path), meta["encoder"], meta.get("preprocessing")


def load_encoder(path: str | Path, unsafe_load: bool = False, **overrides: Any) -> Encoder:
    """An :class:`Encoder` (eval mode) from an export directory, its safetensors file or a selfsup checkpoint.

    ``encoder.preprocessing`` holds the preprocessing the weights were trained with. ``overrides``
    change constructor arguments that keep the weights' shapes, e.g. ``drop_path_rate=0.1``.
    """
    state, config, preprocessing = read_encoder_weights(path, unsafe_load)
    if config is None:
        raise CheckpointError(f"{str(path)!r} has no selfsup encoder config (config.json 'selfsup.encoder'); "
                              "load it with timm.create_model or re-export it with `selfsup export`")
    encoder = Encoder(**{**config, **overrides})
    load_into(encoder, state, path)
    encoder.preprocessing = preprocessing
    return encoder.eval()


def is_timm_weights(path: str | Path) -> bool:
    """Whether ``path`` is a timm model's weights file rather than a selfsup checkpoint or export: a
    ``.safetensors`` file without a selfsup ``config.json`` beside it, or a ``torch.save``'d state dict
    (``.pth``, ``.pt``, ``.bin``) without selfsup's entry."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        config = path.parent / CONFIG_FILE
        return not (config.is_file() and "selfsup" in json.loads(config.read_text()))
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not readable this way: let the checkpoint reader name the problem
            return False
        return isinstance(content, dict) and "selfsup" not in content
    return False


def init_encoder_from(encoder: Encoder, path: str | Path, unsafe_load: bool = False) -> None:
    """Copy the weights of a checkpoint, an export or a timm weights file (:meth:`Encoder.load_timm_weights`)
    into ``encoder`` (for ``--init_from.path``)."""
    if is_timm_weights(path):
        try:
            encoder.load_timm_weights(str(path))
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        return
    state, config, _ = read_encoder_weights(path, unsafe_load)
    if config is not None and config["name"] != encoder.config["name"]:
        raise CheckpointError(f"init_from={str(path)!r} holds a {config['name']!r} encoder but the model "
                              f"uses {encoder.config['name']!r}; set the encoder name to {config['name']!r}")
    with torch.no_grad():
        load_into(encoder, state, path)


# -- writing ---------------------------------------------------------------------------------------
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
