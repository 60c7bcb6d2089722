"""Helpers for the bad-image tests."""

from __future__ import annotations

from pathlib import Path

from selfsup.data import datasets
from selfsup.data.datasets import UnreadableImage


def record_failed_decodes(monkeypatch, log_file: Path) -> None:
    """Append the path of each failed decode to ``log_file`` (forked loader workers inherit the patch)."""
    original_open, original_decode = datasets.load_image, datasets.decode_image

    def failed(path: str) -> None:
        with open(log_file, "a") as f:
            f.write(path + "\n")

    def load_image(path: str):
        try:
            return original_open(path)
        except UnreadableImage:
            failed(path)
            raise

    def decode_image(image, min_size=None):
        path = getattr(image, "filename", None)  # read before decoding closes the file
        try:
            return original_decode(image, min_size)
        except UnreadableImage:
            failed(path)
            raise

    monkeypatch.setattr(datasets, "load_image", load_image)
    monkeypatch.setattr(datasets, "decode_image", decode_image)
