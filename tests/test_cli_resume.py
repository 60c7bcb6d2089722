"""Resuming `selfsup fit` runs with ``--ckpt_path last``: one ``last.ckpt`` that always holds the newest
weights, however often the run is interrupted; SLURM's ``hpc_ckpt_N.ckpt`` files; incomplete files."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.helpers.cli import fit, logged_steps, sigterm_at

RUN = ["--trainer.max_steps", "-1", "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "3"]  # 6 steps


def _step(path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_two_preemptions_keep_one_last_checkpoint_with_the_newest_weights(tmp_path):
    """SIGTERM at step 1 (before any periodic save) and at step 3 (mid-epoch), each resumed with
    ``--ckpt_path last``: the final ``last.ckpt`` equals the uninterrupted run's, and no ``last-vN`` appears."""
    fit(tmp_path / "straight", *RUN)
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        fit(run, *RUN, *sigterm_at(1))
    assert _step(last) == 1
    with pytest.raises(SystemExit):
        fit(run, *RUN, *sigterm_at(3), "--ckpt_path", "last")
    assert _step(last) == 3
    fit(run, *RUN, "--ckpt_path", "last")

    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
    logs = run / "lightning_logs"
    assert min(logged_steps(logs / "version_1" / "metrics.csv")) >= 1, "the first resume started afresh"
    assert min(logged_steps(logs / "version_2" / "metrics.csv")) >= 3, "the second resume started afresh"
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_ckpt_path_last_resumes_from_a_newer_hpc_checkpoint(tmp_path):
    """A SLURM requeue save (``<root>/hpc_ckpt_N.ckpt``) newer than ``last.ckpt`` is the one resumed;
    the run then writes its newest weights to ``last.ckpt``."""
    every_step = ["--checkpoint.every_n_train_steps", "1", "--checkpoint.every_n_epochs", "0",
                  "--checkpoint.save_top_k", "-1"]
    fit(tmp_path, *every_step)  # 2 steps: epoch=0-step=1.ckpt, epoch=0-step=2.ckpt
    checkpoints = tmp_path / "checkpoints"
    shutil.copy(checkpoints / "epoch=0-step=2.ckpt", tmp_path / "hpc_ckpt_1.ckpt")  # the requeue save ...
    shutil.copy(checkpoints / "epoch=0-step=1.ckpt", checkpoints / "last.ckpt")  # ... after last.ckpt
    os.utime(checkpoints / "last.ckpt", ns=(10**18, 10**18))
    os.utime(tmp_path / "hpc_ckpt_1.ckpt", ns=(10**18 + 10**9, 10**18 + 10**9))
    fit(tmp_path, *every_step, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert logged_steps(tmp_path / "lightning_logs" / "version_1" / "metrics.csv")[0] == 2
    assert _step(checkpoints / "last.ckpt") == 3
