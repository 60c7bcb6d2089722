"""Tiny `selfsup fit` runs of the demo recipe, in this process, for the command-line tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from selfsup.cli import main

PROBE = {"class_path": "selfsup.eval.callbacks.OnlineLinearProbe"}
TINY_SIMCLR_YAML = """model:
  class_path: selfsup.methods.simclr.SimCLR
  init_args:
    encoder: {class_path: selfsup.models.encoder.Encoder, init_args: {name: test_resnet}}
    proj_hidden_dim: 32
    proj_dim: 16
    warmup_epochs: 0
"""  # a recipe's model block: SimCLR on the tiny test ResNet
TINY = ["--trainer.max_steps", "2", "--data.batch_size", "16", "--data.num_workers", "0",
        "--data.image_size", "16", "--trainer.limit_val_batches", "2", "--trainer.callbacks", json.dumps([PROBE]),
        "--model.init_args.proj_hidden_dim", "32", "--trainer.precision", "32", "--trainer.log_every_n_steps", "1"]


def fit(root: Path, *extra: str) -> None:
    """``selfsup fit`` of the demo recipe at toy size with run directory ``root`` (and nothing else set)."""
    main(["fit", "--config", "recipes/demo/simclr.yaml", *TINY, "--trainer.default_root_dir", str(root), *extra])


def callbacks(*extra: dict) -> list[str]:
    """``--trainer.callbacks`` with the online probe of :data:`TINY` plus ``extra`` (class_path dicts)."""
    return ["--trainer.callbacks", json.dumps([PROBE, *extra])]


def sigterm_at(step: int) -> list[str]:
    """The :data:`TINY` callbacks plus a SIGTERM to this process after training step ``step``."""
    return callbacks({"class_path": "tests.helpers.interrupt.SigtermAt", "init_args": {"step": step}})


def logged_steps(metrics_csv: Path) -> list[int]:
    """The ``step`` of every row of a CSVLogger ``metrics.csv``."""
    with open(metrics_csv, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]
