"""A real sshd (Debian's openssh-server) in a lab host's network namespace, for tests.

`sshd_in(netns, address, workdir)` makes a host key, a client key pair and a config of
its own under `workdir` (port 22 on `address`, root login by key only, SFTP), runs
`sshd -D` in the foreground under the test's control, and always stops it and removes
its files, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd refuses to start without it


@dataclass(frozen=True)
class Sshd:
    address: str
    port: int
    identity: Path  # the client's private key (root may log in with it)
    host_key_pub: Path
    known_hosts: Path  # a known_hosts file with the host key
    log: Path

    def fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(self.host_key_pub)],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)


@contextlib.contextmanager
def sshd_in(netns: str, address: str, workdir: Path, port: int = 22) -> Iterator[Sshd]:
    if not SSHD.exists():
        raise AssertionError(f"{SSHD} is missing: install openssh-server (`make setup`)")
    d = workdir / "sshd"
    d.mkdir(parents=True)
    made_privsep = not PRIVSEP_DIR.exists()
    proc: subprocess.Popen[bytes] | None = None
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        _keygen(d / "ssh_host_ed25519_key", "phaul-test-host")
        _keygen(d / "id_ed25519", "phaul-test-client")
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        kind, key = (d / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        (d / "known_hosts").write_text(f"{address if port == 22 else f'[{address}]:{port}'} {kind} {key}\n")
        (d / "sshd_config").write_text(
            f"Port {port}\nListenAddress {address}\nHostKey {d / 'ssh_host_ed25519_key'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PrintMotd no\nSubsystem sftp internal-sftp\n"
        )
        log = d / "sshd.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{netns}", "--", str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while b"Server listening" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sshd did not start in {netns}:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield Sshd(address, port, d / "id_ed25519", d / "ssh_host_ed25519_key.pub", d / "known_hosts", log)
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # sshd and its session children
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        shutil.rmtree(d, ignore_errors=True)
        if made_privsep:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()
