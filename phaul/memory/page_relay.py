"""Post-copy recovery: CRIU's page-server protocol relayed so that a broken link is re-dialled.

CRIU's lazy-pages daemon (destination) and its page server (source) speak a
plain request/answer protocol on one connection (criu/page-xfer.c): each
request is one `struct page_server_iov` (`IOV`), `PS_IOV_GET` for `nr_pages`
at `vaddr` of task `dst_id`, answered in order by one `IOV` header and the
pages it announces (possibly fewer than asked); `PS_IOV_CLOSE` at the end is
answered by a 4-byte status. The page server serves a page as often as it is
asked (it `tee`s from its page pipes), so a request may be sent again.

Neither CRIU end reconnects: a broken connection ends the transfer. phaul
keeps CRIU's two connections local and re-dials the link between them:

- `Hub` (source, its own process, outliving the agent): holds the one
  connection to CRIU's page server and accepts successive link connections
  on a unix socket (each relayed from the TLS endpoint by
  `phaul.memory.lazy_link.serve`). A new connection replaces the old one;
  answers to requests of an old connection are read from CRIU and dropped.
  With no link for `linger` seconds it closes CRIU's connection, which ends
  the transfer.
- `Replayer` (destination, in the keeper): holds the lazy-pages daemon's
  connection, keeps every request not yet answered, hands the daemon only
  whole answers, and when the link breaks dials it again (for `redial_s`
  seconds) and sends the unanswered requests again. The daemon's faulting
  tasks wait meanwhile: nothing is filled in.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import queue
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from phaul.memory import page_basis

log = logging.getLogger(__name__)

IOV = struct.Struct("=I4xQQQ")  # struct page_server_iov {u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id;} (x86-64 layout)
PAGE = 4096
PS_CMD_MASK = 0xFFFF
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
STATUS_SIZE = 4  # the int32 status that answers PS_IOV_CLOSE
REDIAL_PAUSE = 0.5  # s between two dials of a broken link
HELLO = b"phaul-pages\n"  # what the source's end of each link connection says once it reached the hub
HELLO_TIMEOUT = 10.0  # s a new link connection has to say HELLO


class LinkBroken(Exception):
    """The other end closed the connection, or it failed."""


def closing(request: bytes) -> bool:
    """Is `request` the daemon's last (PS_IOV_CLOSE or PS_IOV_FORCE_CLOSE)?"""
    return IOV.unpack(request)[0] & PS_CMD_MASK in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE)


def read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    """Exactly `n` bytes from `read` (a recv or os.read); LinkBroken at the end of the stream."""
    parts, left = [], n
    while left:
        try:
            chunk = read(min(left, 1 << 20))
        except OSError as e:
            raise LinkBroken(str(e)) from None
        if not chunk:
            raise LinkBroken("closed")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_answer(read: Callable[[int], bytes], request: bytes) -> bytes:
    """The page server's whole answer to `request`."""
    if closing(request):
        return read_exact(read, STATUS_SIZE)
    head = read_exact(read, IOV.size)
    return head + read_exact(read, IOV.unpack(head)[1] * PAGE)


# -- source -----------------------------------------------------------------------------------


