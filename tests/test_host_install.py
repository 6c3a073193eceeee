"""`phaul host add --install`: a host without phaul gets this checkout and its own setup over
SSH, then its agent, from the venv that setup built.

The setup needs the outside network (PyPI, Debian), which the lab's namespaces do not have, so
this test's "host" is this machine itself: a real sshd on 127.0.0.1 (in the test's own network
namespace, named for it), the remote paths (install directory, /etc/phaul, state, unit) in a
temporary directory, the agent on 127.0.0.1 started from the unit's command line (no systemd
runs here). Everything it started is stopped and removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO
from sshlib import sshd_in

from phaul.channels import pki

NETNS = "phaul-install-test"  # a name for this test's own network namespace (sshd runs in it)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _named_netns() -> Iterator[str]:
    """Our own network namespace, named (sshd is started in a named one); only the name is removed."""
    subprocess.run(["ip", "netns", "attach", NETNS, str(os.getpid())], check=True)
    try:
        yield NETNS
    finally:
        subprocess.run(["ip", "netns", "delete", NETNS], check=False)


def _agents_of(config: Path) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if str(config) in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
    return pids


def test_host_add_installs_phaul_there_and_runs_its_agent(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    pki.issue(ca, "admin")
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"pki": {"ca": str(ca / "ca.crt"), "cert": str(ca / "admin.crt"),
                                         "key": str(ca / "admin.key")}, "hosts": {}}))
    remote, install = tmp_path / "remote", tmp_path / "opt"
    config = remote / "etc" / "agent.toml"
    agent_port = _free_port()
    try:
        with _named_netns() as ns, sshd_in(ns, "127.0.0.1", tmp_path, port=_free_port()) as sshd:
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "phaul", "--hosts-file", str(hosts), "host", "add", "delta",
                 "--ssh", "root@127.0.0.1", "--port", str(sshd.port), "--identity", str(sshd.identity),
                 "--known-hosts", str(sshd.known_hosts), "--install", "--remote-install-dir", str(install),
                 "--listen", f"127.0.0.1:{agent_port}", "--remote-etc", str(remote / "etc"),
                 "--remote-state-dir", str(remote / "state"), "--remote-unit-dir", str(remote / "systemd"),
                 "--remote-socket", str(remote / "state" / "agent.sock"), "--start", "command", "--ca-dir", str(ca)],
                capture_output=True, text=True, timeout=1800, cwd=REPO,
            )
            print(f"\nhost add --install took {time.monotonic() - started:.0f} s\n{proc.stdout}{proc.stderr}")
            assert proc.returncode == 0, proc.stdout + proc.stderr
        phaul = install / "src" / ".venv" / "bin" / "phaul"
        assert phaul.is_file() and (install / "src" / "scripts" / "setup.sh").is_file()
        [pid] = _agents_of(config)
        assert str(phaul) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")  # the installed phaul
        assert json.loads(hosts.read_text())["hosts"]["delta"]["address"] == f"127.0.0.1:{agent_port}"
        listed = subprocess.run([sys.executable, "-m", "phaul", "--hosts-file", str(hosts), "--host", "delta",
                                 "ct", "list", "--json"], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert listed.returncode == 0 and json.loads(listed.stdout)["containers"] == [], listed.stderr
    finally:
        for pid in _agents_of(config):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _agents_of(config) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in _agents_of(config):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(install, ignore_errors=True)
    assert not _agents_of(config)
