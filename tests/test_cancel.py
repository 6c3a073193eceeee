"""The abort's two halves without the lab: the migration's cancellation (one atomic
commit point, long waits ended) and Ctrl-C on `phaul migrate` (a real SIGINT to this
process; a scripted agent stands in for the source agent's stream)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from phaul.errors import Conflict, ExitCode
from phaul.fleet.controls import LeftRunning, migrate_events
from phaul.migration.cancel import Aborted, Cancellation
from phaul.rpc import phaul_pb2 as pb


def test_an_abort_before_the_commit_is_taken_once_and_stops_the_commit() -> None:
    c = Cancellation()
    c.check()  # nothing asked
    taken: list[str] = []
    c.request("admin", "too late", lambda: taken.append("journaled"))
    c.request("other", "too late", lambda: taken.append("again"))
    assert taken == ["journaled"] and c.requested_by == "admin"
    with pytest.raises(Aborted, match="aborted by admin"):
        c.check()
    with pytest.raises(Aborted):
        c.commit_point()


def test_an_abort_after_the_commit_is_refused_with_the_reason() -> None:
    c = Cancellation()
    c.commit_point()
    with pytest.raises(Conflict, match="already committed") as e:
        c.request("admin", "already committed: web runs on beta", lambda: None)
    assert e.value.exit_code == ExitCode.REFUSED and "phaul migrate" in e.value.hint
    c.check()  # committed: nothing to roll back
    assert c.requested_by == ""


def test_an_abort_ends_the_wait_for_a_process() -> None:
    c = Cancellation()
    with subprocess.Popen(["sleep", "60"]) as proc:
        with c.interruptible(proc):
            threading.Timer(0.2, c.request, args=("admin", "", lambda: None)).start()
            assert proc.wait(timeout=30) == -signal.SIGKILL
    with subprocess.Popen(["sleep", "60"]) as late:  # asked before: killed at once
        c.watch(late)
        assert late.wait(timeout=30) == -signal.SIGKILL
    with pytest.raises(Aborted):
        c.sleep(60)


class _Agent:
    """Migrate's stream: one progress event, then, once an abort was asked, the report."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.requests: list[Any] = []

    def stream(self, method: str, request: Any, timeout: float | None = None) -> Iterator[Any]:
        yield pb.MigrateEvent(progress=pb.Progress(phase="precopy", message="round 1"))
        self.asked.wait(30)
        yield pb.MigrateEvent(report=pb.Report(migration_id="m1", result="rolled_back", aborted_by="admin (Ctrl-C)"))

    def call(self, method: str, request: Any, timeout: float = 60.0) -> Any:
        assert method == "AbortMigration"
        self.requests.append(request)
        self.asked.set()
        return pb.AbortReply(migration_id="m1", ct=request.ct, destination="beta", step="precopy")


def test_ctrl_c_on_migrate_asks_the_abort_and_waits_for_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    handler = signal.getsignal(signal.SIGINT)
    agent = _Agent()
    events = migrate_events(agent, pb.MigrateRequest(ct_id="web"), "alpha")  # type: ignore[arg-type]
    seen = [next(events)]
    os.kill(os.getpid(), signal.SIGINT)  # counted by migrate_events, suspended inside it (this is the main thread)
    seen += list(events)
    assert [r.ct for r in agent.requests] == ["web"]
    assert seen[-1].report.result == "rolled_back"
    assert "aborting the migration of web" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler  # put back


def test_a_second_ctrl_c_leaves_it_running_and_says_how_to_follow_it() -> None:
    events = migrate_events(_Never(), pb.MigrateRequest(ct_id="web"), "alpha")  # type: ignore[arg-type]
    next(events)
    os.kill(os.getpid(), signal.SIGINT)
    threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(LeftRunning) as e:
        list(events)
    assert e.value.exit_code == ExitCode.IN_DOUBT
    assert "migrations --follow m1" in e.value.hint and "abort m1" in e.value.hint


class _Never(_Agent):
    """Its report never comes."""

    def stream(self, method: str, request: Any, timeout: float | None = None) -> Iterator[Any]:
        yield pb.MigrateEvent(progress=pb.Progress(phase="dump", message="freezing"))
        threading.Event().wait(5)
