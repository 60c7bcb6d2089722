"""benchmarks/gpu_check.py: its CPU smoke runs every code path of the GPU check, and without CUDA it skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, out: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_cuda_the_check_prints_one_line_and_exits_0():
    result = _run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [result.stdout.strip()]
    assert result.stdout.startswith("gpu_check: skipped: no CUDA device")


@pytest.mark.slow
def test_cpu_smoke_runs_every_row_and_writes_the_table_and_rows(tmp_path):
    results = ROOT / "benchmarks" / "results.jsonl"
    before = results.read_bytes() if results.exists() else b""
    result = _run("--cpu-smoke", out=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert all(row["status"].startswith("ok") for row in rows), [row["status"] for row in rows]
    kinds = {(row["method"], row["precision"], row["compile"], row["input"], row["strategy"]) for row in rows}
    for method in ("simclr", "swav", "mae", "simmim"):
        for precision in ("32-true", "bf16-mixed"):
            assert (method, precision, False, "synthetic", "single") in kinds
        assert (method, "32-true", False, "loader", "single") in kinds
        compiled = next(r for r in rows if r["method"] == method and r["compile"])
        assert compiled["keys_equal"] and compiled["graphs"] >= 1  # compiled for real, same checkpoint keys
    fsdp = next(row for row in rows if row["strategy"] == "fsdp")
    assert 0 <= fsdp["knn_top1"] <= 1 and (tmp_path / "reconstruction.png").stat().st_size > 0
    for row in rows:
        assert row["images_per_s_per_gpu"] > 0 and row["mfu"] > 0 and 0 <= row["data_wait"] < 1
        assert row["flops_per_step"] > 0 and row["loss_first"] == row["loss_first"]  # counted, finite
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "images/s/GPU" in table
    assert (results.read_bytes() if results.exists() else b"") == before  # the smoke records nothing


def test_step_timer_fails_a_run_with_a_non_finite_loss(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_check_parts import CheckFailed, StepTimer

    timer = StepTimer(warmup=1, steps=2)
    timer.marks = {"start": (0.0, 0.0), 1: (1.0, 0.0), 2: (2.0, 0.5)}
    timer.ended, timer.losses = 2, [torch.tensor(1.0), torch.tensor(float("nan"))]
    with pytest.raises(CheckFailed, match="non-finite losses"):
        timer.results()
    timer.losses[1] = torch.tensor(0.5)
    assert timer.results() == {"window_s": 1.0, "wait_s": 0.5, "warmup_s": 1.0, "loss_first": 1.0, "loss_last": 0.5}
