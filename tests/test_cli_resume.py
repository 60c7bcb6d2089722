"""Resuming `selfsup fit` runs with ``--ckpt_path last``: one ``last.ckpt`` that always holds the newest
weights, however often the run is interrupted; SLURM's ``hpc_ckpt_N.ckpt`` files; incomplete files."""

from __future__ import annotations

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
