"""One SSH session to a host being bootstrapped, with its host key verified.

The host key must be known before anything is sent: from a known_hosts file
(`known_hosts`, else ~/.ssh/known_hosts) or from a fingerprint given on the
command line ("SHA256:..." as `ssh-keygen -lf` prints it). An unknown key is
refused with its fingerprint, for the admin to compare out of band; a key
that differs from the known one is refused as a possible impostor. Commands
are sent as argument lists, quoted with `shlex.join`; files go by SFTP with
explicit modes. Nothing secret is logged: commands and paths only.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from phaul.errors import InvalidInput, Refused, ToolFailed, Unreachable

log = logging.getLogger(__name__)
logging.getLogger("paramiko").setLevel(logging.WARNING)  # its debug output names key material

CONNECT_TIMEOUT = 20.0  # s


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in: USER@ADDRESS:PORT, a key file, and how the host key is checked."""

    user: str
    address: str
    port: int = 22
    identity: Path | None = None  # a private key file (else the SSH agent's and ~/.ssh's keys)
    known_hosts: Path | None = None  # else ~/.ssh/known_hosts
    fingerprint: str | None = None  # "SHA256:...": accept the host key with this fingerprint

    @classmethod
    def parse(cls, login: str, **kw: object) -> SshTarget:
        """USER@ADDRESS (an IPv6 address in brackets or bare) into a target."""
        user, at, address = login.rpartition("@")
        if not at or not user or not address:
            raise InvalidInput(f"--ssh {login!r} is not USER@ADDRESS", "write it as root@192.0.2.13 or root@host.example.org")
        target = cls(user, address.strip("[]"), **kw)  # type: ignore[arg-type]
        if not 0 < target.port < 65536:
            raise InvalidInput(f"SSH port {target.port} is out of range", "give --port from 1 to 65535 (default 22)")
        return target


@dataclass(frozen=True)
class Completed:
    """A finished remote command."""

    status: int
    stdout: str
    stderr: str


def fingerprint(key: paramiko.PKey) -> str:
    """The key's SHA256 fingerprint as OpenSSH prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _Verify(paramiko.MissingHostKeyPolicy):
    """Accept a host key missing from known_hosts only when it has the given fingerprint."""

    def __init__(self, expected: str | None) -> None:
        self.expected = expected

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        got = fingerprint(key)
        if self.expected is not None and got == self.expected:
            log.info("host key of %s matches the given fingerprint %s", hostname, got)
            return
        if self.expected is not None:
            raise Refused(
                f"the host key of {hostname} is {key.get_name()} {got}, not the fingerprint given ({self.expected})",
                "someone may be impersonating the host: check the fingerprint on its console "
                "(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) before going on",
            )
        raise Refused(
            f"the host key of {hostname} is unknown: {key.get_name()} {got}",
            "compare this fingerprint with the host's own (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on its "
            "console); if it matches, pass --fingerprint " + got + " or add the key to --known-hosts",
        )


class Session:
    """A logged-in SSH session; a context manager that closes it."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self.client = paramiko.SSHClient()
        if target.known_hosts is not None:
            if not target.known_hosts.is_file():
                raise InvalidInput(f"known_hosts file {target.known_hosts} does not exist",
                                   "give an existing file, or --fingerprint")
            self.client.load_host_keys(str(target.known_hosts))
        else:
            self.client.load_system_host_keys()
        self.client.set_missing_host_key_policy(_Verify(target.fingerprint))
        where = f"{target.user}@{target.address}:{target.port}"
        try:
            self.client.connect(
                target.address, port=target.port, username=target.user,
                key_filename=str(target.identity) if target.identity else None,
                look_for_keys=target.identity is None, allow_agent=target.identity is None,
                timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT,
            )
        except paramiko.BadHostKeyException as e:
            self.client.close()
            raise Refused(
                f"the host key of {target.address} is {fingerprint(e.key)}, but the known_hosts file says "
                f"{fingerprint(e.expected_key)}",
                "someone may be impersonating the host, or it was reinstalled: check on its console and fix the "
                "known_hosts entry before going on",
            ) from None
        except Refused:
            self.client.close()
            raise
        except paramiko.AuthenticationException as e:
            self.client.close()
            raise Refused(f"SSH login to {where} failed: {e}",
                          "give the key the host accepts for this user with --identity") from None
        except (OSError, socket.timeout, paramiko.SSHException) as e:
            self.client.close()
            raise Unreachable(f"cannot reach {where} over SSH: {e}",
                              "check the address, --port and that sshd runs there") from None
        log.info("logged in to %s", where)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def run(self, args: Sequence[str], *, timeout: float = 600.0, shell_tail: str = "") -> Completed:
        """Run the argument list `args` there (quoted for the remote shell; `shell_tail`, a
        fixed redirection of ours, is appended as is) and wait for it."""
        command = shlex.join(args) + (f" {shell_tail}" if shell_tail else "")
        log.info("%s: %s", self.target.address, command)
        try:
            _, out, err = self.client.exec_command(command, timeout=timeout)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
            status = out.channel.recv_exit_status()
        except (OSError, socket.timeout, paramiko.SSHException) as e:
            raise ToolFailed(f"`{command}` on {self.target.address} failed: {e}", "check the SSH connection and retry") from e
        return Completed(status, stdout, stderr)

    def check(self, args: Sequence[str], what: str, *, timeout: float = 600.0) -> str:
        """`run`, and raise ToolFailed naming `what` when it fails; return its stdout."""
        r = self.run(args, timeout=timeout)
        if r.status != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-10:])
            raise ToolFailed(f"{what} on {self.target.address} failed (exit {r.status}): {tail}",
                             f"run `{shlex.join(args)}` there to see why")
        return r.stdout

    def put(self, path: str, data: bytes, mode: int) -> None:
        """Write `data` to `path` there with `mode` (set before the data goes in), via a
        temporary name and a rename, so a reader never meets half a file."""
        tmp = f"{path}.phaul-new"
        with self.client.open_sftp() as sftp:
            with sftp.open(tmp, "wb") as f:
                f.chmod(mode)
                f.write(data)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, path)
        log.info("%s: wrote %s (mode %04o, %d bytes)", self.target.address, path, mode, len(data))

    def get(self, path: str, limit: int = 1 << 20) -> bytes:
        """The content of file `path` there (at most `limit` bytes: it is data from the host)."""
        with self.client.open_sftp() as sftp:
            if (sftp.stat(path).st_size or 0) > limit:
                raise ToolFailed(f"{path} on {self.target.address} is larger than {limit} bytes", "check the file there")
            with sftp.open(path, "rb") as f:
                return f.read(limit)

    def mkdir(self, path: str, mode: int) -> None:
        """Create directory `path` and its parents there with `mode`."""
        self.check(["mkdir", "-p", "-m", f"{mode:o}", path], f"creating {path}")
        self.check(["chmod", f"{mode:o}", path], f"setting the mode of {path}")
