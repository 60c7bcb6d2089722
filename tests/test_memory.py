"""selfsup.memory: on glibc, memory freed by one step is reused by the next without page faults, and CPU
fits turn that on (unless ``model.keep_freed_memory: false``). Each check runs in a fresh process: the
setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    result = _run("""
        import json, resource, torch
        from selfsup.memory import keep_freed_memory

        def faults(cycles=8, mb=64):  # what a training step does with its activations
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(cycles):
                block = torch.ones(mb * 2**20 // 4)
                del block
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        default = faults()
        applied = keep_freed_memory()
        print(json.dumps({"default": default, "applied": applied, "kept": faults()}))
    """)
    pages = 64 * 2**20 // 4096
    assert result["applied"]
    assert result["default"] >= 8 * pages * 0.9, "glibc's default maps and unmaps each 64 MB block"
    assert result["kept"] <= 3 * pages, "with the setting, the block is faulted in once and then reused"


def test_cpu_fit_keeps_freed_memory_unless_turned_off(tmp_path):
    result = _run(f"""
        import json
        from pathlib import Path
        from selfsup.memory import freed_memory_kept
        from tests.helpers.methods import tiny_fit

        tiny_fit("simclr", Path({str(tmp_path)!r}) / "off", 1, model_overrides={{"keep_freed_memory": False}})
        off = freed_memory_kept()
        tiny_fit("simclr", Path({str(tmp_path)!r}) / "on", 1)
        print(json.dumps({{"off": off, "on": freed_memory_kept()}}))
    """)
    assert result == {"off": False, "on": True}
