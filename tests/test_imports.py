"""The package's structure: imports run one way, no cycles, nothing changed at import.

Imports run data -> methods and data -> eval -> export: ``methods`` and ``eval`` know nothing of each other
(evaluation reads an encoder, whichever method trained it), ``export`` nothing of methods, ``data`` nothing of
the training machinery; ``models``, ``optim``, ``checkpoint``, ``distributed`` and ``run`` sit underneath
everything and import only each other; ``cli`` and the package's ``__init__`` sit on top. Every import
counts, also one inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "selfsup"
UNDERNEATH = {"models", "optim", "checkpoint", "distributed", "run"}
MAY_IMPORT = {"data": {"data"}, "methods": {"data", "methods"}, "eval": {"data", "eval"},
              "export": {"data", "eval", "export"}, "cli": {"data", "methods", "eval", "export", "cli"}}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("selfsup")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfsup"):
            found.add(node.module)
    return found


GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _part(module: str) -> str:
    """``selfsup.eval.knn`` -> ``eval``; the package's own ``__init__`` is the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cli"


def _allowed(source: str, target: str) -> bool:
    a, b = _part(source), _part(target)
    if a == "data":  # no training machinery under the data: rank helpers only
        return b in ("data", "distributed")
    if b in UNDERNEATH:
        return a not in UNDERNEATH or b in UNDERNEATH
    if a in UNDERNEATH:
        return False
    return b in MAY_IMPORT[a]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_one_way(module):
    wrong = sorted(t for t in GRAPH[module] if not _allowed(module, t))
    assert not wrong, f"{module} imports {wrong}: {_part(module)} may import {sorted(MAY_IMPORT.get(_part(module), UNDERNEATH))} and {sorted(UNDERNEATH)}"


def test_no_import_cycle():
    edges = defaultdict(set)
    for module, targets in GRAPH.items():
        for target in targets:
            while target not in GRAPH and "." in target:  # `from selfsup.x import name`: the module itself
                target = target.rsplit(".", 1)[0]
            if target != module and target != "selfsup":
                edges[module].add(target)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_layering_check_would_catch_a_wrong_import():
    assert not _allowed("selfsup.methods.base", "selfsup.eval.features")
    assert not _allowed("selfsup.eval.finetune", "selfsup.methods.base")
    assert not _allowed("selfsup.data.datamodule", "selfsup.run.guard")
    assert not _allowed("selfsup.run.init_from", "selfsup.export")
    assert not _allowed("selfsup.eval.command", "selfsup.export") and not _allowed("selfsup.export", "selfsup.methods")
    assert _allowed("selfsup.eval.callbacks", "selfsup.data.datamodule") and _allowed("selfsup.cli", "selfsup.run")


def test_importing_selfsup_changes_no_global_state():
    """Warnings filters, PIL's settings and exit handlers are the user's: importing changes none."""
    code = """
import atexit, warnings
from PIL import ImageFile
import torch, lightning, timm  # their own import-time settings are not ours
before = (list(warnings.filters), ImageFile.LOAD_TRUNCATED_IMAGES, atexit._ncallbacks())
import selfsup, selfsup.cli, selfsup.eval.callbacks, selfsup.eval.command, selfsup.eval.reconstruction
import selfsup.export, selfsup.run
after = (list(warnings.filters), ImageFile.LOAD_TRUNCATED_IMAGES, atexit._ncallbacks())
assert before == after, (before, after)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
