"""Helpers for the bad-image tests."""

from __future__ import annotations

from pathlib import Path

from selfsup.data import datasets
from selfsup.data.datasets import UnreadableImage


def record_failed_decodes(monkeypatch, log_file: Path) -> None:
    """Append the path of each failed decode to ``log_file`` (forked loader workers inherit the patch)."""
    original = datasets.load_image

    def load_image(path: str):
        try:
            return original(path)
        except UnreadableImage:
            with open(log_file, "a") as f:
                f.write(path + "\n")
            raise

    monkeypatch.setattr(datasets, "load_image", load_image)
