"""The uffd guard of a lazy restore: missing pages never read as zeros.

CRIU's restored tasks hand their userfaultfds to the lazy-pages daemon and
close their own copies (criu/pie/restorer.c), so the daemon holds the only
ones. Were it to die, the kernel would release them, unregister the lazy
ranges, and fill every later fault on a page never fetched with zeros
(docs/notes/postcopy.md). The guard takes a duplicate of each of the daemon's
userfaultfds (pidfd_getfd), so the daemon's death cannot release them:
faulting threads wait in the kernel. It watches the daemon's pidfd; if the
daemon exits before `finish()` says every page arrived, `on_loss` runs (the
caller kills the container) before the guard lets go of its duplicates.

x86-64 system call numbers; `available()` says whether this kernel has what
the guard needs (pidfd_open, pidfd_getfd, kcmp).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_NR_PIDFD_GETFD, _NR_KCMP = 438, 312
_KCMP_FILE = 0
_UFFD_LINK = "anon_inode:[userfaultfd]"
_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(nr: int, *args: int) -> int:
    ret = _libc.syscall(nr, *(ctypes.c_long(a) for a in args))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(ret)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A duplicate, in this process, of descriptor `fd` of the process behind `pidfd`."""
    return _syscall(_NR_PIDFD_GETFD, pidfd, fd, 0)


def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """kcmp(KCMP_FILE): do the two descriptors name one open file?"""
    return _syscall(_NR_KCMP, pid1, pid2, _KCMP_FILE, fd1, fd2) == 0


def available() -> tuple[bool, str]:
    """Whether this kernel lets the guard work (a probe on this process itself)."""
    try:
        pidfd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError) as e:
        return False, f"pidfd_open: {e}"
    try:
        dup = pidfd_getfd(pidfd, pidfd)
        try:
            if not same_file(os.getpid(), dup, os.getpid(), pidfd):
                return False, "kcmp does not see a duplicate as the same file"
        finally:
            os.close(dup)
    except OSError as e:
        return False, f"pidfd_getfd/kcmp: {e.strerror} (Linux >= 5.6 with CONFIG_KCMP)"
    finally:
        os.close(pidfd)
    return True, "pidfd_getfd and kcmp work"


class UffdGuard:
    """Duplicates of daemon `pid`'s userfaultfds, held until `finish()` or its loss."""

    def __init__(
        self, pid: int, on_loss: Callable[[], None], proc: Path = Path("/proc"),
        completed: Callable[[], bool] = lambda: False,
    ) -> None:
        self.pid = pid
        self.on_loss = on_loss
        self.completed = completed  # asked when the daemon has ended: did it finish (its parent knows)?
        self.proc = proc
        self.pidfd = os.pidfd_open(pid)
        self.held: list[int] = []  # our duplicates
        self._of: dict[int, int] = {}  # the daemon's fd -> our duplicate of what it named
        self.finished = False
        self.lost = False
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, name=f"uffd-guard-{pid}", daemon=True)
        self._thread.start()

    def grab(self) -> int:
        """Take a duplicate of every userfaultfd the daemon holds now that is not held yet
        (call it after the restore handed them over, and after forks); returns how many are held."""
        fd_dir = self.proc / str(self.pid) / "fd"
        with self._lock:
            entries = os.listdir(fd_dir)
            for entry in entries:
                n = int(entry)
                try:
                    if os.readlink(fd_dir / entry) != _UFFD_LINK:
                        continue
                except OSError:
                    continue  # closed meanwhile
                mine = self._of.get(n)
                if mine is not None and same_file(os.getpid(), mine, self.pid, n):
                    continue  # held
                if mine is not None:
                    self._release(mine)  # the number now names another uffd: the old one was closed
                self._of[n] = pidfd_getfd(self.pidfd, n)
                self.held.append(self._of[n])
            if entries:  # the daemon's descriptor table is in place: it is alive, not exiting
                for n in [n for n in self._of if str(n) not in entries]:
                    self._release(self._of.pop(n))
            return len(self.held)

    def _release(self, mine: int) -> None:
        """Let go of a duplicate whose original the daemon closed itself: CRIU does so when
        the task's pages are all in place or the task is gone (`lpi_fini`, `handle_exit`).
        Held on, that uffd would keep its task's non-cooperative events (fork, munmap,
        madvise) waiting for a reader that is no more: the task hangs (issue 12: a
        container that forks during post-copy). A daemon that dies closes its whole
        descriptor table at once (the listing is then empty), never one descriptor."""
        self.held.remove(mine)
        os.close(mine)

    def finish(self) -> None:
        """Every page arrived: the daemon may end, the duplicates go."""
        with self._lock:
            self.finished = True
            if self.held or self._thread.is_alive():
                os.write(self._stop_w, b"x")
        self._thread.join()

    def wait(self) -> None:
        """Until the guard has ended (after the daemon's end: the loss handled, the duplicates gone)."""
        self._thread.join()

    def _watch(self) -> None:
        ready, _, _ = select.select([self.pidfd, self._stop_r], [], [])
        with self._lock:
            if self.pidfd in ready and not self.finished and not self.completed():
                self.lost = True
                log.error("lazy-pages daemon %d ended before every page arrived: the container is killed", self.pid)
                try:
                    self.on_loss()
                except Exception:  # the duplicates stay held: faulting tasks wait rather than read zeros
                    log.exception("killing the container after the loss of its page handler failed; its uffds stay held")
                    return
            for fd in self.held:
                os.close(fd)
            self.held.clear()
            self._of.clear()
            for fd in (self.pidfd, self._stop_r, self._stop_w):
                try:
                    os.close(fd)
                except OSError as e:
                    if e.errno != errno.EBADF:
                        raise
