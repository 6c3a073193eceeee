"""The package as it is installed: the committed protocol code matches
proto/phaul.proto, and every file the package reads at run time is package
data (the wheel test from a clean clone is tests/test_wheel.py)."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gen_proto  # noqa: E402


def test_committed_protocol_code_is_what_the_proto_compiles_to(tmp_path: Path) -> None:
    """Fails when proto/phaul.proto changed without `make proto`, or the pinned grpcio-tools moved."""
    for fresh in gen_proto.generate(tmp_path):
        committed = REPO / "phaul" / "rpc" / fresh.name
        assert committed.is_file(), f"{committed} is missing: run `make proto` and commit it"
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} differs from proto/phaul.proto: run `make proto`"


def test_grpcio_tools_is_pinned_for_tests_and_not_a_runtime_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert "grpcio-tools" not in runtime and {"grpcio", "protobuf"} <= set(runtime)
    from importlib.metadata import version

    pinned = [d for d in project["optional-dependencies"]["test"] if d.startswith("grpcio-tools==")]
    assert pinned == [f"grpcio-tools=={version('grpcio-tools')}"], "the venv's grpcio-tools is not the pinned one: make setup"


def test_the_generated_code_imports_with_the_runtime_here() -> None:
    assert importlib.util.find_spec("phaul.rpc.phaul_pb2") is not None
    from phaul.rpc import phaul_pb2, phaul_pb2_grpc

    assert phaul_pb2.Report(migration_id="x").migration_id == "x" and hasattr(phaul_pb2_grpc, "AgentStub")


def test_every_data_file_the_package_reads_is_package_data() -> None:
    """Files under phaul/ that are not Python must be matched by [tool.setuptools.package-data]."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["phaul"]
    package = REPO / "phaul"
    data = [p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "no data files found"
    unmatched = [str(p.relative_to(package)) for p in data if not any(p.relative_to(package).match(g) for g in globs)]
    assert unmatched == []
