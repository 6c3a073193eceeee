"""Aborting a running migration: one `Cancellation` per migration, shared by the
agent (which asks) and the migration's thread (which checks).

The commit point is one atomic decision: `request` and `commit_point` take the
same lock, so an abort is either taken before the commit (the migration rolls
back through phaul.migration.failure, the one rollback path) or refused after
it with the reason. The migration checks at every step boundary (`check`);
the long waits between boundaries end early: a subprocess it runs under
`interruptible` (rsync pushes: pre-copy rounds, the file system syncs, the
final transfer) is killed, and `sleep` wakes. A running CRIU dump is never
killed: it reaches its gate within the dump timeout, and the boundary after
it rolls back (the gate releases the frozen container uncommitted).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator

from phaul.errors import Conflict, PhaulError

log = logging.getLogger(__name__)

Popen = subprocess.Popen[bytes] | subprocess.Popen[str]


class Aborted(PhaulError):
    """The migration was aborted on request; it rolls back."""


class Cancellation:
    """Whether (and by whom) a migration was asked to abort, and whether it is past its commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._by = ""
        self._committed = False
        self._procs: set[Popen] = set()

    @property
    def requested_by(self) -> str:
        """Who asked to abort ("" when nobody did)."""
        return self._by

    def request(self, by: str, refusal: str, taken: Callable[[], None]) -> None:
        """Ask the migration to abort; raises Conflict(`refusal`) once it has committed.
        `taken` runs (under the lock: the commit waits) when the abort is taken first.
        Interrupts what it waits for now. Asking twice is asking once."""
        with self._lock:
            if self._committed:
                raise Conflict(refusal, "use `phaul migrate` to move the container back")
            if not self._by:
                taken()
                self._by = by
            self._event.set()
            procs = list(self._procs)
        for proc in procs:
            _kill(proc)

    def check(self) -> None:
        """At a step boundary: raises Aborted when an abort was asked (before the commit)."""
        if self._event.is_set() and not self._committed:
            raise Aborted(f"aborted by {self._by}", "the container runs on its source host again")

    def commit_point(self) -> None:
        """The commit: after this no abort is taken. Raises Aborted if one was asked first."""
        with self._lock:
            self.check()
            self._committed = True

    def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less if an abort is asked meanwhile (then raises Aborted)."""
        self._event.wait(seconds)
        self.check()

    def watch(self, proc: Popen) -> None:
        """An abort (before the commit) kills `proc`; at once if it came before."""
        with self._lock:
            self._procs.add(proc)
            asked = self._event.is_set() and not self._committed
        if asked:
            _kill(proc)

    @contextlib.contextmanager
    def interruptible(self, proc: Popen) -> Iterator[None]:
        """`watch` `proc` while the block runs (the caller then sees it fail and the
        next `check` raises)."""
        self.watch(proc)
        try:
            yield
        finally:
            with self._lock:
                self._procs.discard(proc)


def _kill(proc: Popen) -> None:
    if proc.poll() is None:
        log.info("abort: ending pid %d", proc.pid)
        with contextlib.suppress(OSError):
            proc.kill()

