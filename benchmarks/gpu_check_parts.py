"""The parts of ``benchmarks/gpu_check.py``: its data (generated JPEGs, synthetic batches in the loader's format,
a timed loader), the steady-state timer, and the recipes as objects (full size, or shrunk for the CPU smoke)."""

from __future__ import annotations

import importlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image

import selfsup.run
from selfsup.data.datamodule import Batch, SSLDataModule, ViewDataset, collate_views
from selfsup.data.datasets import ArrayImages, embedded_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIDE, SMOKE_SIDE = 256, 56  # the generated JPEGs and synthetic images (px)
TINY = {"resnet": {"name": "test_resnet"},
        "vit": {"name": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4,
                "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}},
        "heads": {"proj_hidden_dim": 64, "proj_dim": 32, "num_prototypes": 32, "decoder_width": 32,
                  "decoder_depth": 1, "decoder_heads": 2, "mask_patch_size": None}}


class CheckFailed(AssertionError):
    """One of the check's assertions failed for a row."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


# -- the data: generated JPEGs, synthetic batches, a timed loader ----------------------------------------
def make_images(folder: Path, side: int, counts: dict[str, int]) -> Path:
    """The embedded Fashion-MNIST upsampled to ``side`` px (bicubic), tinted to RGB, as quality-90 JPEGs in
    ``<folder>/<split>/<class>/`` (``test`` from the test split, the others from the train split)."""
    if (folder / "complete").exists():
        return folder
    sources = {"test": embedded_fashion_mnist("test"), "train": embedded_fashion_mnist("train")}

    def save(job: tuple[str, int]) -> None:
        split, i = job
        grey, label = sources["test" if split == "test" else "train"][i]
        tint = 0.5 + 0.5 * np.random.default_rng(i).random(3)
        image = Image.fromarray(grey[0].numpy()).resize((side, side), Image.BICUBIC)
        rgb = (np.asarray(image, dtype=np.float32)[..., None] * tint).astype(np.uint8)
        path = folder / split / f"class{label}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path, quality=90)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
        list(pool.map(save, [(split, i) for split, count in counts.items() for i in range(count)]))
    (folder / "complete").touch()
    return folder


class TimedLoader:
    """A training loader with the seconds the training loop spent blocked in ``next()`` on it (the data wait)."""

    def __init__(self, loader: Any):
        self.loader, self.wait_s = loader, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            self.wait_s += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(state)

    # Lightning shuts a DataLoader's workers down at the end of fit through its `_iterator`; passed through, so
    # they are not left to the garbage collector (whose shutdown of persistent workers waits 10 s here)
    @property
    def _iterator(self) -> Any:
        return getattr(self.loader, "_iterator", None)

    @_iterator.setter
    def _iterator(self, value: Any) -> None:
        if hasattr(self.loader, "_iterator"):
            self.loader._iterator = value


class CheckedData(SSLDataModule):
    """The data module of one row: the real training loader, or ``synthetic_steps`` copies of one batch that the
    view transform made from random images (uint8 views and colour parameters: what the loader ships), pinned
    like the loader's. The loader is timed, and every batch is checked for page-locked views before its transfer."""

    def __init__(self, *args: Any, synthetic_steps: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.synthetic_steps, self.pinned, self.loader = synthetic_steps, [], None

    def synthetic_batch(self) -> Batch:
        side = IMAGE_SIDE if self.preprocessing.image_size > 64 else SMOKE_SIDE
        pixels = np.random.default_rng(0).integers(0, 256, (self.batch_size, side, side, 3), dtype=np.uint8)
        views = ViewDataset(ArrayImages(pixels, None), self.views)
        batch = collate_views([views.training_sample(i, seed=i) for i in range(self.batch_size)])
        return batch.pin_memory() if torch.cuda.is_available() else batch

    def train_dataloader(self) -> TimedLoader:
        if self.synthetic_steps:
            batch = self.synthetic_batch()
            self.loader = TimedLoader([batch] * self.synthetic_steps)
        else:
            self.loader = TimedLoader(super().train_dataloader())
        return self.loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, Batch):
            self.pinned.append(batch.views[0].is_pinned())
        return batch


# -- one run ----------------------------------------------------------------------------------------------
def synced_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer(L.Callback):
    """Times the steady state (the steps after ``warmup``: compilation, cuDNN and allocator warm-up), bounded by
    ``torch.cuda.synchronize``, with the data wait inside that window; keeps each step's loss on the device."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.ended = warmup, steps, 0
        self.losses: list[torch.Tensor] = []
        self.marks: dict[Any, tuple[float, float]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks["start"] = (synced_time(), 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().float().reshape(()))
        self.ended += 1
        if self.ended in (self.warmup, self.steps):
            self.marks[self.ended] = (synced_time(), trainer.datamodule.loader.wait_s)

    def results(self) -> dict[str, float]:
        require(self.ended == self.steps and len(self.marks) == 3, f"{self.ended} of {self.steps} steps ran")
        losses = torch.stack(self.losses).cpu()
        require(bool(losses.isfinite().all()), f"non-finite losses: {losses.tolist()}")
        (t0, wait0), (t1, wait1) = self.marks[self.warmup], self.marks[self.steps]
        return {"window_s": t1 - t0, "wait_s": wait1 - wait0, "warmup_s": t0 - self.marks["start"][0],
                "loss_first": float(losses[0]), "loss_last": float(losses[-1])}


def run_callbacks() -> list[L.Callback]:
    """``selfsup fit``'s run callbacks, plus ``selfsup.run.DataWait`` where that exists and is not among them."""
    callbacks = selfsup.run.default_callbacks()
    data_wait = getattr(selfsup.run, "DataWait", None)
    if data_wait is not None and not any(isinstance(c, data_wait) for c in callbacks):
        callbacks.append(data_wait())
    return callbacks


def instantiate(spec: Any) -> Any:
    """A recipe's ``{class_path, init_args}`` tree as objects, as LightningCLI builds it."""
    if isinstance(spec, dict) and "class_path" in spec:
        return instantiate_class(spec["class_path"])(**instantiate(spec.get("init_args", {})))
    if isinstance(spec, dict):
        return {key: instantiate(value) for key, value in spec.items()}
    return [instantiate(value) for value in spec] if isinstance(spec, list) else spec


def recipe(method: str, smoke: bool) -> dict[str, Any]:
    """``recipes/imagenet/<method>.yaml``; for the smoke, shrunk to tiny models and 32 px (48/32 px crops)."""
    spec = yaml.safe_load((ROOT / "recipes" / "imagenet" / f"{method}.yaml").read_text())
    if smoke:
        model, data = spec["model"]["init_args"], spec["data"]
        encoder = model["encoder"]["init_args"]
        encoder.update(TINY["vit" if encoder["name"].startswith("vit") else "resnet"])
        model.update({key: value for key, value in TINY["heads"].items() if key in model})
        data["image_size"] = 32
        views = data["views"]["init_args"]
        if "global_crops" in views:  # CPU bf16 conv gradients at 1x1 maps go NaN (tests/helpers/methods.py)
            views["global_crops"]["size"], views["local_crops"]["size"] = 48, 32
    return spec


def instantiate_class(path: str) -> Any:
    """The class (or function) a dotted ``module.Name`` path names."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
