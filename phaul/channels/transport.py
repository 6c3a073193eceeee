"""Per-migration data channels: mutual-TLS endpoints that live only as long
as the migration that opened them.

The destination opens a `TlsEndpoint` that accepts TLS connections from the
source host's certificate only and hands each one to a local command (for
example `rsync --server --daemon`); the source reaches it through `TLS_RSH`,
a remote shell for rsync that speaks TLS with its own certificate.

Every connection passes `GATE` before its command runs: the peer
certificate's common name must be exactly the expected peer (socat's own
`commonname=` also accepts a matching SAN), and a sealed migration (its seal
file exists) serves nobody. Both ends speak TLS 1.2 or later with AEAD
ciphers only (`TLS_OPTIONS`), and a listener serves at most `MAX_CHILDREN`
connections at a time (more wait in the kernel's backlog). Each migration has
a random secret (`new_secret`), kept in a 0600 file on the destination and in
the environment on the source, never in an argument list: rsync's daemon
authentication and the page stream's first line require it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from phaul.endpoint import host_text, parse_endpoint
from phaul.errors import InvalidInput, ToolFailed
from phaul.validate import check_id

log = logging.getLogger(__name__)

TLS_RSH = Path(__file__).resolve().parents[1] / "data" / "tls-rsh"
GATE = Path(__file__).resolve().parents[1] / "data" / "gate"
TCP_USER_TIMEOUT = 18  # IPPROTO_TCP option number
# TLS 1.2 or later; TLS 1.2 with ECDHE and AES-GCM or ChaCha20-Poly1305 only (TLS 1.3's suites are all AEAD)
TLS_OPTIONS = "openssl-min-proto-version=TLS1.2,cipher=ECDHE+AESGCM:ECDHE+CHACHA20"
MAX_CHILDREN = 4  # connections one endpoint serves at a time
MAX_EXEC = 500  # characters of the EXEC address (socat 1.7 garbles one past about 512)
SECRET_USER = "phaul"  # the user name of rsync's daemon authentication


def new_secret() -> str:
    """A fresh per-migration data-channel secret."""
    return secrets.token_hex(32)


def write_secret(path: Path, secret: str) -> None:
    """Keep `secret` in a new file readable by this user only, in the format of
    rsync's `secrets file` (USER:SECRET)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{SECRET_USER}:{secret}\n")


def read_secret(path: Path) -> str:
    """The secret `write_secret` kept in `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        return f.read().strip().partition(":")[2]


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


class TlsEndpoint:
    """A TLS listener on an ephemeral port of `bind` that runs `command` in
    directory `workdir` for each connection from a peer whose certificate's
    common name is `peer_name`, unless file `seal` exists (through `GATE`).
    The paths of `command` and `seal` are passed relative to `workdir`, so that
    socat's EXEC address stays short: socat 1.7 cuts an address token at
    about 512 characters and then fails every connection."""

    def __init__(
        self, creds: Credentials, bind: str, peer_name: str, command: list[str | Path], link_timeout: float,
        seal: Path, workdir: Path,
    ) -> None:
        check_id(peer_name, "peer host name")
        words = ["sh", str(GATE), peer_name, *(_under(workdir, p) for p in (seal, *command))]
        if any(c in part for part in words for c in ",!: \"'"):
            raise InvalidInput(f"endpoint command {words!r} has characters socat would misparse")
        if len(" ".join(words)) > MAX_EXEC:
            raise InvalidInput(
                f"endpoint command {' '.join(words)!r} is longer than socat's {MAX_EXEC} characters",
                "install phaul and its state directory at shorter paths",
            )
        self.workdir = workdir
        self.creds = creds
        try:  # an IPv4 or IPv6 address of this host, or a wildcard
            self.bind = ipaddress.ip_address(bind)
        except ValueError:
            raise InvalidInput(f"data channel bind address {bind!r} is not an IP address") from None
        self.peer_name = peer_name
        self.command = words
        self.link_timeout = link_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{host_text(str(self.bind))}:{self.port}"

    @property
    def pid(self) -> int:
        """The listener's PID (and process group), 0 when it is not running."""
        return self._proc.pid if self._proc is not None else 0

    def open(self, log_path: Path, attempts: int = 5) -> str:
        """Start listening; returns ADDR:PORT."""
        for _ in range(attempts):
            v6 = self.bind.version == 6
            self.port = _free_port(str(self.bind), socket.AF_INET6 if v6 else socket.AF_INET)
            family = "pf=ip6," if v6 else ""  # socat makes an IPv4 socket unless told
            listen = (
                f"OPENSSL-LISTEN:{self.port},{family}bind={host_text(str(self.bind))},reuseaddr,fork,max-children={MAX_CHILDREN},"
                f"cert={self.creds.cert},key={self.creds.key},cafile={self.creds.ca},"
                f"verify=1,commonname={self.peer_name},{TLS_OPTIONS},nodelay,{tcp_options(self.link_timeout)}"
            )
            with open(log_path, "ab") as errlog:
                self._proc = subprocess.Popen(
                    ["socat", "-t", "0.01", listen, "EXEC:" + " ".join(self.command)],
                    stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog, start_new_session=True, cwd=self.workdir,
                )
            if _wait_listening(self.port, self._proc):
                log.debug("data endpoint %s for %s: %s", self.address, self.peer_name, self.command[4])
                return self.address
            self.close()
        raise ToolFailed(
            f"could not open a data channel on {self.bind}",
            f"see {log_path}; check that socat is installed and {self.bind} is this host's address",
        )

    def end_connections(self, keep_root: Path | None = None) -> None:
        """End every connection served now and keep listening: each runs in the
        listener's process group, which this empties of all but the listener
        (what a connection forks meanwhile too); returns once they are dead.
        `keep_root`: spare the connections whose command has chrooted into it
        (an rsync module the caller does not read)."""
        if self._proc is not None:
            _kill_group(self._proc.pid, spare=self._proc.pid, keep_root=keep_root)

    def close(self) -> None:
        """Stop listening and end every connection still served; returns once they are dead."""
        if self._proc is None:
            return
        _kill_group(self._proc.pid)
        self._proc.wait()
        self._proc = None


