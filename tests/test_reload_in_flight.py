"""SIGHUP (`systemctl reload phaul-agent`) while a migration runs: both agents reload their
peers, admins and revocation list and the migration goes on to the end, in the lab."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import Lab, wait_for
from faultlib import finish, migrate_async, read_memory_mark, release, start_counter, wait_paused

pytestmark = pytest.mark.lab


def _pid(lab: Lab, host: str) -> int:
    return int((lab.state_dir(host) / "agent.pid").read_text())


def test_reload_during_a_migration_keeps_it(clean_lab: Lab) -> None:
    lab = clean_lab
    mark = start_counter(lab, "hup")
    pids = {h: _pid(lab, h) for h in ("alpha", "beta")}
    logs = {h: (lab.state_dir(h) / "agent.log").read_text(errors="replace").count("reloaded:") for h in pids}
    proc = migrate_async(lab, "hup", "alpha", "beta", fault="transfer:pause")
    try:
        wait_paused(lab, "alpha", proc)  # frozen, dumped, the destination prepared: mid-migration
        for pid in pids.values():
            os.kill(pid, signal.SIGHUP)
        for h in pids:
            wait_for(lambda h=h: (lab.state_dir(h) / "agent.log").read_text(errors="replace").count("reloaded:") > logs[h],
                     what=f"{h}'s agent to reload")
    finally:
        release(lab, "alpha")
    report = finish(proc)
    assert report["result"] == "ok", report
    assert {h: _pid(lab, h) for h in pids} == pids  # reloaded, never restarted
    assert read_memory_mark(lab, "beta", "hup") == mark  # the same process, moved
    assert [c["id"] for c in lab.ct_list("alpha")] == []
