"""The migrations this agent runs as their source, for the calls that control them
while they run: `AbortMigration` finds one by ID or container, `FollowMigration`
watches one's progress until its report.

Each entry keeps the last progress event and the bytes sent so far; a watcher
gets that first, then every later event, and the report last. Watchers that
fall behind lose intermediate progress, never the report.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phaul.rpc import phaul_pb2 as pb

if TYPE_CHECKING:
    from phaul.migration.source import SourceMigration

log = logging.getLogger(__name__)

WATCH_QUEUE = 256  # events a slow watcher may lag behind before progress is dropped for it
POLL = 1.0  # s: how often a watcher checks that its client is still there


@dataclass
class Running:
    """One running migration and what its watchers are told."""

    migration: SourceMigration
    last: pb.Progress | None = None
    total_bytes: int = 0
    report: pb.Report | None = None
    watchers: list[queue.Queue[pb.FollowEvent]] = field(default_factory=list)

    def event(self, progress: pb.Progress | None = None, report: pb.Report | None = None) -> pb.FollowEvent:
        m = self.migration
        return pb.FollowEvent(
            migration_id=m.id, ct=m.ct_id, source=m.host.name, destination=m.dest_name, progress=progress,
            total_bytes=self.total_bytes, report=report,
        )


class RunningMigrations:
    """Thread-safe registry of the running source migrations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Running] = {}

    def add(self, migration: SourceMigration) -> None:
        with self._lock:
            self._by_id[migration.id] = Running(migration)

    def publish(self, migration_id: str, progress: pb.Progress) -> None:
        """A progress event of a running migration: kept and passed to its watchers."""
        with self._lock:
            r = self._by_id.get(migration_id)
            if r is None:
                return
            # a round's figures, or what a phase reported sending (the file system pre-sync)
            r.total_bytes += progress.bytes_sent
            r.last = progress
            event = r.event(progress=progress)
            for q in r.watchers:
                try:
                    q.put_nowait(event)
                except queue.Full:
                    pass  # it sees the next one

    def end(self, migration_id: str, report: pb.Report) -> None:
        """The migration ended: its watchers get the report; it leaves the registry."""
        with self._lock:
            r = self._by_id.pop(migration_id, None)
            if r is None:
                return
            r.report = report
            event = r.event(report=report)
            for q in r.watchers:
                while True:
                    try:
                        q.put_nowait(event)
                        break
                    except queue.Full:  # the report is never dropped: drop the oldest progress instead
                        q.get_nowait()

    def get(self, migration_id: str) -> SourceMigration | None:
        with self._lock:
            r = self._by_id.get(migration_id)
            return r.migration if r is not None else None

    def of_ct(self, ct_id: str) -> SourceMigration | None:
        """The running migration of container `ct_id`, if any."""
        with self._lock:
            found = [r.migration for r in self._by_id.values() if r.migration.ct_id == ct_id]
        return found[-1] if found else None

    def newest(self) -> SourceMigration | None:
        with self._lock:
            return next(reversed(self._by_id.values())).migration if self._by_id else None

    def watch(self, migration_id: str, active: Callable[[], bool]) -> Iterator[pb.FollowEvent] | None:
        """The events of a running migration from now on, its last progress first and its
        report last; None when it does not run here. Ends early once `active()` is False."""
        q: queue.Queue[pb.FollowEvent] = queue.Queue(WATCH_QUEUE)
        with self._lock:
            r = self._by_id.get(migration_id)
            if r is None:
                return None
            r.watchers.append(q)
            first = r.event(progress=r.last) if r.last is not None else None
        return self._events(r, q, first, active)

    def _events(
        self, r: Running, q: queue.Queue[pb.FollowEvent], first: pb.FollowEvent | None, active: Callable[[], bool]
    ) -> Iterator[pb.FollowEvent]:
        try:
            if first is not None:
                yield first
            while active():
                try:
                    event = q.get(timeout=POLL)
                except queue.Empty:
                    continue
                yield event
                if event.HasField("report"):
                    return
        finally:
            with self._lock:
                if q in r.watchers:
                    r.watchers.remove(q)