def _under(workdir: Path, word: str | Path) -> str:
    """`word` as a command word: a Path relative to `workdir` (which holds it), a str as it is."""
    if isinstance(word, Path):
        try:
            return str(word.relative_to(workdir))
        except ValueError:
            raise InvalidInput(f"endpoint path {word} is outside its working directory {workdir}") from None
    return word


def _kill_group(pgid: int, spare: int = 0, keep_root: Path | None = None, timeout: float = 10.0) -> None:
    """SIGKILL every process of group `pgid` but `spare` until none is left alive;
    with `keep_root`, spare too each connection (the processes descending from
    one child of `spare`) that has a process chrooted into `keep_root`."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in _group(pgid) if p != spare]
        if keep_root is not None:
            alive = _outside(alive, spare, keep_root)
        if not alive:
            return
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise ToolFailed(f"processes {alive} of data channel {pgid} do not die", "check them with ps")
        time.sleep(0.002)


def _outside(pids: list[int], listener: int, root: Path) -> list[int]:
    """`pids` but those of connections with a process whose root directory is `root`."""
    parent = {p: _ppid(p) for p in pids}

    def connection(p: int) -> int:
        seen = 0
        while parent.get(p, listener) != listener and seen < 64:
            p, seen = parent[p], seen + 1
        return p

    kept = set()
    for p in pids:
        try:
            if os.readlink(f"/proc/{p}/root") == str(root):
                kept.add(connection(p))
        except OSError:
            pass
    return [p for p in pids if connection(p) not in kept]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in "ZX":
            found.append(int(d))
    return found


def _free_port(bind: str, family: socket.AddressFamily) -> int:
    with socket.socket(family) as s:
        s.bind((bind, 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> bool:
    """Wait until something in this network namespace listens on `port` (IPv4 or IPv6)."""
    want = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and (parts[1] + " ").endswith(want) and parts[3] == "0A":
                        return True
        time.sleep(0.005)
    return False


def rsh_env(creds: Credentials, peer: str, peer_name: str, link_timeout: float) -> dict[str, str]:
    """Environment for TLS_RSH to reach `peer` (HOST:PORT; a host name is resolved here,
    socat is given the address) as `peer_name`."""
    target = parse_endpoint(peer, "peer address").resolve()
    check_id(peer_name, "peer host name")
    return {
        "PHAUL_PEER": str(target),
        "PHAUL_PEER_NAME": peer_name,
        "PHAUL_CERT": str(creds.cert),
        "PHAUL_KEY": str(creds.key),
        "PHAUL_CA": str(creds.ca),
        "PHAUL_TCP_OPTIONS": tcp_options(link_timeout),
        "PHAUL_TLS_OPTIONS": TLS_OPTIONS,
    }
