"""`phaul host add/remove`: bad input is refused (exit 2) with a message naming it, before any
connection; the full procedure runs in the lab (tests/test_host_bootstrap.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phaul.channels import pki


def phaul(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phaul", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    ca = tmp_path / "pki"
    pki.init_ca(ca)
    pki.issue(ca, "admin")
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({
        "pki": {"ca": str(ca / "ca.crt"), "cert": str(ca / "admin.crt"), "key": str(ca / "admin.key")},
        "hosts": {"alpha": {"address": "192.0.2.11:7473"}},
    }))
    return path


@pytest.mark.parametrize("args, message", [
    (["gamma", "--ssh", "nobody"], "is not USER@ADDRESS"),
    (["gamma", "--ssh", "root@192.0.2.13", "--port", "0"], "SSH port 0 is out of range"),
    (["alpha", "--ssh", "root@192.0.2.13"], "alpha is already in"),
    (["admin", "--ssh", "root@192.0.2.13"], "the CLI's certificate name"),
    (["../x", "--ssh", "root@192.0.2.13"], "host name"),
    (["gamma", "--ssh", "root@192.0.2.13", "--remote-phaul", "phaul"], "not an absolute path"),
    (["gamma", "--ssh", "root@192.0.2.13", "--known-hosts", "/nonexistent"], "does not exist"),
])
def test_host_add_refuses_bad_input(hosts_file: Path, args: list[str], message: str) -> None:
    r = phaul("--hosts-file", str(hosts_file), "host", "add", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "gamma" not in json.loads(hosts_file.read_text())["hosts"]


def test_host_remove_refuses_an_unknown_host(hosts_file: Path) -> None:
    r = phaul("--hosts-file", str(hosts_file), "host", "remove", "gamma")
    assert r.returncode == 2 and "gamma is not in" in r.stderr, r.stderr


def test_the_first_host_add_starts_a_hosts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a hosts file, `host add` starts /etc/phaul/hosts.json naming the CA and the CLI's
    certificate, or says to make them first."""
    from phaul import cli, hosts
    from phaul.errors import NotFound

    monkeypatch.setattr(hosts, "ETC_HOSTS_FILE", tmp_path / "etc" / "hosts.json")
    ca = tmp_path / "pki"
    with pytest.raises(NotFound, match="phaul pki init"):
        cli._new_hosts_file(ca)
    pki.init_ca(ca)
    pki.issue(ca, "admin")
    started = cli._new_hosts_file(ca)
    assert started.path == tmp_path / "etc" / "hosts.json" and started.hosts == {}
    assert (started.pki.ca, started.pki.cert, started.pki.key) == (ca / "ca.crt", ca / "admin.crt", ca / "admin.key")
