"""Post-copy recovery without the lab (phaul.memory.page_relay): a page server speaking CRIU's
protocol, the source's hub, link connections run by `lazy_link serve` as the TLS endpoint
runs them, and the destination's replayer; a link killed mid-transfer is dialled again and
every answer reaches the daemon whole and right, in order."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from phaul.channels.transport import write_secret
from phaul.memory import page_relay
from phaul.memory.page_relay import IOV, PAGE, PS_IOV_CLOSE, Hub, Replayer, read_exact

# A relay thread that dies of an exception would leave requests unread: fail the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
PS_IOV_GET, PS_IOV_ADD_F = 7, 6
SECRET = "s3cret"


def _page(vaddr: int, i: int) -> bytes:
    return (vaddr + i * PAGE).to_bytes(8, "little") * (PAGE // 8)


class PageServer:
    """CRIU's lazy page server, as far as the protocol goes: each GET answered (slowly) with
    at most `clamp` pages, CLOSE with a zero status."""

    def __init__(self, clamp: int = 8, delay: float = 0.02) -> None:
        self.clamp, self.delay = clamp, delay
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.served = 0
        self.closed_cleanly = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while True:
                try:
                    cmd, nr, vaddr, dst = IOV.unpack(read_exact(conn.recv, IOV.size))
                except page_relay.LinkBroken:
                    return
                if cmd == PS_IOV_CLOSE:
                    conn.sendall(b"\0\0\0\0")
                    self.closed_cleanly = True
                    return
                assert cmd == PS_IOV_GET
                time.sleep(self.delay)
                nr = min(nr, self.clamp)
                conn.sendall(IOV.pack(PS_IOV_ADD_F | 4 << 16, nr, vaddr, dst) + b"".join(_page(vaddr, i) for i in range(nr)))
                self.served += 1


def _link_process(secret_file: Path, hub: Path) -> subprocess.Popen[bytes]:
    """One link connection, as the TLS endpoint runs it (without TLS): serve, the secret first."""
    link = subprocess.Popen(
        [sys.executable, "-m", "phaul.memory.lazy_link", "serve", str(secret_file), str(hub)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert link.stdin is not None
    link.stdin.write(SECRET.encode() + b"\n")
    link.stdin.flush()
    return link


@pytest.fixture()
def secret_file(tmp_path: Path) -> Path:
    f = tmp_path / "secret"
    write_secret(f, SECRET)
    return f


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """The lazy-pages daemon's connection to the keeper: TCP on the loopback, as in production."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        daemon = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return daemon, ours


def _start_hub(server: PageServer, sock: Path, linger: float) -> tuple[Hub, threading.Thread, list[int]]:
    hub = Hub(server.port, sock, linger=linger, dial_timeout=5)
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(hub.run()), daemon=True)
    t.start()
    return hub, t, rc


def test_a_link_killed_mid_transfer_is_dialled_again_and_every_answer_arrives(tmp_path: Path, secret_file: Path) -> None:
    server = PageServer()
    sock = tmp_path / "hub.sock"
    _, hub_thread, hub_rc = _start_hub(server, sock, linger=10)
    links: list[subprocess.Popen[bytes]] = []

    def dial() -> subprocess.Popen[bytes]:
        links.append(_link_process(secret_file, sock))
        return links[-1]

    said: list[dict[str, object]] = []
    replayer = Replayer(dial, redial_s=10, say=lambda **w: said.append(w))
    daemon, ours = _tcp_pair()
    relay = threading.Thread(target=replayer.run, args=(ours, dial()), daemon=True)
    relay.start()

    requests = [(0x10000 + k * 16 * PAGE, 12) for k in range(30)]  # 12 pages asked, 8 answered (clamped)
    for vaddr, nr in requests:
        daemon.sendall(IOV.pack(PS_IOV_GET, nr, vaddr, 1))
    for k, (vaddr, _) in enumerate(requests):
        if k == 5:  # the link breaks with requests unanswered, maybe in the middle of an answer
            links[0].kill()
        cmd, nr, got_vaddr, dst = IOV.unpack(read_exact(daemon.recv, IOV.size))
        assert (nr, got_vaddr, dst) == (8, vaddr, 1)
        assert read_exact(daemon.recv, nr * PAGE) == b"".join(_page(vaddr, i) for i in range(nr))
    daemon.sendall(IOV.pack(PS_IOV_CLOSE, 0, 0, 0))
    assert read_exact(daemon.recv, 4) == b"\0\0\0\0"
    daemon.close()
    relay.join(10)
    hub_thread.join(10)
    assert hub_rc == [0] and server.closed_cleanly
    assert replayer.redials >= 1 and {"link": "back", "redials": replayer.redials} in said
    assert replayer.received == 30 * (IOV.size + 8 * PAGE) + 4
    assert server.served >= 30  # some answered twice: those the broken link lost
    for link in links:
        link.kill()
        link.wait()


def test_the_replayer_gives_up_when_the_link_stays_away(tmp_path: Path) -> None:
    """No link comes back within redial_s: the daemon's connection is closed (the keeper's
    guard then kills the copy), nothing is answered from nowhere."""
    def dial() -> subprocess.Popen[bytes]:
        return subprocess.Popen(["false"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    replayer = Replayer(dial, redial_s=1.5, say=lambda **w: None)
    daemon, ours = _tcp_pair()
    daemon.sendall(IOV.pack(PS_IOV_GET, 1, 0x1000, 1))
    t0 = time.monotonic()
    replayer.run(ours, dial())
    assert 1.0 < time.monotonic() - t0 < 15
    assert daemon.recv(1) == b""  # closed, no answer
    assert replayer.received == 0 and replayer.redials == 0


def test_the_hub_ends_the_transfer_when_no_link_comes_back(tmp_path: Path, secret_file: Path) -> None:
    server = PageServer()
    sock = tmp_path / "hub.sock"
    hub = Hub(server.port, sock, linger=1.0, dial_timeout=5)
    hub.link_lost_at = time.monotonic()  # as after a first link that broke
    t0 = time.monotonic()
    assert hub.run() == 1
    assert time.monotonic() - t0 < 10
    server.thread.join(5)
    assert not server.closed_cleanly and not server.thread.is_alive()  # CRIU's connection was closed


def test_a_link_connection_with_a_wrong_secret_reaches_no_hub(tmp_path: Path) -> None:
    wrong = tmp_path / "secret"
    write_secret(wrong, "other")
    link = _link_process(wrong, tmp_path / "hub.sock")
    out, _ = link.communicate(timeout=30)
    assert link.returncode == 1 and out == b""
