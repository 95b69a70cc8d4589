"""The layer rules of DESIGN.md ("Layout") as import-linter contracts, run by the tests.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``); this test runs them and
also checks that the package's own import graph has no more circles than recorded, so a new
cycle fails here instead of hiding behind a function-body import.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Module-level import circles: none (the layout issue removed the last three);
# the count may only go down.
KNOWN_CYCLES = 0


def test_import_contracts_hold():
    r = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
         "lint_imports_command()", "--no-logo", "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.lower().replace("0 broken", ""), r.stdout


def _cycles() -> list[list[str]]:
    import grimp

    g = grimp.build_graph("fsharding")
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(g.modules):
        if m not in index:
            visit(m)
    return out


def test_import_cycles_do_not_grow():
    cycles = _cycles()
    assert len(cycles) <= KNOWN_CYCLES, f"new import cycle(s): {cycles}"
