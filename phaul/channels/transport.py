"""Per-migration data channels: mutual-TLS endpoints that live only as long
as the migration that opened them.

The destination opens a `TlsEndpoint` that accepts TLS connections from the
source host's certificate only and hands each one to a local command (for
example `rsync --server --daemon`); the source reaches it through `TLS_RSH`,
a remote shell for rsync that speaks TLS with its own certificate.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import InvalidInput, ToolFailed
from phaul.validate import check_id

log = logging.getLogger(__name__)

TLS_RSH = Path(__file__).resolve().parents[1] / "data" / "tls-rsh"
TCP_USER_TIMEOUT = 18  # IPPROTO_TCP option number


def tcp_options(link_timeout: float) -> str:
    """socat address options that end a TCP connection to a dead or cut-off peer:
    idle peers are probed (keepalive) and unacknowledged data is given up after
    twice `link_timeout` (TCP_USER_TIMEOUT), the time after which a data channel
    that moves nothing is dead (config.Timeouts.link)."""
    return f"keepalive,keepidle=5,keepintvl=2,keepcnt=3,setsockopt-int=6:{TCP_USER_TIMEOUT}:{int(link_timeout * 2000)}"


@dataclass(frozen=True)
class Credentials:
    """This host's name, certificate and key, and the CA that signs its peers."""

    name: str
    cert: Path
    key: Path
    ca: Path


def parse_endpoint(value: str) -> tuple[str, int]:
    """'ADDR:PORT' (IPv4) from the wire or the user -> (addr, port), validated."""
    host, sep, port = value.rpartition(":")
    try:
        addr = str(ipaddress.IPv4Address(host))
        num = int(port)
    except ValueError:
        raise InvalidInput(f"invalid address {value!r}", "write IPV4:PORT, e.g. 10.213.0.12:7473") from None
    if not sep or not 0 < num < 65536:
        raise InvalidInput(f"invalid address {value!r}", "write IPV4:PORT with a port from 1 to 65535")
    return addr, num


class TlsEndpoint:
    """A TLS listener on an ephemeral port of `bind` that runs `command` for
    each connection from a peer whose certificate names `peer_name`."""

    def __init__(self, creds: Credentials, bind: str, peer_name: str, command: list[str], link_timeout: float) -> None:
        check_id(peer_name, "peer host name")
        if any(c in part for part in command for c in ",!: \"'"):
            raise InvalidInput(f"endpoint command {command!r} has characters socat would misparse")
        self.creds = creds
        self.bind = str(ipaddress.IPv4Address(bind))
        self.peer_name = peer_name
        self.command = command
        self.link_timeout = link_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def pid(self) -> int:
        """The listener's PID (and process group), 0 when it is not running."""
        return self._proc.pid if self._proc is not None else 0

    def open(self, log_path: Path, attempts: int = 5) -> str:
        """Start listening; returns ADDR:PORT."""
        for _ in range(attempts):
            self.port = _free_port(self.bind)
            listen = (
                f"OPENSSL-LISTEN:{self.port},bind={self.bind},reuseaddr,fork,"
                f"cert={self.creds.cert},key={self.creds.key},cafile={self.creds.ca},"
                f"verify=1,commonname={self.peer_name},nodelay,{tcp_options(self.link_timeout)}"
            )
            with open(log_path, "ab") as errlog:
                self._proc = subprocess.Popen(
                    ["socat", "-t", "0.01", listen, "EXEC:" + " ".join(self.command)],
                    stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog, start_new_session=True,
                )
            if _wait_listening(self.port, self._proc):
                log.debug("data endpoint %s for %s: %s", self.address, self.peer_name, self.command[0])
                return self.address
            self.close()
        raise ToolFailed(
            f"could not open a data channel on {self.bind}",
            f"see {log_path}; check that socat is installed and {self.bind} is this host's address",
        )

    def close(self) -> None:
        """Stop listening and end every connection still served."""
        if self._proc is None:
            return
        import os
        import signal

        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait()
        self._proc = None


def _free_port(bind: str) -> int:
    with socket.socket() as s:
        s.bind((bind, 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> bool:
    """Wait until something in this network namespace listens on `port`."""
    want = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with open("/proc/net/tcp") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and (parts[1] + " ").endswith(want) and parts[3] == "0A":
                    return True
        time.sleep(0.005)
    return False


def rsh_env(creds: Credentials, peer: str, peer_name: str, link_timeout: float) -> dict[str, str]:
    """Environment for TLS_RSH to reach `peer` (ADDR:PORT) as `peer_name`."""
    addr, port = parse_endpoint(peer)
    check_id(peer_name, "peer host name")
    return {
        "PHAUL_PEER": f"{addr}:{port}",
        "PHAUL_PEER_NAME": peer_name,
        "PHAUL_CERT": str(creds.cert),
        "PHAUL_KEY": str(creds.key),
        "PHAUL_CA": str(creds.ca),
        "PHAUL_TCP_OPTIONS": tcp_options(link_timeout),
    }
