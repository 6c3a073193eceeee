"""The package's shape: test seams are plugged in from outside, never imported
by production code."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "phaul"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, by absolute name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def test_production_code_never_imports_the_testing_package() -> None:
    production = [p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts and "rpc" not in p.parts]
    assert len(production) > 20
    offenders = {
        str(p.relative_to(REPO)): sorted(n for n in _imports(p) if n == "phaul.testing" or n.startswith("phaul.testing."))
        for p in production
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_checker_sees_an_import_of_the_testing_package(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from phaul.testing import lab\nimport phaul.testing.faults\n")
    assert {"phaul.testing.lab", "phaul.testing.faults"} <= _imports(probe)
