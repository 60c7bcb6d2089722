"""Helpers every method file shares: float32 regions for losses and the check of a method's arguments."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Run a block in float32 even inside an autocast region (losses, normalisations, Sinkhorn)."""
    with torch.autocast(device_type, enabled=False):
        yield


def check_arg(key: str, ok: bool, value: Any, requirement: str) -> None:
    """Raise ``ValueError`` naming the YAML key (``model.<key>``) unless ``ok``."""
    if not ok:
        raise ValueError(f"model.{key}={value!r} is invalid: it must be {requirement}")
