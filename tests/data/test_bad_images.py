"""Broken and unusual image files: each is decoded, or replaced and counted; a run over them finishes.

Cases (the issue's list and a few more): truncated JPEG and PNG, zero-byte files, text named .jpg,
CMYK, RGBA, LA, palette, 1-bit, 16-bit and float grayscale, 1x1 and smaller-than-crop images, extreme
aspect ratios, symlinks to missing files. An empty folder, or one where every file is broken, gives a
clear error.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.datamodule import MAX_REPLACEMENT_ATTEMPTS
from selfsup.data.datasets import UnreadableImage, decode_image, load_image
from selfsup.data.transforms import ContrastiveViews, Preprocessing
from selfsup.run import DataHealth, NonFiniteGuard
from selfsup.run.data_health import totals
from tests.helpers.dist import run_distributed
from tests.helpers.images import record_failed_decodes
from tests.helpers.methods import run_callback, tiny_fit


def _image(mode: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    width, height = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32) * 1000)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_case(folder: Path, name: str, case: str, rng: np.random.Generator) -> bool:
    """Write one file of kind ``case``; returns whether it should decode."""
    size = tuple(int(s) for s in rng.integers(20, 60, 2))
    writers = {
        "good_jpeg": lambda: _encoded(_image("RGB", size, rng), "JPEG"),
        "cmyk_jpeg": lambda: _encoded(_image("CMYK", size, rng), "JPEG"),
        "gray_jpeg": lambda: _encoded(_image("L", size, rng), "JPEG"),
        "rgba_png": lambda: _encoded(_image("RGBA", size, rng), "PNG"),
        "la_png": lambda: _encoded(_image("LA", size, rng), "PNG"),
        "palette_png": lambda: _encoded(_image("P", size, rng), "PNG"),
        "bilevel_png": lambda: _encoded(_image("1", size, rng), "PNG"),
        "gray16_png": lambda: _encoded(_image("I;16", size, rng), "PNG"),
        "float_tiff": lambda: _encoded(_image("F", size, rng), "TIFF"),
        "one_pixel_png": lambda: _encoded(_image("RGB", (1, 1), rng), "PNG"),
        "smaller_than_crop_png": lambda: _encoded(_image("RGB", (5, 7), rng), "PNG"),
        "wide_png": lambda: _encoded(_image("RGB", (600, 1), rng), "PNG"),
        "tall_jpeg": lambda: _encoded(_image("RGB", (2, 400), rng), "JPEG"),
        "truncated_jpeg": lambda: _encoded(_image("RGB", size, rng), "JPEG")[:-200],
        "truncated_png": lambda: _encoded(_image("RGB", size, rng), "PNG")[: 60],
        "zero_bytes": lambda: b"",
        "text_as_jpg": lambda: b"this is not an image\n" * 5,
    }
    suffix = ".png" if "png" in case else ".tiff" if "tiff" in case else ".jpg"
    path = folder / f"{name}{suffix}"
    if case == "missing_symlink":
        os.symlink(folder / f"{name}-does-not-exist.jpg", folder / f"{name}.jpg")
        return False
    path.write_bytes(writers[case]())
    return case not in ("truncated_jpeg", "truncated_png", "zero_bytes", "text_as_jpg")


CASES = ["good_jpeg", "cmyk_jpeg", "gray_jpeg", "rgba_png", "la_png", "palette_png", "bilevel_png", "gray16_png",
         "float_tiff", "one_pixel_png", "smaller_than_crop_png", "wide_png", "tall_jpeg", "truncated_jpeg",
         "truncated_png", "zero_bytes", "text_as_jpg", "missing_symlink"]


@pytest.mark.parametrize("case", CASES)
def test_each_case_decodes_to_rgb_or_raises_unreadable(case, tmp_path):
    decodes = write_case(tmp_path, "x", case, np.random.default_rng(0))
    path = str(next(tmp_path.iterdir()))
    if not decodes:
        with pytest.raises(UnreadableImage, match="x\\."):
            decode_image(load_image(path))  # the header may pass; decoding raises
        return
    image = decode_image(load_image(path))
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[1:]) >= 1
    views = ContrastiveViews()
    views.bind(Preprocessing(image_size=16))
    for view in views(load_image(path)).images:
        assert view.shape == (3, 16, 16) and view.dtype == torch.uint8


def test_sixteen_bit_images_keep_their_contrast(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16)[None] * 1000).repeat(8, 0)  # 0 .. 63000
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = decode_image(load_image(str(tmp_path / "ramp.png")))[0].numpy()
    assert pixels.min() == 0 and pixels.max() >= 250, "not clipped to white and not crushed to black"


def _fuzz_folder(folder: Path, count: int, seed: int = 0) -> int:
    """``count`` files of random cases (every case at least once); returns how many are unreadable."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    kinds = CASES + [CASES[i] for i in rng.integers(0, len(CASES), count - len(CASES))]
    return sum(not write_case(folder, f"{i:03d}", kind, rng) for i, kind in enumerate(kinds))


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_fuzz_fit_over_broken_files_replaces_and_counts_every_bad_one(tmp_path, num_workers, caplog, monkeypatch):
    bad = _fuzz_folder(tmp_path / "images", 60)
    assert bad >= 5
    record_failed_decodes(monkeypatch, tmp_path / "failures.txt")
    sizes = []

    class BatchSizes(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            sizes.append(len(batch))

    with caplog.at_level(logging.INFO):
        method, trainer = tiny_fit("simclr", tmp_path / "run", -1, dataset="folder", data_root=tmp_path / "images",
                                   num_workers=num_workers, drop_last=False, max_epochs=1, batch_size=8,
                                   callbacks=[BatchSizes()])
    failures = (tmp_path / "failures.txt").read_text().splitlines()
    assert len(set(failures)) == bad, "one epoch visits every file once: every bad one is met"
    assert run_callback(trainer, DataHealth).skipped_images == len(failures), \
        "every unreadable file met (replacement draws too) is counted"
    assert sizes == [8] * 7 + [4], "bad files never shorten a batch: ceil(60 / 8) batches of the sampler's sizes"
    assert trainer.global_step == 8 and run_callback(trainer, NonFiniteGuard).requested_skips == 0
    assert all(torch.isfinite(p).all() for p in method.parameters())
    assert f"skipped {len(failures)} unreadable images" in caplog.text


def test_a_folder_of_only_broken_files_is_a_clear_error(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, case in enumerate(["truncated_jpeg", "zero_bytes", "text_as_jpg", "missing_symlink"] * 2):
        write_case(folder, f"{i}", case, rng)
    # each of the 8 samples meets its own file and MAX_REPLACEMENT_ATTEMPTS unreadable replacements
    met = 8 * (MAX_REPLACEMENT_ATTEMPTS + 1)
    with pytest.raises(ValueError, match=rf"no training image could be decoded.*\({met} unreadable"):
        tiny_fit("simclr", tmp_path / "run", -1, dataset="folder", data_root=folder, drop_last=False, max_epochs=1,
                 max_consecutive_nonfinite=1)  # placeholder steps are not non-finite ones


def test_an_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images .* found under"):
        tiny_fit("simclr", tmp_path / "run", 2, dataset="folder", data_root=tmp_path / "images")


def _epoch_end(decoded: int, skipped: int) -> str | None:
    """DataHealth's end-of-epoch check on this rank's counts; the error, if any."""
    health = DataHealth()
    health._decoded, health._skipped = decoded, skipped
    try:
        health.on_train_epoch_end(None, SimpleNamespace(device=torch.device("cpu")))
    except ValueError as err:
        return str(err)
    return None


def _counts_on_rank(rank: int, world_size: int) -> list:
    summed = tuple(totals([3, 4][rank], 2))
    return [summed, _epoch_end([0, 5][rank], [3, 4][rank]), _epoch_end(0, [3, 4][rank])]


def test_skip_counts_are_summed_over_ranks():
    for summed, one_rank_decoded, nobody_decoded in run_distributed(_counts_on_rank, 2):
        assert summed == (7, 4)
        assert one_rank_decoded is None, "a rank with only bad files is fine while another decodes"
        assert "7 unreadable files" in nobody_decoded
