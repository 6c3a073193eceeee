"""The package as a new user gets it: a wheel built from a clean clone of the committed
tree, installed into a fresh venv, runs `phaul --version`, `phaul doctor` and an agent.

About 1-2 minutes (pip builds the wheel in an isolated environment and installs the
runtime dependencies from the index, or its cache). CRIU is kept off PATH: this test is
about the package (tests/test_doctor.py covers CRIU), and it must not run CRIU beside a
running lab. The agent needs no lab: mutual TLS on 127.0.0.1 with a throwaway PKI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jsonschema
import pytest
from agentlib import stop_agent
from conftest import REPO

from phaul import output

PATH_WITHOUT_CRIU = "/usr/bin:/bin:/usr/sbin:/sbin"  # criu lives in /usr/local/sbin (scripts/build-criu.sh)


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr, f"{cmd}:\n{proc.stderr}"
    return proc


def _ok(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    proc = _run(cmd, cwd, env, timeout)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _schema_valid(name: str, text: str) -> dict:
    doc = json.loads(text)
    jsonschema.validate(doc, json.loads(output.schema_path(name).read_text()))
    return doc  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh venv with the wheel built from HEAD installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    head = _ok(["git", "rev-parse", "HEAD"], REPO).strip()
    src = tmp / "src"
    _ok(["git", "clone", "--quiet", str(REPO), str(src)], tmp)
    _ok(["git", "checkout", "--quiet", "--detach", head], src)
    assert not (src / ".venv").exists() and not list((src / "workloads").glob("bin/*"))
    _ok([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp / "dist"), str(src)], tmp)
    [wheel] = (tmp / "dist").glob("phaul-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        modes = {i.filename: i.external_attr >> 16 for i in z.infolist()}
    for f in ("phaul/rpc/phaul_pb2.py", "phaul/rpc/phaul_pb2_grpc.py", "phaul/rpc/phaul_pb2.pyi", "phaul/data/tls-rsh",
              "phaul/data/gate", "phaul/data/seccomp.json", "phaul/schemas/report.json", "phaul/testing/wrk_check.lua"):
        assert f in names, f"{f} is not in {wheel.name}"
    assert modes["phaul/data/tls-rsh"] & 0o111 and modes["phaul/data/gate"] & 0o111
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as z:
        requires = [line for line in z.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert not any("grpcio-tools" in r or "pycriu" in r for r in runtime), runtime
    venv = tmp / "venv"
    _ok([sys.executable, "-m", "venv", str(venv)], tmp)
    _ok([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)], tmp)
    return venv / "bin"


def _env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHAUL_", "PYTHON"))}
    return env | {"PATH": f"{bin_dir}:{PATH_WITHOUT_CRIU}"}


def test_version_and_the_installed_package(installed: Path, tmp_path: Path) -> None:
    env = _env(installed)
    assert _ok([str(installed / "phaul"), "--version"], tmp_path, env).strip() == "phaul 0.1.0"
    where = _ok([str(installed / "python"), "-c", "import phaul.rpc.phaul_pb2 as m; print(m.__file__)"], tmp_path, env)
    assert where.startswith(str(installed.parent)) and "site-packages" in where  # not the checkout
    script = _ok([str(installed / "phaul"), "completion", "bash"], tmp_path, env)
    assert "migrate" in script


def test_doctor_reports_what_is_missing_without_a_traceback(installed: Path, tmp_path: Path) -> None:
    proc = _run([str(installed / "phaul"), "doctor", "--json"], tmp_path, _env(installed), timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    doc = _schema_valid("doctor", proc.stdout)
    by = {c["name"]: c for c in doc["checks"]}
    assert by["criu"]["status"] == "failure" and "make setup" in by["criu"]["fix"]  # off PATH here
    assert by["pycriu"]["status"] == "failure" and "pip install" in by["pycriu"]["fix"]  # not on PyPI
    programs = by["workload programs"]
    assert programs["status"] == "warning" and "/usr/local/lib/phaul/workloads" in programs["detail"]
    assert by["runc"]["status"] == "pass" and proc.returncode == 1 and doc["ok"] is False
    text = _run([str(installed / "phaul"), "doctor"], tmp_path, _env(installed), timeout=120)
    assert "pycriu" in text.stdout and "fix:" in text.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_agent_starts_and_answers_over_mutual_tls(installed: Path, tmp_path: Path) -> None:
    phaul, env = str(installed / "phaul"), _env(installed)
    pki = tmp_path / "pki"
    _ok([phaul, "pki", "init", "--dir", str(pki)], tmp_path, env)
    _ok([phaul, "pki", "issue", "h1", "--ip", "127.0.0.1", "--dir", str(pki)], tmp_path, env)
    _ok([phaul, "pki", "issue", "admin", "--dir", str(pki)], tmp_path, env)
    port = _free_port()
    cmd = [
        phaul, "agent", "--name", "h1", "--listen", f"127.0.0.1:{port}", "--socket", str(tmp_path / "agent.sock"),
        "--state-dir", str(tmp_path / "state"), "--cache-dir", str(tmp_path / "cache"), "--cert", str(pki / "h1.crt"),
        "--key", str(pki / "h1.key"), "--ca", str(pki / "ca.crt"), "--admins", "admin", "--resolve-interval", "0",
    ]
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text(errors="replace"):
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        hosts = tmp_path / "hosts.json"  # no socket: the CLI dials 127.0.0.1 over TLS
        hosts.write_text(json.dumps({"pki": {"ca": "pki/ca.crt", "cert": "pki/admin.crt", "key": "pki/admin.key"},
                                     "hosts": {"h1": {"address": f"127.0.0.1:{port}"}}}))
        shown = _ok([phaul, "--hosts-file", str(hosts), "migrations", "--json", "--host", "h1"], tmp_path, env, timeout=60)
        assert _schema_valid("migrations", shown)["migrations"] == []
        gone = _run([phaul, "--hosts-file", str(hosts), "--host", "nosuch", "migrations", "--json"], tmp_path, env)
        assert gone.returncode == 2 and json.loads(gone.stderr)["kind"] == "NotFound"
    finally:
        stop_agent(agent)
    text = log.read_text(errors="replace")
    assert agent.returncode == 0 and "Traceback" not in text and "agent h1 stopping" in text, text
    assert "no workload programs in /usr/local/lib/phaul/workloads" in text  # named, with the fix
    assert "pycriu is missing" in text and "pip install CRIU_SRC/lib" in text