class Hub:
    """The source's end (see the module's docstring)."""

    def __init__(
        self, criu_port: int, sock_path: Path, linger: float, dial_timeout: float, basis: Path | None = None,
    ) -> None:
        self.criu_port, self.sock_path, self.linger, self.dial_timeout = criu_port, sock_path, linger, dial_timeout
        self.basis = basis  # hybrid: the last pre-copy round's images, which the destination holds too
        self.criu: socket.socket | None = None
        self.ready = threading.Event()  # CRIU's connection is up
        self.lock = threading.Lock()  # orders requests: queued and sent to CRIU as one step
        self.pending: queue.Queue[tuple[int, bytes] | None] = queue.Queue()  # (epoch, request), as sent to CRIU
        self.epoch = 0
        self.link: socket.socket | None = None  # the current link connection (epoch self.epoch)
        self.link_lost_at = time.monotonic() + dial_timeout  # the first connection comes after the restore's start

    def run(self) -> int:
        """Serve until CRIU's page server has answered the daemon's close (0), or until it
        ended or no link came back within `linger` (1: CRIU's transfer ends unfinished)."""
        self.sock_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(self.sock_path))
        os.chmod(self.sock_path, 0o600)
        listener.listen(4)
        index = None
        if self.basis is not None:
            try:
                index = page_basis.BasisIndex(self.basis)
                log.info("basis %s: pages of %d tasks", self.basis, len(index.runs))
            except Exception as e:  # noqa: BLE001 (pycriu's own errors): every page then crosses the link
                log.warning("cannot index the basis %s (%s); every page crosses the link", self.basis, e)
        self.criu = self._dial()
        if self.criu is None:
            return 1
        self.ready.set()
        threading.Thread(target=self._accept, args=(listener,), name="hub-accept", daemon=True).start()
        return self._answer(index)

    def _dial(self) -> socket.socket | None:
        deadline = time.monotonic() + self.dial_timeout
        while True:
            try:
                sk = socket.create_connection(("127.0.0.1", self.criu_port), timeout=5)
                sk.settimeout(None)
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sk
            except OSError:
                if time.monotonic() > deadline:
                    log.error("CRIU's page server on port %d never listened", self.criu_port)
                    return None
                time.sleep(0.005)

    def _accept(self, listener: socket.socket) -> None:
        listener.settimeout(0.5)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                with self.lock:
                    gone = self.link is None and time.monotonic() - self.link_lost_at > self.linger
                if gone:
                    log.error("no page link for %.0f s: ending CRIU's transfer", self.linger)
                    self.pending.put(None)
                    assert self.criu is not None
                    try:
                        self.criu.shutdown(socket.SHUT_RDWR)  # an answer being read ends too
                    except OSError:
                        pass
                    return
                continue
            conn.settimeout(None)
            with self.lock:
                old, self.link = self.link, conn
                self.epoch += 1
                epoch = self.epoch
            if old is not None:
                log.warning("page link %d replaced by a new connection", epoch - 1)
                _shut(old)
            threading.Thread(target=self._requests, args=(conn, epoch), name=f"hub-link-{epoch}", daemon=True).start()

    def _requests(self, conn: socket.socket, epoch: int) -> None:
        """Requests of one link connection, queued and sent to CRIU in order."""
        assert self.criu is not None
        try:
            while True:
                request = read_exact(conn.recv, IOV.size)
                with self.lock:
                    self.pending.put((epoch, request))
                    self.criu.sendall(request)
        except (LinkBroken, OSError) as e:
            log.info("page link %d ended: %s", epoch, e)
        with self.lock:
            if self.link is conn:
                self.link, self.link_lost_at = None, time.monotonic()
        _shut(conn)

    def _answer(self, index: page_basis.BasisIndex | None) -> int:
        """CRIU's answers, each to the link connection whose request it answers, if still current;
        with `index`, pages the destination holds unchanged go as references (page_basis)."""
        assert self.criu is not None
        while True:
            item = self.pending.get()
            if item is None:  # no link came back
                _shut(self.criu)
                return 1
            epoch, request = item
            try:
                answer = read_answer(self._from_criu, request)
            except LinkBroken as e:
                log.error("CRIU's page server ended: %s", e)
                return 1
            if index is not None and not closing(request):
                try:
                    answer = page_basis.encode(answer, index)
                except OSError as e:  # the answer goes as CRIU gave it
                    log.warning("cannot compare an answer with the basis: %s", e)
            with self.lock:
                link = self.link if epoch == self.epoch else None
            if link is not None:
                try:
                    link.sendall(answer)
                except OSError:
                    pass  # the destination dials again and asks again
            if closing(request):
                if index is not None:
                    log.info("%d of %d pages served went as references to the basis", index.referenced, index.served)
                return 0


    def _from_criu(self, n: int) -> bytes:
        """Up to `n` bytes from CRIU's page server, acknowledged at once: it writes an answer's
        header, then its pages, and its Nagle would wait for a delayed ACK (40 ms an answer)."""
        assert self.criu is not None
        chunk = self.criu.recv(n)
        self.criu.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return chunk


def _shut(sk: socket.socket) -> None:
    try:
        sk.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sk.close()


# -- destination ------------------------------------------------------------------------------


