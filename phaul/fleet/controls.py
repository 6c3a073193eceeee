"""The CLI's side of controlling running migrations: Ctrl-C on `phaul migrate`
(abort, then wait for the outcome; a second Ctrl-C leaves it running), following
one's progress, and finding the source host of a migration ID.

Migrate's stream is read in a thread and SIGINT only counts presses, so the
stream (and the report it ends with) is never lost to a KeyboardInterrupt.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

from phaul.channels import messages
from phaul.channels.client import Agent
from phaul.errors import Conflict, InDoubt, NotFound, PhaulError
from phaul.migration.report import Report
from phaul.rpc import phaul_pb2 as pb

log = logging.getLogger(__name__)

POLL = 0.1  # s: how often the waiting CLI looks at Ctrl-C presses
ABORT_RETRY = 0.5  # s: an abort asked before the agent registered the migration is asked again


class LeftRunning(InDoubt):
    """The user pressed Ctrl-C twice: the migration goes on without this CLI."""


class Presses:
    """Counts SIGINT (Ctrl-C) while in effect, instead of raising KeyboardInterrupt
    (main thread only; elsewhere nothing is counted)."""

    def __init__(self) -> None:
        self.count = 0
        self._old: object = None

    def _press(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def __enter__(self) -> Presses:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._press)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)  # type: ignore[arg-type]


def migrate_events(agent: Agent, request: pb.MigrateRequest, host: str) -> Iterator[pb.MigrateEvent]:
    """Migrate's events, progress then the report. The first Ctrl-C asks the agent to abort
    the migration of `request.ct_id` (the events go on: the report says how it ended);
    the second raises LeftRunning, the migration going on."""
    events: queue.Queue[pb.MigrateEvent | PhaulError | None] = queue.Queue()

    def read() -> None:
        try:
            for event in agent.stream("Migrate", request):
                events.put(event)
            events.put(None)
        except PhaulError as e:
            events.put(e)

    threading.Thread(target=read, name="migrate-stream", daemon=True).start()
    abort = _AbortAsker(agent, request.ct_id, host)
    with Presses() as presses:
        while True:
            if presses.count >= 2:
                raise abort.left_running()
            if presses.count == 1:
                abort.ask()
            try:
                item = events.get(timeout=POLL)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, PhaulError):
                raise item
            yield item


class _AbortAsker:
    """Asks the agent, once, to abort the running migration of container `ct`."""

    def __init__(self, agent: Agent, ct: str, host: str) -> None:
        self.agent, self.ct, self.host = agent, ct, host
        self.migration_id = ""
        self.done = False
        self._next = 0.0

    def ask(self) -> None:
        if self.done or time.monotonic() < self._next:
            return
        if not self._next:
            print(f"phaul: aborting the migration of {self.ct} (Ctrl-C again leaves it running)", file=sys.stderr, flush=True)
        self._next = time.monotonic() + ABORT_RETRY
        try:
            reply = self.agent.call("AbortMigration", pb.AbortRequest(ct=self.ct), timeout=10)
        except NotFound:
            return  # not registered yet (or already ended): asked again shortly
        except Conflict as e:
            print(f"phaul: {e.message}; waiting for it to finish", file=sys.stderr, flush=True)
        except PhaulError as e:
            print(f"phaul: the abort could not be asked ({e.message}); waiting for the outcome", file=sys.stderr, flush=True)
        else:
            self.migration_id = reply.migration_id
            print(f"phaul: abort of migration {reply.migration_id} asked at step {reply.step}; waiting for the rollback",
                  file=sys.stderr, flush=True)
        self.done = True

    def left_running(self) -> LeftRunning:
        mid = self.migration_id or "MIGRATION-ID"
        return LeftRunning(
            f"left the migration of {self.ct} running on {self.host}",
            f"follow it: `phaul --host {self.host} migrations --follow {self.migration_id}`; "
            f"abort it: `phaul --host {self.host} abort {mid}`",
        )


def follow(agent: Agent, migration_id: str, show: Callable[[pb.FollowEvent], None] | None = None) -> Report | None:
    """Follow a migration (the one running, when `migration_id` is ""), each event to `show`,
    until its end; its report, or None when the stream ended without one."""
    report = None
    for event in agent.stream("FollowMigration", pb.FollowRequest(migration_id=migration_id)):
        if show is not None:
            show(event)
        if event.HasField("report"):
            report = messages.report_from_proto(event.report)
    return report


def source_of(agents: dict[str, Agent], migration_id: str) -> str | None:
    """The host among `agents` whose journal has `migration_id` as its source (unreachable ones skipped)."""
    for name, agent in agents.items():
        try:
            records = agent.call("ListMigrations", pb.Empty(), timeout=5).migrations
        except PhaulError as e:
            log.info("looking for migration %s: %s: %s", migration_id, name, e.message)
            continue
        if any(r.migration_id == migration_id and r.role == "source" for r in records):
            return name
    return None
