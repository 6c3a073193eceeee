"""The byte quota of an incoming migration, enforced by the receiver.

A source declares how much it will write (`PrepareRequest.need_bytes`: its
container's files and memory); the destination lets the migration write that
times `Limits.quota_factor` plus `Limits.quota_extra`, and never beyond
`Limits.disk_reserve` of free space in its state directory's file system.
`QuotaWatch` measures the peer-writable tree (blocks really allocated, each
inode once, nothing followed) every few seconds while the data channel is
open, and once more, exactly, after the channel is sealed and before anything
reads what arrived. Over quota, the migration is cut off (`on_exceeded`): its
channel closed, every later call refused, and it is removed as on an abort.
Between two measurements a peer can overrun by at most what its link carries
in one interval; the free-space floor keeps the host's disk usable meanwhile.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import Busy

log = logging.getLogger(__name__)

MIN_INTERVAL = 1.0  # s between measurements, at least
COST_RATIO = 20  # ... and at least this many times what one measurement took


@dataclass
class Usage:
    used: int  # bytes allocated in the tree
    free: int  # bytes free for unprivileged use in its file system


def tree_bytes(root: Path) -> int:
    """Bytes allocated under `root` (st_blocks), each inode once, no link followed."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [os.fspath(root)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


def measure_free(path: Path) -> int:
    """Bytes free for unprivileged use in the file system of `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def measure(root: Path) -> Usage:
    return Usage(tree_bytes(root), measure_free(root))


class QuotaExceeded(Busy):
    """A migration wrote more than its quota, or its data would fill the host's disk."""


def check(usage: Usage, quota: int, reserve: int) -> None:
    """QuotaExceeded when `usage` is over `quota` or free space is under `reserve`."""
    if usage.used > quota:
        raise QuotaExceeded(
            f"the migration wrote {usage.used >> 20} MiB, over its quota of {quota >> 20} MiB",
            "the source declared less than it sent; check the container's size (it may have grown) and migrate again",
        )
    if usage.free < reserve:
        raise QuotaExceeded(
            f"the state directory's file system has {usage.free >> 20} MiB free, under the reserve of {reserve >> 20} MiB",
            "free space on the destination or migrate elsewhere",
        )


class QuotaWatch:
    """Measures `root` in a thread of its own until `stop`; calls `on_exceeded(error)`
    once when it goes over, and `on_growth()` whenever it grew since the last look."""

    def __init__(
        self, root: Path, quota: int, reserve: int, on_exceeded: Callable[[QuotaExceeded], None],
        on_growth: Callable[[], None] = lambda: None,
    ) -> None:
        self.root = root
        self.quota = quota
        self.reserve = reserve
        self.on_exceeded = on_exceeded
        self.on_growth = on_growth
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"quota-{root.parent.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def check_now(self) -> Usage:
        """Measure and check once; raises QuotaExceeded."""
        usage = measure(self.root)
        if usage.used > self.last:
            self.on_growth()
        self.last = usage.used
        check(usage, self.quota, self.reserve)
        return usage

    def _loop(self) -> None:
        interval = MIN_INTERVAL
        while not self._stop.wait(interval):
            t0 = time.monotonic()
            try:
                self.check_now()
            except QuotaExceeded as e:
                log.warning("%s: %s", self.root, e.message)
                self.on_exceeded(e)
                return
            except OSError as e:  # the directory went away: the migration ended
                log.debug("quota of %s: %s", self.root, e)
                return
            interval = max(MIN_INTERVAL, (time.monotonic() - t0) * COST_RATIO)
