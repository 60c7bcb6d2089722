"""Test-wide settings: CPU only, no network, wandb offline and selfsup's caches in temp dirs, small thread count."""

from __future__ import annotations

import os
import tempfile

_tmp = tempfile.mkdtemp(prefix="selfsup-tests-")
for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    os.environ.setdefault(key, os.path.join(_tmp, key.lower()))
os.environ["WANDB_MODE"] = "offline"
os.environ["SELFSUP_CACHE_DIR"] = os.path.join(_tmp, "selfsup-cache")  # never the user's ~/.cache/selfsup
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
