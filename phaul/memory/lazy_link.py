"""Post-copy's page link: CRIU's lazy pages between the two hosts, over TLS, guarded.

Source: the final dump (`runc checkpoint --lazy-pages`) leaves private
memory in the frozen tree and, once the commit gate lets it go on, serves
pages on 127.0.0.1:PORT (CRIU's page server; `address 127.0.0.1` in its
configuration keeps it off every other address). The `hub`, its own
process (it outlives the agent), holds the one connection to it
(`phaul.memory.page_relay.Hub`). A per-migration
`phaul.channels.transport.TlsEndpoint` that accepts only the destination's
certificate runs `serve` for each connection of the link: the first line
must be the migration's secret; it then says `page_relay.HELLO` and relays
bytes to and from the hub, which takes each new connection in place of a
broken one.

Destination: `keep` runs, in its own session (it outlives an agent restart),
for the whole post-copy:
- CRIU's lazy-pages daemon, its child, told to fetch pages from a relay on
  127.0.0.1 that this process listens on; the restore (`runc restore
  --lazy-pages`) hands the daemon one userfaultfd per task;
- the uffd guard (`phaul.memory.uffd_guard`): once the daemon has every
  task's userfaultfd (it connects to the relay only then) this process holds
  a duplicate of each, takes those of forked tasks as they appear, and lets
  go of each one the daemon closes itself (a task whose pages are all in
  place, or gone): held on, it would leave that task's next fork waiting for
  ever on an event nobody reads (issue 12);
- the relay (`phaul.memory.page_relay.Replayer`): the daemon's connection
  <-> the TLS link to the source (`TLS_RSH`, the secret first); a broken
  link is dialled again for `--redial-s` seconds and the unanswered
  requests are sent again (post-copy recovery), the faulting tasks waiting.
It reports on its status file, one JSON object a line: `{"listening": PORT}`,
`{"held": N}` (the restore may resume the copy only after this), `{"link":
"broken"}` and `{"link": "back"}` around a re-dial, `{"done": "ok",
"received": BYTES, "redials": N}` when the daemon ended with every page in place, `{"done": "lost",
"error": ...}` when it did not: the container's tasks were killed first,
while the guard still held their userfaultfds, so no task ever read a page
that had not arrived (a zero-filled page is silent corruption; a dead
container is stated plainly).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from phaul.linux import freezer
from phaul.linux.doctor import PIPE_MAX_WANTED  # CRIU splices page runs through pipes this large
from phaul.memory import page_basis, page_relay, uffd_guard
from phaul.memory.uffd_guard import UffdGuard

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TLS_RSH = Path(__file__).resolve().parents[1] / "data" / "tls-rsh"
GRAB_INTERVAL = 0.01  # s between looks for the userfaultfds of newly forked tasks
GO = b"go\n"  # what the agent writes to a waiting keeper's stdin to start it
DIAL_TIMEOUT = 120.0  # s the source's hub waits for CRIU's page server (it opens once the dump is done)
HUB_TIMEOUT = 10.0  # s a link connection waits for the hub's socket
SOURCE_CRIU_OPTIONS = "address 127.0.0.1\n"  # CRIU's lazy page server listens on the loopback only
PIPE_MAX = Path("/proc/sys/fs/pipe-max-size")


def available() -> tuple[bool, str]:
    """Can this host take part in a post-copy migration? Raises fs.pipe-max-size to what
    CRIU's lazy pages need when this process cannot exceed it (no CAP_SYS_RESOURCE)."""
    from phaul.linux.doctor import features

    if not features().get("uffd"):
        return False, "CRIU finds no non-cooperative userfaultfd on this kernel (`criu check --feature uffd-noncoop`)"
    ok, why = uffd_guard.available()
    if not ok:
        return False, f"the userfaultfd guard cannot work here: {why}"
    try:
        size = int(PIPE_MAX.read_text())
        if size < PIPE_MAX_WANTED and not _has_sys_resource():
            PIPE_MAX.write_text(f"{PIPE_MAX_WANTED}\n")
            log.warning("raised fs.pipe-max-size from %d to %d for CRIU's lazy pages", size, PIPE_MAX_WANTED)
    except (OSError, ValueError) as e:
        return False, f"fs.pipe-max-size is below the {PIPE_MAX_WANTED} lazy pages need and cannot be raised: {e}"
    return True, "userfaultfd, the uffd guard and fs.pipe-max-size are in place"


def _has_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


# -- source ------------------------------------------------------------------------------


