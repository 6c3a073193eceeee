"""Agents restarted in the middle of a migration, and `phaul recover`: real
migrations in the lab, broken on purpose; afterwards exactly one copy runs,
its counter still increasing and its memory intact, and nothing is left."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import Lab, wait_for
from faultlib import (  # noqa: F401 (broken_lab is a fixture)
    broken_lab, finish, frozen, kill_agent, leftovers, link, migrate_async, migrations, read_memory_mark, recover,
    release, restart_agents, start_counter, wait_paused, where,
)

pytestmark = pytest.mark.lab


def _settled(lab: Lab, host: str, mid: str) -> str:
    return migrations(lab, host).get(mid, {}).get("state", "absent")


def _check_runs_only_on(lab: Lab, ct: str, host: str, mark: str) -> None:
    w = where(lab, ct)
    assert w.running == [host], w
    other = "beta" if host == "alpha" else "alpha"
    assert w.states[other] is None, w
    c = lab.counter(host, ct)
    wait_for(lambda: lab.counter(host, ct) > c, what=f"{ct}'s counter to increase on {host}")
    assert read_memory_mark(lab, host, ct) == mark, "the container's memory changed"
    for h in ("alpha", "beta"):
        assert leftovers(lab, h, keep_ct=ct) == [], h


def test_source_agent_killed_at_the_gate_resumes_the_source(broken_lab: Lab) -> None:
    lab = broken_lab
    mark = start_counter(lab, "rk1")
    report = finish(migrate_async(lab, "rk1", "alpha", "beta", fault="transfer:kill-agent"))
    assert report["result"] == "no report" and report["exit"] == 3, report  # the stream broke: in doubt
    [mid] = [m for m, r in migrations(lab, "beta").items() if r["ct"] == "rk1"]
    assert frozen(lab, "alpha", "rk1")  # held at the commit gate meanwhile
    restart_agents(lab)
    wait_for(lambda: _settled(lab, "alpha", mid) == "rolled_back", timeout=60, what="alpha to roll back on start-up")
    wait_for(lambda: _settled(lab, "beta", mid) == "rolled_back", timeout=30, what="beta to drop its partial copy")
    _check_runs_only_on(lab, "rk1", "alpha", mark)


def test_source_agent_killed_after_deciding_to_commit_finishes_the_commit(broken_lab: Lab) -> None:
    lab = broken_lab
    mark = start_counter(lab, "rk2")
    report = finish(migrate_async(lab, "rk2", "alpha", "beta", fault="commit:kill-agent"))
    assert report["result"] == "no report" and report["exit"] == 3, report  # the stream broke: in doubt
    [mid] = [m for m, r in migrations(lab, "beta").items() if r["ct"] == "rk2"]
    assert migrations(lab, "beta")[mid]["step"] == "restored"  # held, stopped, until the source decides
    restart_agents(lab)
    wait_for(lambda: _settled(lab, "alpha", mid) == "ok", timeout=60, what="alpha to finish the commit")
    wait_for(lambda: _settled(lab, "beta", mid) == "ok", timeout=30, what="beta to run its copy")
    _check_runs_only_on(lab, "rk2", "beta", mark)


def test_destination_agent_killed_before_commit_ends_in_doubt_then_runs(broken_lab: Lab) -> None:
    lab = broken_lab
    mark = start_counter(lab, "rk3")
    proc = migrate_async(lab, "rk3", "alpha", "beta", fault="commit:pause")
    mid, step = wait_paused(lab, "alpha", proc)
    assert step == "commit"
    kill_agent(lab, "beta")
    release(lab, "alpha")
    report = finish(proc)
    assert report["result"] == "in_doubt", report
    assert where(lab, "rk3").states["alpha"] is None  # the source copy is gone ...
    assert migrations(lab, "alpha")[mid]["state"] == "in_doubt"
    restart_agents(lab)  # ... and beta, back, still holds its restored copy
    outcomes = recover(lab, "alpha", mid)
    assert [o["result"] for o in outcomes] == ["ok"], outcomes
    wait_for(lambda: _settled(lab, "beta", mid) == "ok", timeout=30, what="beta to settle")
    _check_runs_only_on(lab, "rk3", "beta", mark)


@contextmanager
def _link_cut_at_commit(lab: Lab, ct: str) -> Iterator[tuple[str, str]]:
    """Migrate `ct` alpha -> beta and cut beta's link just before the commit:
    in doubt. Yields (memory mark, migration ID); the link is back afterwards."""
    mark = start_counter(lab, ct)
    proc = migrate_async(lab, ct, "alpha", "beta", fault="commit:pause")
    mid, _ = wait_paused(lab, "alpha", proc)
    link("beta", up=False)
    try:
        release(lab, "alpha")
        report = finish(proc)
        assert report["result"] == "in_doubt", report
        yield mark, mid
    finally:
        link("beta", up=True)


def test_link_cut_for_good_after_commit_is_in_doubt_until_recover(broken_lab: Lab) -> None:
    lab = broken_lab
    with _link_cut_at_commit(lab, "rk4") as (mark, mid):
        assert migrations(lab, "alpha")[mid]["state"] == "in_doubt"
        outcomes = recover(lab, "alpha", mid)  # beta unreachable: still in doubt, nothing lost
        assert [o["result"] for o in outcomes] == ["in_doubt"], outcomes
        assert where(lab, "rk4").states == {"alpha": None, "beta": "running"}  # held stopped on beta
        assert frozen(lab, "beta", "rk4")
    # `phaul recover` works from either host: beta asks alpha, learns that the source
    # copy is gone and runs its copy (unless alpha's resolver, retrying on its own
    # now that the link is back, got there first); alpha then settles too.
    outcomes = recover(lab, "beta", mid)
    assert [(o["role"], o["result"]) for o in outcomes] == [("destination", "ok")], outcomes
    wait_for(lambda: _settled(lab, "alpha", mid) == "ok", timeout=30, what="alpha to settle")
    _check_runs_only_on(lab, "rk4", "beta", mark)


def test_in_doubt_settles_without_recover_once_the_link_is_back(broken_lab: Lab) -> None:
    """Nobody runs `phaul recover`: the agents' own resolvers (every 5 s in the lab)
    settle the migration as soon as they can reach each other again."""
    lab = broken_lab
    with _link_cut_at_commit(lab, "rk6") as (mark, mid):
        pass
    wait_for(lambda: _settled(lab, "alpha", mid) == "ok" and _settled(lab, "beta", mid) == "ok",
             timeout=60, what="both agents to settle on their own")
    _check_runs_only_on(lab, "rk6", "beta", mark)


def test_migrations_lists_each_side(broken_lab: Lab) -> None:
    lab = broken_lab
    start_counter(lab, "rk5")
    ok = lab.migrate("rk5", "alpha", "beta")
    back = lab.migrate("rk5", "beta", "alpha", fault="restore:damage-image", check=False)
    assert ok["result"] == "ok" and back["result"] == "rolled_back", (ok, back)
    alpha, beta = migrations(lab, "alpha"), migrations(lab, "beta")
    assert alpha[ok["migration_id"]]["role"] == "source" and alpha[ok["migration_id"]]["state"] == "ok"
    assert beta[ok["migration_id"]]["role"] == "destination" and beta[ok["migration_id"]]["state"] == "ok"
    assert beta[back["migration_id"]]["state"] == "rolled_back" and alpha[back["migration_id"]]["state"] == "rolled_back"
    steps = alpha[ok["migration_id"]]["steps"]
    for step in ("begin", "preflight", "dump", "transfer", "restore", "commit", "source-destroyed", "resume", "ok"):
        assert step in steps, steps
    assert steps.index("commit") < steps.index("source-destroyed") < steps.index("resume")
    text = lab.phaul("--host", "alpha", "migrations").stdout
    assert ok["migration_id"] in text and "rolled_back" in text
    assert recover(lab, "alpha") == []  # nothing in doubt
    wait_for(lambda: where(lab, "rk5").running == ["beta"], what="rk5 to run on beta")
