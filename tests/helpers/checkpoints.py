"""Tiny real selfsup checkpoints for the eval/export tests: a few SimCLR steps at 16 px, written by Lightning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from selfsup.data.datamodule import SSLDataModule
from selfsup.methods.simclr import SimCLR
from selfsup.run import default_callbacks
from selfsup.models.encoder import Encoder

IMAGE_SIZE = 16


def tiny_data(batch_size: int = 16) -> SSLDataModule:
    return SSLDataModule(image_size=IMAGE_SIZE, batch_size=batch_size, eval_batch_size=256, num_workers=0)


TINY_RESNET = {"channels": [16, 32, 64, 128]}  # a resnet18 with 1/4-width stages (timm kwargs)


def tiny_method(cifar_stem: bool = False, **base) -> SimCLR:
    encoder = Encoder("resnet18", cifar_stem=cifar_stem, model_kwargs=TINY_RESNET)
    return SimCLR(encoder, proj_hidden_dim=32, proj_dim=16, warmup_epochs=0.0, **base)


def tiny_fit(root: Path, method: SimCLR | None = None, steps: int = 2, callbacks: list[Callback] | None = None,
             max_epochs: int = -1, limit_train_batches: int | float = 1.0, keep_all: bool = False,
             logger: Any = False) -> Path:
    """Fit ``steps`` steps (or ``max_epochs``) and return the path of ``last.ckpt`` under ``root``;
    ``keep_all`` keeps every epoch's checkpoint too."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=-1 if keep_all else 1)
    trainer = L.Trainer(max_steps=steps, max_epochs=max_epochs, accelerator="cpu", logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        limit_val_batches=0, limit_train_batches=limit_train_batches,
                        callbacks=[checkpoint, *default_callbacks(), *(callbacks or [])])
    try:
        trainer.fit(method or tiny_method(), tiny_data())
    finally:
        torch.set_num_threads(threads)
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: on a shared, oversubscribed CPU two threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(root: Path) -> Path:
    """A `selfsup fit` YAML for one SimCLR step of the tiny ResNet, writing under ``root``."""
    config = root / "tiny.yaml"
    config.write_text(f"""
trainer: {{accelerator: cpu, max_steps: 1, limit_val_batches: 0, default_root_dir: {root}, logger: false}}
model:
  class_path: selfsup.methods.simclr.SimCLR
  init_args:
    encoder: {{class_path: selfsup.models.encoder.Encoder,
              init_args: {{name: resnet18, model_kwargs: {{channels: {TINY_RESNET["channels"]}}}}}}}
    proj_hidden_dim: 32
    proj_dim: 16
    warmup_epochs: 0
data: {{image_size: {IMAGE_SIZE}, batch_size: 16, num_workers: 0}}
""")
    return config
