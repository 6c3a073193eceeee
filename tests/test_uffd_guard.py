"""phaul.memory.uffd_guard with a real userfaultfd, as CRIU's lazy restore arranges it:
a "task" registers a lazy page, hands the uffd to a "daemon" and closes its own copy.
Without the guard the daemon's death turns the missing page into zeros (the hazard,
shown so the test can fail); with it the task waits in its fault and is killed, never
reading a zero."""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from conftest import wait_for
from phaul.memory import uffd_guard

# The task: a userfaultfd over one anonymous page, registered for missing pages, sent
# over the socket whose fd is argv[1] (SCM_RIGHTS) and closed; then, at a line on stdin, it reads the page.
TASK = textwrap.dedent("""
    import ctypes, fcntl, mmap, os, socket, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    uffd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
    assert uffd >= 0, ctypes.get_errno()
    fcntl.ioctl(uffd, 0xc018aa3f, struct.pack("QQQ", 0xAA, 0, 0))          # UFFDIO_API
    page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fcntl.ioctl(uffd, 0xc020aa00, struct.pack("QQQQ", addr, mmap.PAGESIZE, 1, 0))  # UFFDIO_REGISTER, MISSING
    sk = socket.socket(fileno=int(sys.argv[1]))
    sk.sendmsg([b"u"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", uffd))])
    os.close(uffd)  # as CRIU's restorer does: the daemon holds the only copy
    print("ready", flush=True)
    sys.stdin.readline()
    print("read", page[0], flush=True)
""")


def _task_and_daemon() -> tuple[subprocess.Popen[str], subprocess.Popen[bytes]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    task = subprocess.Popen([sys.executable, "-c", TASK, str(theirs.fileno())], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, pass_fds=(theirs.fileno(),))
    theirs.close()
    assert task.stdout is not None and task.stdout.readline().strip() == "ready"
    fds = array.array("i")
    _, anc, _, _ = ours.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
    uffd = struct.unpack("i", anc[0][2][:4])[0]
    ours.close()
    # the daemon: holds the uffd (inherited) and waits, as CRIU's lazy-pages would between faults
    daemon = subprocess.Popen(["sleep", "600"], pass_fds=(uffd,))
    os.close(uffd)
    wait_for(lambda: _holds_uffd(daemon.pid), what="the daemon to hold the uffd")
    return task, daemon


def _holds_uffd(pid: int) -> bool:
    """Whether `pid` holds a userfaultfd (its descriptors change while it execs: one listed may be gone)."""
    for n in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/fd/{n}") == "anon_inode:[userfaultfd]":
                return True
    return False


@pytest.fixture
def pair() -> Iterator[tuple[subprocess.Popen[str], subprocess.Popen[bytes]]]:
    task, daemon = _task_and_daemon()
    try:
        yield task, daemon
    finally:
        for p in (task, daemon):
            p.kill()
            p.wait()


def test_the_kernel_has_what_the_guard_needs() -> None:
    ok, why = uffd_guard.available()
    assert ok, why


def test_without_a_guard_the_daemon_s_death_reads_zeros(pair) -> None:  # type: ignore[no-untyped-def]
    task, daemon = pair
    daemon.kill()
    daemon.wait()
    out, _ = task.communicate("go\n", timeout=10)
    assert out.split() == ["read", "0"]  # the hazard the guard exists for


def test_with_the_guard_the_task_waits_and_is_killed(pair) -> None:  # type: ignore[no-untyped-def]
    task, daemon = pair
    lost: list[float] = []

    def kill_container() -> None:
        lost.append(time.monotonic())
        task.kill()

    guard = uffd_guard.UffdGuard(daemon.pid, kill_container)
    assert guard.grab() == 1 and guard.grab() == 1  # one uffd, taken once
    assert task.stdin is not None and task.stdout is not None
    task.stdin.write("go\n")
    task.stdin.flush()
    time.sleep(0.3)
    assert task.poll() is None, "the task read the missing page while the daemon lived"
    daemon.kill()
    daemon.wait()
    assert task.wait(timeout=10) == -signal.SIGKILL
    assert task.stdout.read() == "", "the task read a page that never arrived"
    assert guard.lost and lost and not guard.held


def test_finish_lets_the_daemon_end_quietly(pair) -> None:  # type: ignore[no-untyped-def]
    task, daemon = pair
    guard = uffd_guard.UffdGuard(daemon.pid, lambda: pytest.fail("on_loss after finish"))
    guard.grab()
    guard.finish()
    daemon.kill()
    daemon.wait()
    assert not guard.lost and not guard.held and task.poll() is None



def test_a_uffd_the_daemon_closes_itself_is_let_go(pair) -> None:  # type: ignore[no-untyped-def]
    """CRIU's daemon closes a task's uffd once its pages are all in place (or it is gone);
    a duplicate held on past that would keep the task's events (a fork) waiting for ever
    (issue 12). The guard lets go of it at its next look; the kernel then unregisters."""
    task, sleeper = pair
    # a daemon that can close its uffd while it lives: it takes the sleeper's
    guard0 = uffd_guard.UffdGuard(sleeper.pid, lambda: None, completed=lambda: True)
    guard0.grab()
    uffd = guard0.held[0]
    daemon = subprocess.Popen(
        [sys.executable, "-c", f"import os, sys; sys.stdin.readline(); os.close({uffd}); sys.stdin.readline()"],
        stdin=subprocess.PIPE, pass_fds=(uffd,),
    )
    guard0.finish()
    sleeper.kill()
    sleeper.wait()
    try:
        wait_for(lambda: _holds_uffd(daemon.pid), what="the daemon to hold the uffd")
        guard = uffd_guard.UffdGuard(daemon.pid, lambda: pytest.fail("on_loss of a daemon that lives"))
        assert guard.grab() == 1
        assert daemon.stdin is not None
        daemon.stdin.write(b"close\n")
        daemon.stdin.flush()
        wait_for(lambda: not _holds_uffd(daemon.pid), what="the daemon to close its uffd")
        assert guard.grab() == 0 and not guard.held
        out, _ = task.communicate("go\n", timeout=10)  # released: the kernel no longer holds its fault
        assert out.split() == ["read", "0"]
        guard.finish()
    finally:
        daemon.kill()
        daemon.wait()
