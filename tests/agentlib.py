"""A real agent for tests outside the lab: its own PKI and state directory,
mutual TLS on 127.0.0.1 and a unix socket, peers and admins configured, and
a canary directory outside its state directory that nothing may touch."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phaul.channels import pki
from phaul.channels.client import connect
from phaul.channels.transport import Credentials
from phaul.migration.copies import procs_using

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RunningAgent:
    name: str
    dir: Path
    state: Path
    canary: Path
    cwd: Path
    proc: subprocess.Popen[bytes]
    sock: Path
    port: int
    creds: dict[str, Credentials]
    pki: Path
    host: str = "127.0.0.1"  # what it listens on: an address (IPv6 in brackets) or a host name

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stub(self, who: str, *, tcp: bool = False) -> Any:
        return connect(self.address if tcp else f"unix:{self.sock}", self.name, self.creds[who])

    def snapshot(self) -> list[tuple[str, int, int]]:
        out = []
        for p in sorted(self.canary.rglob("*")):
            st_ = p.lstat()
            out.append((str(p), st_.st_size, st_.st_mtime_ns))
        return out

    def log(self) -> str:
        return (self.dir / "agent.log").read_text(errors="replace")


def make_pki(d: Path, names: list[str]) -> dict[str, Credentials]:
    """A CA in d/pki and a certificate per name; the first (the agent) also for 127.0.0.1
    (an address names one host)."""
    ca = d / "pki"
    pki.init_ca(ca, "test CA")
    creds = {}
    for name in names:
        cert, key = pki.issue(ca, name, ips=["127.0.0.1"] if name == names[0] else None)
        creds[name] = Credentials(name, cert, key, ca / "ca.crt")
    return creds


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    """Stop an agent as its service manager would (SIGTERM), killing it after 15 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def running_agent(
    d: Path, name: str, creds: dict[str, Credentials], peers: list[str], admins: list[str], *extra: str,
    config: Path | None = None, env: dict[str, str] | None = None, host: str = "127.0.0.1", state: Path | None = None,
) -> Iterator[RunningAgent]:
    """`phaul agent` as in production (no step hook), stopped and cleaned up afterwards.
    With `config`, the agent reads its name, certificates, peers and admins from that file
    (`peers` and `admins` are then unused) and gets only the test's addresses and directories
    as flags. `env` is added to its environment. `host`: the --listen host (an IPv6 address
    in brackets, or a host name). `state`: its state directory, `d`/state unless given."""
    state, canary, cwd = state or d / "state", d / "canary", d / "cwd"
    for p in (state, canary / "sub", cwd):
        p.mkdir(parents=True, exist_ok=True)
    (canary / "sub" / "keep.txt").write_text("precious")
    port = free_port(host.strip("[]") if host.startswith("[") else "127.0.0.1")
    sock = d / "agent.sock"
    me = creds[name]
    where = ["--listen", f"{host}:{port}", "--socket", str(sock), "--state-dir", str(state), "--resolve-interval", "0"]
    who = ["--config", str(config)] if config is not None else [
        "--name", name, "--cert", str(me.cert), "--key", str(me.key), "--ca", str(me.ca),
        "--peers", ",".join(peers), "--admins", ",".join(admins),
    ]
    cmd = [sys.executable, "-m", "phaul", "agent", *who, *where, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    log = open(d / "agent.log", "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 20
    try:
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (d / "agent.log").read_text()
            time.sleep(0.05)
        yield RunningAgent(name, d, state, canary, cwd, proc, sock, port, creds, me.ca.parent, host)
    finally:
        stop_agent(proc)
        log.close()
        remove_containers(state, name)


def remove_containers(state: Path, host: str) -> None:
    """Whatever a test created and started: runc state, cgroups, data channels."""
    root = state / "runc"
    if root.is_dir():
        ids = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True).stdout.split()
        for ct in ids:
            subprocess.run(["runc", "--root", str(root), "delete", "--force", ct], capture_output=True)
    remove_host_cgroups(host)
    for pid in procs_using(state):  # data channels, if the agent left any
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_host_cgroups(host: str, kill: bool = False, timeout: float = 10) -> None:
    """A test host's cgroups (phaul-HOST in every hierarchy) once its containers are gone; `kill`:
    end what is still in them first. A killed container's tasks leave a moment later (EBUSY until
    then); the host's own cgroup may be the lab's, in use, and is then left."""
    deadline = time.monotonic() + timeout
    while True:
        busy = False
        for top in Path("/sys/fs/cgroup").glob(f"*/phaul-{host}"):
            for d in [*sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), top]:
                if kill:
                    with contextlib.suppress(OSError, ValueError):
                        for pid in (d / "cgroup.procs").read_text().split():
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(int(pid), signal.SIGKILL)
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    busy = busy or d != top
        if not busy or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def tree_hash(root: Path) -> str:
    """A hash of every name, type, mode, owner, size and content (symlink targets) under `root`."""
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:  # removed while we walk (a daemon cleaning up): not a lasting change
                continue
            h.update(f"{p}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            elif os.path.isfile(p) and st.st_size < (1 << 20):
                try:
                    with open(p, "rb") as f:
                        h.update(f.read())
                except OSError:
                    pass
    return h.hexdigest()
