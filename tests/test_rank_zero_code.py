"""No collective inside code that only rank 0 runs: a collective on a subset of ranks hangs or crashes
the others (``trainer.log_dir`` broadcasts, so it counts as one).

Checked statically over the package: the bodies of functions decorated with ``rank_zero_only`` and of
``if trainer.is_global_zero:`` / ``if rank() == 0:`` blocks must not touch a collective.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "selfsup"
COLLECTIVES = {"log_dir", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object", "all_reduce",
               "reduce", "gather", "scatter", "barrier", "gather_rows", "on_rank_zero", "all_reduce_sum",
               "broadcast_tensors", "gather_with_grad", "any_rank", "save_checkpoint", "gather_rng_states",
               "file_index", "ImageFolder"}  # a folder is listed on rank 0 and its index broadcast


def _rank_zero_bodies(tree: ast.AST) -> list[tuple[int, list[ast.stmt]]]:
    bodies = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = {getattr(d, "id", getattr(d, "attr", None)) for d in node.decorator_list}
            if "rank_zero_only" in names:
                bodies.append((node.lineno, node.body))
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "is_global_zero" in test or "rank() == 0" in test or "global_rank == 0" in test:
                bodies.append((node.lineno, node.body))
    return bodies


def _collectives_in(body: list[ast.stmt]) -> set[str]:
    found = set()
    for statement in body:
        for node in ast.walk(statement):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in COLLECTIVES:
                found.add(name)
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_collective_in_rank_zero_code(path):
    tree = ast.parse(path.read_text())
    problems = [f"line {line}: {sorted(found)}" for line, body in _rank_zero_bodies(tree)
                if (found := _collectives_in(body))]
    assert not problems, f"{path.name}: collectives inside rank-zero-only code: {problems}"


def test_the_check_finds_the_fault_it_looks_for():
    faulty = ast.parse("@rank_zero_only\ndef report(trainer):\n    out = trainer.log_dir\n"
                       "def write(trainer):\n    if trainer.is_global_zero:\n        dist.all_reduce(x)\n")
    assert [sorted(_collectives_in(body)) for _, body in _rank_zero_bodies(faulty)] == [["log_dir"], ["all_reduce"]]
