"""`phaul evacuate` in the lab: counters, an addressed echo server with a connected client,
and a container no destination may take (its ID is taken there: preflight refuses).

The plan (--dry-run) changes nothing; an interrupted evacuation starts nothing more and
leaves what it did not move running on alpha; running it again finishes the job; what moved
keeps counting from where it was (the value it keeps in memory is the same), the client's
connection is kept, and the container that could not move is named with the reason.

A container whose migration ended in doubt (beta's agent killed at the commit) is settled
first (`phaul recover`): while beta cannot answer, the evacuation names it in doubt with
what to do (exit 3) and moves the others; once beta is back, it settles it and finishes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import REPO, TEST_SUBNET, Lab, wait_for
from faultlib import (
    finish,
    kill_agent,
    leftovers,
    migrate_async,
    migrations,
    read_memory_mark,
    release,
    runc_state,
    start_counter,
    wait_paused,
)

from phaul.fleet.evacuate import Evacuation, Outcome, Row
from phaul.testing import lab as lab_mod
from phaul.testing import probe as probes
from tests.test_json_schemas import check

pytestmark = pytest.mark.lab

PORT = 7007
COUNTERS = ("ev1", "ev2", "ev3", "ev4")
THREE = ("alpha", "beta", "gamma")


def _evacuate(lab: Lab, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(lab.hosts_file), "evacuate", "alpha", "--json", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=timeout)
    print(err)
    return proc.returncode, check("evacuation", out), err


def _ids(lab: Lab, host: str) -> dict[str, str]:
    return {c["id"]: c["state"] for c in lab.ct_list(host)}


@pytest.fixture
def three_hosts(clean_lab: Lab) -> Iterator[Lab]:
    """The lab with gamma as a third full host, removed afterwards."""
    lab_mod.up(TEST_SUBNET, lab_dir=clean_lab.dir, hosts=("alpha", "beta", "gamma"))
    try:
        yield clean_lab
    finally:
        lab_mod.remove_host("gamma", lab_dir=clean_lab.dir)


def test_evacuate_alpha(three_hosts: Lab) -> None:
    lab = three_hosts
    marks = {ct: start_counter(lab, ct) for ct in COUNTERS}
    ip = lab_mod.container_address(TEST_SUBNET, 3)
    lab.phaul("--host", "alpha", "ct", "create", "evweb", "--ip", f"{ip}/24", "--memory", "64M")
    lab.phaul("--host", "alpha", "ct", "start", "evweb", "--", "/bin/echo-server", "--port", str(PORT))
    wait_for(lambda: probes.short_probe("phaul-client", f"{ip}:{PORT}", seconds=0.05)[0] == 0, what="the echo server")
    for host in ("alpha", "beta", "gamma"):  # beta and gamma have a container of this ID: preflight refuses
        lab.phaul("--host", host, "ct", "create", "evstuck", "--memory", "32M")
    lab.phaul("--host", "alpha", "ct", "start", "evstuck", "--", "/bin/sh", "-c", "while :; do sleep 1; done")
    lab.phaul("--host", "alpha", "ct", "create", "evcold", "--memory", "32M")  # never started: moves offline
    probe = probes.LongProbe("phaul-client", f"{ip}:{PORT}", "--interval-ms", "10")
    try:
        # the plan: every container but evstuck has a destination; nothing changes
        rc, plan, _ = _finish(_evacuate(lab, "--dry-run"))
        rows = {r["ct"]: r for r in plan["containers"]}
        assert rc == 1 and plan["dry_run"] and set(rows) == {*COUNTERS, "evweb", "evstuck", "evcold"}, plan
        assert all(rows[ct]["outcome"] == "planned" for ct in (*COUNTERS, "evweb", "evcold")), plan
        assert {rows[ct]["destination"] for ct in (*COUNTERS, "evweb", "evcold")} == {"beta", "gamma"}, plan  # spread out
        assert plan["parallel"] in (1, 2), plan  # from the measured costs; at most one per destination
        assert rows["evstuck"]["outcome"] == "stayed", plan
        for host in ("beta", "gamma"):
            assert f"{host} already has a container evstuck" in rows["evstuck"]["reason"], plan
            assert set(_ids(lab, host)) == {"evstuck"}
        assert set(_ids(lab, "alpha")) == {*COUNTERS, "evweb", "evstuck", "evcold"}

        # interrupted after its first migration: the rest stays on alpha, running
        proc = _evacuate(lab, "--parallel", "1")
        wait_for(lambda: len(_ids(lab, "beta")) + len(_ids(lab, "gamma")) > 2 or proc.poll() is not None, timeout=120,
                 what="a first container moved")
        proc.send_signal(signal.SIGINT)
        rc, first, err = _finish(proc)
        outcomes = [r["outcome"] for r in first["containers"]]
        assert rc == 1 and "interrupted" in err and "not_started" in outcomes and "ok" in outcomes, first
        left = set(_ids(lab, "alpha"))
        assert {r["ct"] for r in first["containers"] if r["outcome"] in ("not_started", "stayed")} == left

        # run again: it goes on with what is left
        rc, second, _ = _finish(_evacuate(lab))
        rows = {r["ct"]: r for r in second["containers"]}
        assert rc == 1 and set(rows) == left, second
        assert all(r["outcome"] == "ok" for ct, r in rows.items() if ct != "evstuck"), second
        assert rows["evstuck"]["outcome"] == "stayed" and "ct-id" in rows["evstuck"]["reason"]
        for r in (*first["containers"], *second["containers"]):
            if r["outcome"] == "ok":
                assert r["bytes_sent"] > 0 and r["migration_id"], r
                assert r["ct"] == "evcold" or r["pause_longest_ms"] > 0, r
                # moved as they were: the never-started one offline, created there
                assert _ids(lab, r["destination"])[r["ct"]] == ("created" if r["ct"] == "evcold" else "running"), r

        assert _ids(lab, "alpha") == {"evstuck": "running"}
        where = {r["ct"]: r["destination"] for r in (*first["containers"], *second["containers"]) if r["outcome"] == "ok"}
        assert set(where) == {*COUNTERS, "evweb", "evcold"}
        for ct, mark in marks.items():  # the same processes, counting on
            assert read_memory_mark(lab, where[ct], ct) == mark, ct
            before = lab.counter(where[ct], ct)
            wait_for(lambda ct=ct, before=before: lab.counter(where[ct], ct) > before, what=f"{ct} to count on")
        time.sleep(0.3)
        rc, result = probe.stop()
        assert rc == 0 and not result["reset"] and not result["eof"], result
        assert result["wrong"] == 0 and result["missing"] == 0 and result["received"] > 50, result
        for doc in (first, second):
            rows = [Row(r["ct"], r["destination"], Outcome(r["outcome"]), r["reason"], r["migration_id"],
                        r["pause_longest_ms"], r["pause_total_ms"], r["bytes_sent"]) for r in doc["containers"]]
            print(Evacuation("alpha", rows, doc["parallel"], False).to_table())
    finally:
        probe.kill()


def _restart_agents(lab: Lab) -> None:
    """What an admin does after an agent died (`phaul lab up`), keeping gamma a full host."""
    lab_mod.up(TEST_SUBNET, lab_dir=lab.dir, hosts=THREE)


@pytest.fixture
def with_doubt(three_hosts: Lab) -> Iterator[Lab]:
    """The three hosts; afterwards, whatever happened: no migration held, dead agents
    restarted, what is unsettled settled (then gamma and the containers are removed)."""
    lab = three_hosts
    try:
        yield lab
    finally:
        lab.disarm_faults()
        release(lab, "alpha")
        _restart_agents(lab)
        for host in THREE:
            lab.phaul("--host", host, "recover", check=False, timeout=600)


def _running_on(lab: Lab, ct: str) -> list[str]:
    return [h for h in THREE if runc_state(lab, h, ct) == "running"]


def test_evacuate_settles_an_in_doubt_container_first(with_doubt: Lab) -> None:
    lab = with_doubt
    marks = {ct: start_counter(lab, ct) for ct in ("evdoubt", "evrest", "evpinned")}
    lab.phaul("--host", "gamma", "ct", "create", "evpinned", "--memory", "32M")  # gamma refuses it: only beta may take it

    # evdoubt's migration to beta ends in doubt: beta's agent is killed at the commit
    migrate = migrate_async(lab, "evdoubt", "alpha", "beta", fault="commit:pause")
    mid, _ = wait_paused(lab, "alpha", migrate)
    kill_agent(lab, "beta")
    release(lab, "alpha")
    report = finish(migrate)
    assert migrate.returncode == 3 and report["result"] == "in_doubt", report
    assert "evdoubt" not in _ids(lab, "alpha")  # its source copy is gone; beta holds its restored copy, held
    assert migrations(lab, "alpha")[mid]["state"] == "in_doubt"

    # beta cannot answer: evdoubt is tried first and named in doubt with what to do; evrest moves to gamma
    rc, first, err = _finish(_evacuate(lab))
    rows = {r["ct"]: r for r in first["containers"]}
    assert rc == 3 and first["exit_code"] == 3, first
    assert f"settled {mid} (source): in_doubt" in err, err
    doubt = rows["evdoubt"]
    assert (doubt["outcome"], doubt["destination"], doubt["migration_id"]) == ("in_doubt", "beta", ""), doubt
    assert mid in doubt["reason"] and f"phaul --host alpha recover {mid}" in doubt["reason"], doubt
    assert (rows["evrest"]["outcome"], rows["evrest"]["destination"]) == ("ok", "gamma"), first
    assert rows["evpinned"]["outcome"] == "stayed" and "gamma already has a container evpinned" in rows["evpinned"]["reason"]
    assert set(rows) == {"evdoubt", "evrest", "evpinned"}, first

    # beta is back: the evacuation settles evdoubt (its copy runs on beta) and moves what is left
    _restart_agents(lab)
    rc, second, err = _finish(_evacuate(lab))
    rows = {r["ct"]: r for r in second["containers"]}
    assert rc == 0, (second, err)
    assert set(rows) == {"evpinned"} and (rows["evpinned"]["outcome"], rows["evpinned"]["destination"]) == ("ok", "beta")
    assert migrations(lab, "alpha")[mid]["state"] == "ok"
    assert _ids(lab, "alpha") == {}
    where = {"evdoubt": "beta", "evrest": "gamma", "evpinned": "beta"}
    for ct, host in where.items():  # exactly one copy runs, the same processes, counting on
        assert _running_on(lab, ct) == [host], ct
        assert read_memory_mark(lab, host, ct) == marks[ct], ct
        before = lab.counter(host, ct)
        wait_for(lambda ct=ct, host=host, before=before: lab.counter(host, ct) > before, what=f"{ct} to count on")
    wait_for(lambda: not leftovers(lab, "alpha"), timeout=30, what=f"alpha to hold nothing: {leftovers(lab, 'alpha')}")
