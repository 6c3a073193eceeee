"""`phaul host add` bootstraps a bare lab host (gamma) over SSH, and `host remove` takes it out.

In the lab: alpha and beta as usual, gamma bare (namespace, bridge, address; no certificate, no
agent, not in the hosts file) with a real sshd of its own. The CLI runs in the client namespace
(the admin's machine on the segment). gamma's "remote" /etc/phaul is a temporary directory (the
lab's hosts share this machine's file system); its agent is started from the written unit's
ExecStart line, since there is no systemd inside a network namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import COUNTER, REPO, TEST_LAB_DIR, TEST_SUBNET, Lab, wait_for
from sshlib import Sshd, sshd_in

from phaul.channels.client import connect
from phaul.channels.transport import Credentials
from phaul.errors import PhaulError
from phaul.rpc import phaul_pb2 as pb
from phaul.testing import lab as lab_mod

pytestmark = pytest.mark.lab

GAMMA = lab_mod.host_address(TEST_SUBNET, "gamma")


def client_phaul(lab: Lab, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real CLI on the admin's machine: the lab's client namespace, which reaches every host."""
    cmd = ["nsenter", f"--net=/run/netns/{lab_mod.NETNS['client']}", "--",
           sys.executable, "-m", "phaul", "--hosts-file", str(lab.hosts_file), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def bare_gamma(lab: Lab, tmp_path: Path) -> Iterator[tuple[Lab, Sshd, Path]]:
    """gamma bare, with sshd; afterwards gamma (its agent, sshd, files) is gone and alpha and
    beta have their peers back, whatever happened."""
    lab_mod.up(TEST_SUBNET, lab_dir=TEST_LAB_DIR, bare=("gamma",))
    try:
        with sshd_in(lab_mod.NETNS["gamma"], GAMMA, tmp_path) as sshd:
            yield lab, sshd, tmp_path / "gamma-etc"
    finally:
        lab_mod.up(TEST_SUBNET, lab_dir=TEST_LAB_DIR)  # removes gamma: every process in its namespace, its files
        for host in lab_mod.HOSTS:  # the peers host add/remove pushed: back to the lab's own (SIGHUP reloads)
            (lab.state_dir(host) / "peers.json").unlink(missing_ok=True)
            os.kill(int((lab.state_dir(host) / "agent.pid").read_text()), signal.SIGHUP)
        restored = [h for h in lab_mod.HOSTS if (lab.state_dir(h) / "agent.pid").exists()]
        assert restored == list(lab_mod.HOSTS)


def host_add(lab: Lab, sshd: Sshd, etc: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    state = lab.state_dir("gamma")
    return client_phaul(
        lab, "host", "add", "gamma", "--ssh", f"root@{GAMMA}", "--port", str(sshd.port), "--identity", str(sshd.identity),
        "--remote-phaul", f"{sys.executable} -m phaul", "--remote-etc", str(etc), "--remote-state-dir", str(state),
        "--remote-unit-dir", str(etc / "systemd"), "--remote-socket", str(state / "agent.sock"),
        *extra, check=check,
    )


def info_as(creds: Credentials, host: str, lab: Lab) -> str:
    """Call Info on `host`'s agent (its socket) with `creds`; its name, or the refusal."""
    try:
        with connect(f"unix:{lab.state_dir(host) / 'agent.sock'}", host, creds) as agent:
            return str(agent.call("Info", pb.Empty(), timeout=10).name)
    except PhaulError as e:
        return f"refused: {e.message}"
    except grpc.RpcError as e:
        return f"refused: {e.details()}"


def test_host_add_migrate_remove(bare_gamma: tuple[Lab, Sshd, Path]) -> None:
    lab, sshd, etc = bare_gamma
    assert "gamma" not in json.loads(lab.hosts_file.read_text())["hosts"]
    assert not (lab.dir / "pki" / "gamma.crt").exists()

    t0 = time.monotonic()
    out = host_add(lab, sshd, etc, "--known-hosts", str(sshd.known_hosts)).stdout
    seconds = time.monotonic() - t0
    print(f"host add took {seconds:.1f} s\n{out}")
    assert "host key verified" in out and "no systemd as PID 1 there" in out, out
    assert "PRIVATE KEY" not in out

    pki = etc / "pki"
    assert (pki / "gamma.key").stat().st_mode & 0o777 == 0o600  # made there, never copied
    assert (pki / "gamma.crt").stat().st_mode & 0o777 == 0o644
    assert pki.stat().st_mode & 0o777 == 0o700
    assert not (lab.dir / "pki" / "gamma.key").exists()  # the CA's side never had the key
    unit = (etc / "systemd" / "phaul-agent.service").read_text()
    assert f"ExecStart={sys.executable} -m phaul agent --config {etc / 'agent.toml'}" in unit
    verify = subprocess.run(["systemd-analyze", "verify", str(etc / "systemd" / "phaul-agent.service")],
                            capture_output=True, text=True)
    assert (verify.returncode, verify.stderr.strip()) == (0, ""), verify.stderr  # the unit written there, offline
    toml = (etc / "agent.toml").read_text()
    assert 'name = "gamma"' in toml and f'listen = "{GAMMA}:7473"' in toml and 'peers = ["alpha", "beta"]' in toml

    hosts = json.loads(lab.hosts_file.read_text())["hosts"]
    assert hosts["gamma"]["address"] == f"{GAMMA}:7473"
    pids = {h: int((lab.state_dir(h) / "agent.pid").read_text()) for h in lab_mod.HOSTS}
    for host in lab_mod.HOSTS:  # told, live: no restart
        assert "gamma" in json.loads((lab.state_dir(host) / "peers.json").read_text())["peers"]
    # what was pushed is kept by a reload from the configuration (SIGHUP: `systemctl reload`)
    os.kill(pids["alpha"], signal.SIGHUP)
    wait_for(lambda: "reloaded: peers beta, gamma" in (lab.state_dir("alpha") / "agent.log").read_text(),
             what="alpha to reload")

    # a container moves alpha -> gamma, on the certificates only this procedure made
    lab.phaul("--host", "alpha", "ct", "create", "boot1")
    lab.phaul("--host", "alpha", "ct", "start", "boot1", "--", *COUNTER)
    wait_for(lambda: lab.counter("alpha", "boot1") > 3, what="boot1's counter")
    before = lab.counter("alpha", "boot1")
    report = json.loads(client_phaul(lab, "--host", "alpha", "migrate", "boot1", "gamma", "--json").stdout)
    assert report["result"] == "ok" and report["destination"] == "gamma", report

    def gamma_counter() -> int:
        return int(client_phaul(lab, "--host", "gamma", "ct", "exec", "boot1", "--", "cat", "/counter").stdout)

    after = gamma_counter()
    assert after >= before
    wait_for(lambda: gamma_counter() > after, what="the counter to go on on gamma")
    client_phaul(lab, "--host", "gamma", "ct", "destroy", "boot1")

    gamma_creds = Credentials("gamma", pki / "gamma.crt", pki / "gamma.key", pki / "ca.crt")
    assert info_as(gamma_creds, "alpha", lab) == "alpha"  # a peer now
    out = client_phaul(lab, "host", "remove", "gamma").stdout
    assert "revoked" in out, out
    refused = info_as(gamma_creds, "alpha", lab)
    assert refused.startswith("refused") and "revoked" in refused, refused
    assert "gamma" not in json.loads(lab.hosts_file.read_text())["hosts"]
    for host in lab_mod.HOSTS:
        assert json.loads((lab.state_dir(host) / "peers.json").read_text())["peers"] == [h for h in lab_mod.HOSTS if h != host]
    assert pids == {h: int((lab.state_dir(h) / "agent.pid").read_text()) for h in lab_mod.HOSTS}  # never restarted


def test_unknown_host_key_is_refused_with_its_fingerprint(bare_gamma: tuple[Lab, Sshd, Path]) -> None:
    lab, sshd, etc = bare_gamma
    empty = etc.parent / "empty_known_hosts"
    empty.write_text("")
    r = host_add(lab, sshd, etc, "--known-hosts", str(empty), check=False)
    assert r.returncode == 2, r.stderr
    assert "unknown" in r.stderr and sshd.fingerprint() in r.stderr, r.stderr
    assert not etc.exists() and "gamma" not in json.loads(lab.hosts_file.read_text())["hosts"]
    # the fingerprint, compared and given, is accepted: the next step runs (and fails here on purpose:
    # no phaul at that path there, so nothing is changed)
    assert f"--fingerprint {sshd.fingerprint()}" in r.stderr
    r = host_add(lab, sshd, etc, "--fingerprint", sshd.fingerprint(), "--remote-phaul", "/nonexistent/phaul", check=False)
    assert r.returncode == 2 and "host key verified" in r.stdout and "gave no report" in r.stderr, r.stdout + r.stderr
    assert not etc.exists()


def test_wrong_host_key_is_refused(bare_gamma: tuple[Lab, Sshd, Path]) -> None:
    lab, sshd, etc = bare_gamma
    other = etc.parent / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = etc.parent / "wrong_known_hosts"
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    wrong.write_text(f"{GAMMA} {kind} {key}\n")
    r = host_add(lab, sshd, etc, "--known-hosts", str(wrong), check=False)
    assert r.returncode == 2 and "impersonating" in r.stderr, r.stderr
    bad_fp = host_add(lab, sshd, etc, "--fingerprint", "SHA256:" + "A" * 43, check=False)
    assert bad_fp.returncode == 2 and sshd.fingerprint() in bad_fp.stderr and "not the fingerprint given" in bad_fp.stderr
    assert not etc.exists() and "gamma" not in json.loads(lab.hosts_file.read_text())["hosts"]
