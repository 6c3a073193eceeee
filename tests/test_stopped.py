"""A container holding a stopped (SIGSTOP) task migrates, the task still stopped after the restore
(patches/criu/0002: no freezer seize of a stopped task; phaul.linux.freezer.has_stopped_task;
the destination's resume leaves the tasks stopped at the dump stopped)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import COUNTER, Lab, wait_for
from phaul.linux import freezer, procfs


def test_has_stopped_task_reads_the_cgroup_s_tasks(tmp_path: Path) -> None:
    state = tmp_path / "freezer.state"
    state.write_text("THAWED\n")
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            (tmp_path / "tasks").write_text(f"{child.pid}\n")
            assert not freezer.has_stopped_task(state)
            assert freezer.freeze_snippet(state) != ":"
            child.send_signal(signal.SIGSTOP)
            wait_for(lambda: procfs.state(child.pid) == "T", what="the child to stop")
            assert freezer.has_stopped_task(state)
            assert freezer.freeze_snippet(state) == ":"  # phaul leaves such a cgroup unfrozen
        finally:
            child.kill()


def _states(lab: Lab, host: str, ct: str) -> dict[str, str]:
    # a task may exit between the glob and the reads (the counter's children come and go): skip it
    script = 'for d in /proc/[0-9]*; do c=$(cat $d/comm 2>/dev/null) && s=$(cut -d" " -f3 $d/stat 2>/dev/null) && echo "${d#/proc/} $c $s"; done'
    rows = (line.split() for line in lab.exec(host, ct, "sh", "-c", script).splitlines())
    return {row[0]: f"{row[1]} {row[2]}" for row in rows if len(row) == 3}


@pytest.mark.lab
@pytest.mark.parametrize("precopy", ["auto", "off"])
def test_stopped_task_migrates_and_stays_stopped(clean_lab: Lab, precopy: str) -> None:
    lab = clean_lab
    ct = f"stop{precopy}"
    lab.phaul("--host", "alpha", "ct", "create", ct)
    lab.phaul("--host", "alpha", "ct", "start", ct, "--", "/bin/sh", "-c", f"asuser 1000 1000 - --stop & {COUNTER[-1]}")
    wait_for(lambda: "asuser T" in _states(lab, "alpha", ct).values(), what="asuser to stop itself")
    [pid] = [p for p, v in _states(lab, "alpha", ct).items() if v == "asuser T"]
    t0 = time.monotonic()
    report = lab.migrate(ct, "alpha", "beta", f"--precopy={precopy}")
    print(f"precopy={precopy}: {report['result']} in {time.monotonic() - t0:.1f} s, rounds {len(report.get('rounds', []))}")
    assert report["result"] == "ok", report
    states = _states(lab, "beta", ct)
    assert states[pid] == "asuser T", states  # the same task, still stopped
    c = lab.counter("beta", ct)
    wait_for(lambda: lab.counter("beta", ct) > c, what="the rest of the container to run on beta")
    lab.exec("beta", ct, "kill", "-CONT", pid)
    wait_for(lambda: _states(lab, "beta", ct)[pid] == "asuser S", what="the task to go on after SIGCONT")
