"""The migration journal and the commit gate's own time limit (no lab needed)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from phaul.linux import criu
from phaul.errors import InvalidInput, NotFound
from phaul.migration.journal import Journal


def test_records_fold_into_an_entry(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.begin("m1", "source", "web", "beta", "10.0.0.12:7473")
    for step in ("preflight", "dump", "transfer", "restore", "commit"):
        j.record("m1", "source", step)
    e = j.get("m1")
    assert (e.role, e.ct, e.peer, e.peer_address) == ("source", "web", "beta", "10.0.0.12:7473")
    assert e.step == "commit" and e.reached("dump") and not e.settled and e.result == ""
    assert [x.migration_id for x in j.unsettled()] == ["m1"]
    j.mark_in_doubt("m1", "source", "beta unreachable")
    assert j.get("m1").result == "in_doubt" and not j.get("m1").settled
    j.record("m1", "source", "resume")  # settling again
    assert j.get("m1").result == ""
    j.settle("m1", "source", "ok")
    e = j.get("m1")
    assert e.settled and e.result == "ok" and j.unsettled() == []
    assert e.steps == ["begin", "preflight", "dump", "transfer", "restore", "commit", "in_doubt", "resume", "ok"]


def test_each_record_is_one_durable_json_line(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.begin("m2", "destination", "web", "alpha")
    j.record("m2", "destination", "restore", placed=True)
    lines = j.path("m2", "destination").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == ["begin", "restore"]
    assert json.loads(lines[1])["placed"] is True and "ts" in json.loads(lines[1])
    assert oct(j.path("m2", "destination").stat().st_mode & 0o777) == "0o600"


def test_a_torn_last_record_is_ignored(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.begin("m3", "source", "web", "beta")
    j.record("m3", "source", "dump")
    with open(j.path("m3", "source"), "ab") as f:
        f.write(b'{"step": "transf')  # the agent died while writing
    e = j.get("m3")
    assert e.step == "dump" and not e.settled


def test_begin_twice_and_unknown_migrations_are_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.begin("m4", "source", "web", "beta")
    with pytest.raises(FileExistsError):
        j.begin("m4", "source", "web", "beta")
    with pytest.raises(NotFound):
        j.record("nosuch", "source", "dump")
    with pytest.raises(NotFound):
        j.get("nosuch")
    for bad in ("../x", "/etc/passwd", "a/b", ""):
        with pytest.raises(InvalidInput):
            j.record(bad, "source", "dump")
    with pytest.raises(InvalidInput):
        j.settle("m4", "source", "maybe")


def test_prune_keeps_unsettled_and_the_newest(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    for i in range(5):
        j.begin(f"p{i}", "source", "web", "beta")
        if i != 2:
            j.settle(f"p{i}", "source", "ok")
        time.sleep(0.002)
    assert j.prune(keep=2) == 2
    assert sorted(e.migration_id for e in j.entries()) == ["p2", "p3", "p4"]


def _run_gate(gate: criu.CommitGate) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(gate.script)], env={**os.environ, "CRTOOLS_SCRIPT_ACTION": "post-dump"})
    deadline = time.monotonic() + 5
    while not gate.waiting():
        assert time.monotonic() < deadline, "the gate script never waited"
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize("commit", [True, False])
def test_gate_acknowledges_the_verdict(tmp_path: Path, commit: bool) -> None:
    gate = criu.CommitGate(tmp_path / "gate", timeout=30)
    proc = _run_gate(gate)
    assert gate.verdict() is None
    assert gate.release(commit)
    assert proc.wait(5) == (0 if commit else 1)  # CRIU: 0 kills the dumped tree, non-zero resumes it
    assert gate.verdict() == ("commit" if commit else "abort") and not gate.waiting()


def test_gate_gives_up_and_resumes_when_nobody_decides(tmp_path: Path) -> None:
    gate = criu.CommitGate(tmp_path / "gate", timeout=1)
    proc = _run_gate(gate)
    attached = criu.CommitGate.attach(tmp_path / "gate")  # what a restarted agent sees
    assert attached.waiting()
    assert proc.wait(5) == 1  # a stalled gate rolls back
    assert attached.verdict() == "" and not attached.waiting()
    assert not attached.release(commit=True, timeout=0.2)  # too late to commit
