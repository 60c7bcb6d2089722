"""Which checkpoint ``--ckpt_path last`` resumes from (selfsup.run.resume): the newest complete one among
``<checkpoint dir>/last*.ckpt`` and ``<root>/hpc_ckpt_*.ckpt``."""

from __future__ import annotations

import os

import pytest
import torch

from selfsup.checkpoint import is_complete_checkpoint
from selfsup.run.resume import find_resume_checkpoint, resume_candidates


def _save(path, step: int, mtime_s: int) -> str:
    """A small real torch checkpoint with modification time ``mtime_s``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.arange(4096.0) * step}}, path)
    os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return str(path)


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 2 // 3])


@pytest.fixture
def run(tmp_path):
    return tmp_path, tmp_path / "checkpoints"


def test_a_newer_hpc_checkpoint_is_picked(run):
    root, checkpoints = run
    _save(checkpoints / "last.ckpt", 10, mtime_s=1_000)
    hpc = _save(root / "hpc_ckpt_1.ckpt", 20, mtime_s=2_000)
    assert find_resume_checkpoint(checkpoints, root) == hpc


def test_an_older_hpc_checkpoint_is_not_picked(run):
    root, checkpoints = run
    _save(root / "hpc_ckpt_1.ckpt", 10, mtime_s=1_000)
    last = _save(checkpoints / "last.ckpt", 20, mtime_s=2_000)
    assert find_resume_checkpoint(checkpoints, root) == last


def test_a_truncated_newer_checkpoint_is_refused_with_a_warning(run):
    root, checkpoints = run
    last = _save(checkpoints / "last.ckpt", 10, mtime_s=1_000)
    hpc = _save(root / "hpc_ckpt_2.ckpt", 20, mtime_s=2_000)
    _truncate(hpc)
    assert not is_complete_checkpoint(hpc) and is_complete_checkpoint(last)
    with pytest.warns(UserWarning, match=r"hpc_ckpt_2\.ckpt.*incomplete"):
        assert find_resume_checkpoint(checkpoints, root) == last
    assert torch.load(last, weights_only=True)["global_step"] == 10


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"garbage" * 100])
def test_empty_or_garbage_files_are_incomplete(tmp_path, content):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    assert not is_complete_checkpoint(path)


def test_nothing_found_starts_afresh(tmp_path):
    with pytest.warns(UserWarning, match="starting from scratch"):
        assert find_resume_checkpoint(tmp_path / "checkpoints", tmp_path) is None
    _truncate(_save(tmp_path / "checkpoints" / "last.ckpt", 1, mtime_s=1_000))
    with pytest.warns(UserWarning, match="starting from scratch"):
        assert find_resume_checkpoint(tmp_path / "checkpoints", tmp_path) is None


def test_ties_and_other_files_are_resolved_deterministically(run):
    """Every DDP rank resolves on its own: equal times are broken by name, the same way every time;
    top-k checkpoints, temporary files and hpc files outside the root are not candidates."""
    root, checkpoints = run
    _save(checkpoints / "last.ckpt", 1, mtime_s=1_000)
    _save(checkpoints / "last-v1.ckpt", 2, mtime_s=1_000)
    _save(checkpoints / "epoch=3-step=9.ckpt", 9, mtime_s=5_000)
    _save(checkpoints / ".last.ckpt.abc.tmp", 9, mtime_s=5_000)
    _save(checkpoints / "hpc_ckpt_3.ckpt", 9, mtime_s=5_000)
    names = [p.name for p in resume_candidates(checkpoints, root)]
    assert names == ["last.ckpt", "last-v1.ckpt"]  # "last.ckpt" > "last-v1.ckpt" as strings
    assert all(find_resume_checkpoint(checkpoints, root) == str(checkpoints / "last.ckpt") for _ in range(3))


def test_a_sharded_checkpoint_directory_is_complete_once_its_metadata_is_written(tmp_path):
    shard_dir = tmp_path / "last.ckpt"
    shard_dir.mkdir()
    (shard_dir / "__0_0.distcp").write_bytes(b"x")
    assert not is_complete_checkpoint(shard_dir)
    (shard_dir / ".metadata").write_bytes(b"x")
    assert is_complete_checkpoint(shard_dir)
