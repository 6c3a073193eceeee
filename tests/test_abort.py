"""Control of running migrations, for real in the lab: `phaul abort` at each step
before the commit rolls back (the counter keeps running on alpha with its memory,
nothing is left on beta), after the commit it is refused; Ctrl-C on `phaul migrate`
aborts, twice leaves it to the agent; `phaul migrations --follow` shows the
progress and the end; an abort ends a pre-copy round's transfer under way.

Migrations are held at a step boundary with the fault hook's `pause`
(phaul.testing.faults), as tests/test_faults.py does. One container serves every
case (each case leaves it running on alpha).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import REPO, Lab, wait_for
from faultlib import (
    counter_file,
    finish,
    leftovers,
    migrate_async,
    netns_processes,
    pause_marker,
    read_memory_mark,
    release,
    start_counter,
    wait_paused,
)

pytestmark = pytest.mark.lab

CT = "abortee"
BEFORE_COMMIT = ("preflight", "fs-presync", "precopy", "precopy-2", "dump", "transfer", "restore", "commit")


@pytest.fixture(scope="module")
def counter(lab: Lab) -> Iterator[str]:
    """The counter on alpha and the value it keeps in memory."""
    try:
        yield start_counter(lab, CT)
    finally:
        lab.disarm_faults()
        for host in ("alpha", "beta"):
            pause_marker(lab, host).unlink(missing_ok=True)
            lab.phaul("--host", host, "recover", check=False, timeout=600)
        lab.destroy_all()


def _cli(lab: Lab, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(lab.hosts_file), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _journal(lab: Lab, mid: str) -> list[dict]:
    path = lab.state_dir("alpha") / "journal" / f"source-{mid}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _abort_taken(lab: Lab, mid: str) -> None:
    wait_for(lambda: any(r["step"] == "abort-requested" for r in _journal(lab, mid)), timeout=60,
             what=f"alpha to take the abort of {mid}")


def _rolled_back(lab: Lab, mark: str, report: dict) -> None:
    """The report says aborted and rolled back; the same counter runs on alpha; beta holds nothing."""
    assert report["result"] == "rolled_back", report
    assert report["aborted_by"].startswith("admin ("), report
    assert "aborted by admin" in report["error"], report
    before = counter_file(lab, "alpha", CT)
    wait_for(lambda: counter_file(lab, "alpha", CT) > before, what="the counter to go on on alpha")
    assert read_memory_mark(lab, "alpha", CT) == mark, "not the same processes: their memory changed"
    wait_for(lambda: not leftovers(lab, "beta") and not leftovers(lab, "alpha", keep_ct=CT), timeout=30,
             what=f"nothing left: beta {leftovers(lab, 'beta')}, alpha {leftovers(lab, 'alpha', keep_ct=CT)}")
    mid = report["migration_id"]
    rows = json.loads(lab.phaul("--host", "alpha", "migrations", "--json").stdout)["migrations"]
    assert [r["state"] for r in rows if r["migration_id"] == mid] == ["rolled_back"]


@pytest.mark.parametrize("step", BEFORE_COMMIT)
def test_abort_before_the_commit_rolls_back(lab: Lab, counter: str, step: str) -> None:
    method = "stop-and-copy" if step == "fs-presync" else "precopy"
    migrate = migrate_async(lab, CT, "alpha", "beta", "--method", method, fault=f"{step}:pause")
    mid, at = wait_paused(lab, "alpha", migrate)
    assert at == step
    abort = _cli(lab, "abort", mid, "--json")  # finds alpha from the ID; waits for the rollback
    _abort_taken(lab, mid)
    release(lab, "alpha")
    out, err = abort.communicate(timeout=240)
    assert abort.returncode == 0, (out, err)
    shown = json.loads(out)
    assert (shown["migration_id"], shown["step"], shown["result"]) == (mid, step, "rolled_back")
    report = finish(migrate)
    assert migrate.returncode == 1, report
    _rolled_back(lab, counter, report)


def test_abort_after_the_commit_is_refused_and_unknown_ids_named(lab: Lab, counter: str) -> None:
    migrate = migrate_async(lab, CT, "alpha", "beta", "--method", "precopy", fault="cleanup:pause")
    mid, _ = wait_paused(lab, "alpha", migrate)
    refused = lab.phaul("--host", "alpha", "abort", mid, check=False)
    release(lab, "alpha")
    assert refused.returncode == 2, refused
    assert f"already committed: {CT} runs on beta" in refused.stderr and "phaul migrate" in refused.stderr, refused.stderr
    report = finish(migrate)
    assert report["result"] == "ok" and not report["aborted_by"], report
    ended = lab.phaul("--host", "alpha", "abort", mid, check=False)
    assert ended.returncode == 2 and "already ended" in ended.stderr, ended.stderr
    on_dest = lab.phaul("--host", "beta", "abort", mid, check=False)
    assert on_dest.returncode == 2 and f"phaul --host alpha abort {mid}" in on_dest.stderr, on_dest.stderr
    unknown = lab.phaul("--host", "alpha", "abort", "0123456789ab", check=False)
    assert unknown.returncode == 2 and "no migration 0123456789ab" in unknown.stderr, unknown.stderr
    lab.migrate(CT, "beta", "alpha")  # back, for the next cases


def test_ctrl_c_on_migrate_aborts(lab: Lab, counter: str) -> None:
    migrate = migrate_async(lab, CT, "alpha", "beta", "--method", "precopy", fault="dump:pause")
    mid, _ = wait_paused(lab, "alpha", migrate)
    migrate.send_signal(signal.SIGINT)
    _abort_taken(lab, mid)
    release(lab, "alpha")
    report = finish(migrate)
    assert migrate.returncode == 1, report
    assert "Ctrl-C" in report["aborted_by"], report
    _rolled_back(lab, counter, report)


def test_follow_and_ctrl_c_twice(lab: Lab, counter: str) -> None:
    """Held after pre-copy round 1: `--follow` shows that round's figures; Ctrl-C twice on
    migrate leaves the (aborting) migration to the agent and says how to follow it;
    the follower sees its end."""
    migrate = migrate_async(lab, CT, "alpha", "beta", "--method", "precopy", fault="precopy-2:pause")
    mid, _ = wait_paused(lab, "alpha", migrate)
    follow = _cli(lab, "--host", "alpha", "migrations", "--follow", "--json")  # the one running
    assert follow.stdout is not None
    first = json.loads(follow.stdout.readline())
    assert (first["migration_id"], first["event"], first["phase"], first["round"]) == (mid, "progress", "precopy", 1)
    assert first["bytes_sent"] > 0 and first["total_bytes"] >= first["bytes_sent"] and first["rate"] > 0
    assert first["predicted_pause_ms"] > 0
    migrate.send_signal(signal.SIGINT)
    _abort_taken(lab, mid)
    migrate.send_signal(signal.SIGINT)
    _, err = migrate.communicate(timeout=60)
    assert migrate.returncode == 3, err
    assert f"migrations --follow {mid}" in err and f"abort {mid}" in err, err
    release(lab, "alpha")
    out, err = follow.communicate(timeout=240)
    lines = [first, *(json.loads(line) for line in out.splitlines())]
    assert follow.returncode == 1, err
    end = lines[-1]
    assert (end["event"], end["result"]) == ("end", "rolled_back") and "Ctrl-C" in end["aborted_by"], end
    assert all(e["event"] == "progress" for e in lines[:-1]) and all(e["schema_version"] == 1 for e in lines)
    report = json.loads(lab.phaul("--host", "alpha", "migrations", "--follow", mid, "--json", check=False).stdout)
    assert report["result"] == "rolled_back"  # an ended migration: how it ended
    rows = json.loads(lab.phaul("--host", "alpha", "migrations", "--json").stdout)["migrations"]
    assert [r["state"] for r in rows if r["migration_id"] == mid] == ["rolled_back"]


def test_abort_ends_a_round_transfer_under_way(lab: Lab, counter: str) -> None:
    """Round 1 capped at 64 KiB/s: its rsync is killed by the abort; the round never ends."""
    migrate = migrate_async(lab, CT, "alpha", "beta", "--method", "precopy", "--bandwidth", "64K", fault="precopy:pause")
    mid, _ = wait_paused(lab, "alpha", migrate)
    release(lab, "alpha")
    wait_for(lambda: any("rsync" in args and "::images" in args for _, args in netns_processes("alpha")), timeout=60,
             what="round 1's rsync of the images")
    aborted = lab.phaul("--host", "alpha", "abort", mid)
    assert "ROLLED_BACK" in aborted.stdout, aborted.stdout
    report = finish(migrate)
    steps = [r["step"] for r in _journal(lab, mid)]
    assert "precopy" in steps and "precopy-2" not in steps, steps  # round 1 never ended
    assert report["rounds"] == [], report
    _rolled_back(lab, counter, report)