def serve(secret: str, hub: Path, rx: BinaryIO, tx: BinaryIO, dial_timeout: float = HUB_TIMEOUT) -> int:
    """One connection of the page link: check the secret on `rx`, reach the hub (its unix
    socket `hub`), say page_relay.HELLO on `tx`, then relay `rx`/`tx` to the hub."""
    given = _read_line(rx.fileno(), 256)
    if not secret or not hmac.compare_digest(given, secret.encode()):
        print("phaul lazy link: wrong or missing migration secret", file=sys.stderr)
        return 1
    deadline = time.monotonic() + dial_timeout
    while True:
        sk = socket.socket(socket.AF_UNIX)
        try:
            sk.connect(str(hub))
            break
        except OSError:
            sk.close()
            if time.monotonic() > deadline:
                print(f"phaul lazy link: no page hub at {hub}", file=sys.stderr)
                return 1
            time.sleep(0.005)
    os.write(tx.fileno(), page_relay.HELLO)
    _relay(sk, rx.fileno(), tx.fileno())
    return 0


def _read_line(fd: int, limit: int) -> bytes:
    """One line from `fd`, read a byte at a time: nothing after it is taken from the descriptor."""
    line = b""
    while len(line) < limit and not line.endswith(b"\n"):
        c = os.read(fd, 1)
        if not c:
            break
        line += c
    return line.rstrip(b"\n")


# -- destination -------------------------------------------------------------------------