class Replayer:
    """The destination's end (see the module's docstring). `dial` starts a link (its stdin
    and stdout pipes, the secret already sent); `say` reports to the keeper's status."""

    def __init__(
        self, dial: Callable[[], subprocess.Popen[bytes]], redial_s: float, say: Callable[..., None],
        decoder: page_basis.Decoder | None = None,
    ) -> None:
        self.dial, self.redial_s, self.say = dial, redial_s, say
        self.decoder = decoder or page_basis.Decoder(None)  # hybrid's answers: pages by reference
        self.lock = threading.Condition()
        self.unanswered: collections.deque[bytes] = collections.deque()
        self.link: subprocess.Popen[bytes] | None = None
        self.daemon_done = False  # the daemon closed its side
        self.received = 0  # bytes of answers read from the link
        self.redials = 0

    def run(self, daemon: socket.socket, link: subprocess.Popen[bytes]) -> None:
        """Relay until the daemon has its last answer, or the link is gone for good (then the
        daemon's connection is closed: it fails, and the keeper's guard acts)."""
        daemon.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.link = link
        threading.Thread(target=self._requests, args=(daemon,), name="replayer-requests", daemon=True).start()
        try:
            if _greeted(link, HELLO_TIMEOUT) or self._redial("the source's end never answered"):
                self._answers(daemon)
        finally:
            _shut(daemon)
            with self.lock:
                if self.link is not None:
                    _end_link(self.link)

    def _requests(self, daemon: socket.socket) -> None:
        while True:
            try:
                request = read_exact(daemon.recv, IOV.size)
            except LinkBroken:
                break
            with self.lock:
                self.unanswered.append(request)
                self._send(request)
                self.lock.notify_all()
        with self.lock:
            self.daemon_done = True
            self.lock.notify_all()

    def _send(self, request: bytes) -> None:
        """To the current link; a broken one is noticed (and re-dialled) by the answers' side."""
        assert self.link is not None and self.link.stdin is not None
        try:
            self.link.stdin.write(request)
            self.link.stdin.flush()
        except (OSError, ValueError):  # broken, or already ended by _redial: the request is sent again
            pass

    def _answers(self, daemon: socket.socket) -> None:
        while True:
            with self.lock:
                while not self.unanswered and not self.daemon_done:
                    self.lock.wait()
                if not self.unanswered:
                    return  # the daemon is done and has every answer
                request, link = self.unanswered[0], self.link
            assert link is not None and link.stdout is not None
            read = functools.partial(os.read, link.stdout.fileno())
            try:
                if closing(request):
                    answer = read_exact(read, STATUS_SIZE)
                    wire = len(answer)
                else:
                    answer, wire = self.decoder.read_answer(read, read_exact(read, IOV.size))
            except LinkBroken as e:
                if not self._redial(str(e)):
                    return
                continue
            except page_basis.BasisError as e:  # no page is ever made up: the post-copy fails
                log.error("a page answer from the source does not fit the basis: %s", e)
                self.say(link="broken", why=str(e))
                return
            try:
                daemon.sendall(answer)
            except OSError:
                return
            self.received += wire
            with self.lock:
                self.unanswered.popleft()
            if closing(request):
                return

    def _redial(self, why: str) -> bool:
        """Dial the link again until `redial_s` has passed, then send every unanswered request
        again. False when it did not come back."""
        log.warning("the page link broke (%s); dialling it again for %.0f s", why, self.redial_s)
        self.say(link="broken", why=why)
        with self.lock:
            assert self.link is not None
            _end_link(self.link)
        deadline = time.monotonic() + self.redial_s
        while time.monotonic() < deadline:
            link = self.dial()
            if not _greeted(link, min(HELLO_TIMEOUT, max(0.1, deadline - time.monotonic()))):
                _end_link(link)  # refused, failed, or no answer in time
                time.sleep(REDIAL_PAUSE)
                continue
            with self.lock:
                self.link = link
                for request in self.unanswered:
                    self._send(request)
            self.redials += 1
            log.info("the page link is back (dial %d); %d requests sent again", self.redials, len(self.unanswered))
            self.say(link="back", redials=self.redials)
            return True
        log.error("the page link did not come back within %.0f s", self.redial_s)
        return False


def _greeted(link: subprocess.Popen[bytes], timeout: float) -> bool:
    """Did the source's end of `link` say HELLO within `timeout`?"""
    assert link.stdout is not None
    fd, got = link.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while len(got) < len(HELLO):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False
        chunk = os.read(fd, len(HELLO) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == HELLO


def _end_link(link: subprocess.Popen[bytes]) -> None:
    if link.poll() is None:
        link.kill()
    link.wait()
    for pipe in (link.stdin, link.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
