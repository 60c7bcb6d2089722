"""Preemption and checkpoint safety.

- SIGTERM to a ``selfsup fit`` process (and its data workers, as a cluster signals the whole job)
  saves ``last.ckpt`` and exits cleanly; ``--ckpt_path last`` then finishes the run.
- Checkpoint writes are atomic: a save that fails midway leaves the previous checkpoint intact.
- A corrupt checkpoint gives a clear error naming the file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.checkpoint import AtomicCheckpointIO, CorruptCheckpointError
from tests.helpers.methods import tiny_fit
from tests.helpers.cli import TINY_SIMCLR_YAML

MAX_STEPS = 40

RECIPE = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {max_steps}
  max_epochs: -1
  logger: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  default_root_dir: {root}
checkpoint:
  every_n_train_steps: 4
  every_n_epochs: 0
  save_top_k: 0
{TINY_SIMCLR_YAML}data:
  dataset: folder
  root: {images}
  image_size: 16
  batch_size: 4
  num_workers: 2
"""


def _write_images(folder: Path, count: int = 24) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def _selfsup(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "selfsup.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


@pytest.mark.slow
def test_sigterm_to_the_job_saves_last_and_resume_finishes(tmp_path):
    _write_images(tmp_path / "images")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(TINY_SIMCLR_YAML=TINY_SIMCLR_YAML, max_steps=MAX_STEPS, root=tmp_path / "run", images=tmp_path / "images"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"

    job = _selfsup("fit", "--config", str(recipe), start_new_session=True)
    deadline = time.time() + 240
    while not last.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert last.exists(), f"no periodic checkpoint appeared:\n{job.communicate(timeout=60)[0][-3000:]}"
    os.killpg(job.pid, signal.SIGTERM)  # like SLURM/Kubernetes: every process of the job, workers included
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0, output[-3000:]
    assert "SIGTERM at step" in output
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert 4 <= saved_step < MAX_STEPS, "the run was interrupted mid-way and saved where it stopped"

    resumed = _selfsup("fit", "--config", str(recipe), "--ckpt_path", "last")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    assert "Restored all states" in output
    assert torch.load(last, weights_only=True)["global_step"] == MAX_STEPS


def _failing_save(fraction: float):
    """A ``torch.save`` that writes part of the bytes, then fails like a full disk or a killed process."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: int(len(buffer.getvalue()) * fraction)])
        raise OSError(28, "No space left on device")

    return save


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fraction):
    io_plugin = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"state_dict": {"w": torch.arange(1000.0)}, "global_step": 1}, path)
    good = path.read_bytes()

    monkeypatch.setattr(torch, "save", _failing_save(fraction))
    with pytest.raises(OSError, match="No space left"):
        io_plugin.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
    monkeypatch.undo()

    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no temporary file is left behind"
    assert io_plugin.load_checkpoint(path)["global_step"] == 1


def test_a_successful_save_replaces_the_file(tmp_path):
    io_plugin = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    for step in (1, 2):
        io_plugin.save_checkpoint({"global_step": step}, path)
    assert io_plugin.load_checkpoint(path)["global_step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty"])
def test_resuming_from_a_corrupt_checkpoint_names_the_file(tmp_path, corruption):
    tiny_fit("simclr", tmp_path / "run", 2)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10,
                      "empty": b""}[corruption])
    with pytest.raises(CorruptCheckpointError, match=r"last\.ckpt.*corrupt.*earlier checkpoint"):
        tiny_fit("simclr", tmp_path / "run", 4, ckpt_path=str(last))


def test_missing_checkpoint_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "nope.ckpt")


def test_process_that_leaves_the_training_loader_mid_epoch_exits(tmp_path):
    """Training workers ignore SIGTERM, which multiprocessing's exit handler relies on to stop them:
    without selfsup's own exit hook, a script that stops reading the loader mid-epoch hangs at exit."""
    script = ("from selfsup.data.datamodule import SSLDataModule\n"
              "data = SSLDataModule(batch_size=32, num_workers=2, image_size=16)\n"
              "data.setup('fit')\n"
              "batches = iter(data.train_dataloader())\n"
              "next(batches); next(batches)\n"
              "print('read two batches', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "read two batches" in done.stdout