class Keeper:
    """The destination's post-copy process (see the module's docstring)."""

    def __init__(
        self, criu: str, images: Path, work: Path, status: Path, secret: str, procs: list[Path], redial_s: float,
        basis: Path | None = None,
    ) -> None:
        self.criu, self.images, self.work, self.status = criu, images, work, status
        self.secret = secret
        self.procs = procs  # the container's cgroup.procs files (made by the restore, after this started)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.guard: UffdGuard | None = None
        self.relay: threading.Thread | None = None
        self.replayer = page_relay.Replayer(self._dial, redial_s, self._say, page_basis.Decoder(basis))

    def run(self, go: BinaryIO) -> int:
        """Wait for GO on `go` (the agent, once the images are here), then keep the post-copy."""
        if go.readline(16) != GO:
            return 0  # the migration ended before its restore (or the agent died)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with open(self.work / "lazy-pages.out", "ab") as out:
            self.daemon = subprocess.Popen(
                [self.criu, "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", str(port),
                 "-D", str(self.images), "-W", str(self.work), "-o", "lazy-pages.log", "-v4"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )
        daemon = self.daemon
        self.guard = UffdGuard(daemon.pid, self._kill_container, completed=lambda: daemon.wait() == 0)
        link = self._dial()  # before the restore: its first faults must not wait for a handshake
        self._say(listening=port, daemon=daemon.pid)
        conn = self._accept(listener)
        if conn is None:
            return self._end()
        # The daemon connects only once it holds every restored task's userfaultfd.
        self._say(held=self.guard.grab())
        self.relay = threading.Thread(target=self.replayer.run, args=(conn, link), name="lazy-link", daemon=True)
        self.relay.start()
        while daemon.poll() is None:
            time.sleep(GRAB_INTERVAL)
            try:
                self.guard.grab()
            except OSError:  # the daemon ended meanwhile
                break
        return self._end()

    def _accept(self, listener: socket.socket) -> socket.socket | None:
        assert self.daemon is not None
        listener.settimeout(0.05)
        while self.daemon.poll() is None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                continue
        return None

    def _dial(self) -> subprocess.Popen[bytes]:
        """The TLS link to the source (TLS_RSH, the environment set by the agent), the secret sent."""
        link = subprocess.Popen(
            ["sh", str(TLS_RSH)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
        )
        assert link.stdin is not None
        link.stdin.write(self.secret.encode() + b"\n")
        link.stdin.flush()
        return link

    def _end(self) -> int:
        assert self.daemon is not None and self.guard is not None
        rc = self.daemon.wait()
        if rc == 0:
            self.guard.finish()
            if self.relay is not None:
                self.relay.join(timeout=5)  # the link's last bytes are counted
            self._say(done="ok", received=self.replayer.received, redials=self.replayer.redials,
                      basis_pages=self.replayer.decoder.basis_pages)
        else:
            self.guard.wait()  # it kills the container, then lets go of the userfaultfds
            self._say(done="lost", error=_daemon_error(self.work, rc))
        return 0 if rc == 0 else 1

    def _kill_container(self) -> None:
        """Every task of the container dies before the guard releases a userfaultfd: frozen
        (no fork slips through), killed, thawed so that they die. Returns only once none
        is left (the guard holds the userfaultfds meanwhile: a task that lives on waits)."""
        states = [f.parent / "freezer.state" for f in self.procs if (f.parent / "freezer.state").is_file()]
        for state in states:
            try:
                freezer.freeze(state)
            except OSError as e:
                log.warning("cannot freeze %s: %s", state, e)
        if not any(f.is_file() for f in self.procs):
            log.warning("none of the container's cgroups exists (%s): nothing to kill", ", ".join(map(str, self.procs)))
        next_word = time.monotonic() + 30
        while True:
            pids = [p for f in self.procs for p in _read_pids(f)]
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for state in states:
                try:
                    freezer.thaw(state)  # killed tasks must run to die
                except OSError:
                    pass
            if time.monotonic() > next_word:
                log.error("tasks %s of the container do not die; their userfaultfds stay held", pids)
                next_word = time.monotonic() + 30
            time.sleep(0.01)

    def _say(self, **what: object) -> None:
        try:
            with open(self.status, "a") as f:
                f.write(json.dumps(what) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # its directory removed (an agent that settled the migration): keep guarding
            log.warning("cannot write %s: %s", self.status, e)


def _daemon_error(work: Path, rc: int) -> str:
    try:
        lines = (work / "lazy-pages.log").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [line for line in lines if "Error" in line or "FAILED" in line]
    return f"CRIU's lazy-pages daemon ended with {rc}" + (f": {errors[-1].strip()}" if errors else "")


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


def read_status(path: Path) -> dict[str, object]:
    """Everything the keeper said so far, the later keys over the earlier."""
    out: dict[str, object] = {}
    try:
        for line in path.read_text().splitlines():
            try:
                out.update(json.loads(line))
            except ValueError:
                continue
    except OSError:
        pass
    return out


# -- relaying a link connection (serve) -----------------------------------------------


def _relay(sk: socket.socket, rx: int, tx: int) -> None:
    """Bytes from descriptor `rx` to `sk` and from `sk` to descriptor `tx` until either side ends."""
    done = threading.Event()

    def up() -> None:
        try:
            while chunk := os.read(rx, CHUNK):
                sk.sendall(chunk)
        except OSError:
            pass
        finally:
            done.set()
            try:
                sk.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    t = threading.Thread(target=up, daemon=True)
    t.start()
    try:
        while chunk := sk.recv(CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(tx, view):]
    except OSError:
        pass
    finally:
        try:
            os.close(tx)
        except OSError:
            pass
    done.wait()
    sk.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m phaul.memory.lazy_link")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("serve", help="source: one connection of the page link, on stdin/stdout, to the hub")
    s.add_argument("secret_file", type=Path)
    s.add_argument("hub", type=Path, help="the hub's unix socket")
    h = sub.add_parser("hub", help="source: holds CRIU's page-server connection for successive link connections")
    h.add_argument("hub", type=Path, help="the unix socket to listen on")
    h.add_argument("port", type=int, help="CRIU's page server on 127.0.0.1")
    h.add_argument("--linger", type=float, required=True, help="s without a link connection before giving up")
    h.add_argument("--basis", type=Path, help="hybrid: the last pre-copy round's images, which the destination holds")
    k = sub.add_parser("keep", help="destination: the lazy-pages daemon, its guard and its link")
    k.add_argument("--criu", required=True)
    k.add_argument("--images", type=Path, required=True)
    k.add_argument("--work", type=Path, required=True)
    k.add_argument("--status", type=Path, required=True)
    k.add_argument("--secret-file", type=Path, required=True)
    k.add_argument("--procs", type=Path, action="append", default=[])
    k.add_argument("--redial-s", type=float, required=True, help="s to dial a broken page link again")
    k.add_argument("--basis", type=Path, help="hybrid: where KeepBasis keeps the last pre-copy round's images")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lazy-link %(levelname)s %(message)s")
    from phaul.channels.transport import read_secret

    if args.role == "serve":
        return serve(read_secret(args.secret_file), args.hub, sys.stdin.buffer, sys.stdout.buffer)
    if args.role == "hub":
        return page_relay.Hub(args.port, args.hub, args.linger, DIAL_TIMEOUT, args.basis).run()
    keeper = Keeper(
        args.criu, args.images, args.work, args.status, read_secret(args.secret_file), args.procs, args.redial_s,
        args.basis,
    )
    return keeper.run(sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main())
