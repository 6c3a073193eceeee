"""The fault matrix: every step boundary of a migration x every fault, for real,
in the lab.

Each case starts a counter container on alpha that keeps a random value in
its memory, migrates it to beta with the migration paused (fault injection:
`STEP:pause` armed on alpha's test agent) at the step's boundary, makes the fault happen there, lets the
migration go on, then does what an admin would: heal the link, free the
disk, restart dead agents (`phaul lab up`) and run `phaul recover`. Then:
exactly one copy runs, its counter still increasing and its memory intact;
no frozen or stopped process, runc state, cgroup, mount, veth, process,
migration directory or image is left on either host; and the report (or, when
the source agent died, its journal) says where the container is.

`make test-faults` prints the table (scripts/fault_table.py): step x fault -> outcome.
Its `postcopy` row (the window after a post-copy resume) comes from tests/test_postcopy.py,
which records its cases in the same results file (faultlib.fault_case).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Lab, wait_for
from faultlib import (
    HOSTS, MARKED_COUNTER, Admin, agent_pid, counter_file, criu_pids, ensure_agents, fault_case, kill_agent, kill_criu,
    leftovers, link, pause_marker, read_memory_mark, scrub, stopped_processes, where,
)
from phaul.testing import faults as faults_mod
from phaul.rpc import phaul_pb2 as pb

pytestmark = pytest.mark.lab

STEPS = ALL = faults_mod.MATRIX_STEPS
FAULTS: dict[str, tuple[str, ...]] = {
    "dest agent killed": ALL,
    "source agent killed": ALL,
    "link cut 5 s": ALL,
    "link cut for good": ALL,
    "damaged image": ("precopy-2", "dump", "transfer", "restore", "commit", "cleanup"),  # where images exist
    "source CRIU killed": ("precopy", "precopy-2", "dump", "transfer", "restore", "commit"),  # where it runs
    "dest CRIU killed": ("restore",),
    "dest disk full": ALL,  # last: the cases share beta's state directory on a small tmpfs
}
CASES = [(step, fault) for fault, steps in FAULTS.items() for step in steps]
TMPFS_SIZE = "400m"  # above the agents' disk reserve (Limits.disk_reserve, 256 MiB) plus what a case needs
SETTLE_TIMEOUT = 60.0


# -- what each fault does at the pause ---------------------------------------------------------


def _images(lab: Lab, host: str, mid: str) -> Path:
    """The migration's images on `host`: the source's, or what the destination received."""
    source = lab.state_dir(host) / "migrations" / mid / "images"
    return source if source.parent.exists() else lab.state_dir(host) / "incoming" / mid / "recv" / "images"


def _damage(lab: Lab, mid: str) -> str:
    damaged = [h for h in HOSTS if faults_mod.damage_images(_images(lab, h, mid))]
    assert damaged, "no image to damage at this step: the case is not applicable"
    return f"damaged the images on {'+'.join(damaged)}"


def _fill(path: Path) -> None:
    """Fill the file system of `path` to the last byte."""
    fd = os.open(path / ".filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            while True:
                try:
                    if os.write(fd, b"\0" * chunk) < chunk:
                        break
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def _apply(lab: Lab, fault: str, row: dict, timers: list[threading.Thread]) -> str:
    ct, mid = row["ct"], row["migration_id"]
    if fault == "dest agent killed":
        kill_agent(lab, "beta")
    elif fault == "source agent killed":
        kill_agent(lab, "alpha")
    elif fault == "link cut 5 s":
        link("beta", up=False)
        t = threading.Timer(5.0, link, args=("beta", True))
        t.start()
        timers.append(t)
    elif fault == "link cut for good":
        link("beta", up=False)
    elif fault == "dest disk full":
        _fill(lab.state_dir("beta"))
    elif fault == "damaged image":
        return _damage(lab, mid)
    elif fault in ("source CRIU killed", "dest CRIU killed"):
        host = "alpha" if fault.startswith("source") else "beta"
        if criu_pids(lab, host):  # holding the container at the commit gate
            assert kill_criu(lab, host, timeout=1)
            return "killed the CRIU holding the dumped container"
        # the next CRIU on that host (a pre-copy round, the final dump or the restore), at work
        def kill() -> None:
            row["criu_killed"] = kill_criu(lab, host, 60, dumping=ct if host == "alpha" else "")

        t = threading.Thread(target=kill, daemon=True)
        t.start()
        timers.append(t)
        return "killed the next CRIU to start"
    else:
        raise AssertionError(fault)
    return ""


# -- beta's state directory on a small tmpfs (the disk-full cases) ---------------------------------


def _stop_agent(lab: Lab, host: str) -> None:
    pid = agent_pid(lab, host)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3],
             timeout=30, what=f"{host}'s agent to stop")


@pytest.fixture(scope="module")
def beta_on_tmpfs(lab: Lab):  # type: ignore[no-untyped-def]
    state = lab.state_dir("beta")
    _stop_agent(lab, "beta")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "phaul-test-full", str(state)], check=True)
    try:
        ensure_agents(lab)
        yield state
    finally:
        (state / ".filler").unlink(missing_ok=True)
        _stop_agent(lab, "beta")
        subprocess.run(["umount", str(state)], check=True)
        ensure_agents(lab)


# -- one case -------------------------------------------------------------------------------------------


def _start_counter(admin: Admin, ct: str) -> None:
    admin.call("alpha", "CreateContainer", pb.ContainerConfig(id=ct, memory=64 << 20))
    admin.call("alpha", "StartContainer", pb.StartRequest(id=ct, args=MARKED_COUNTER))


def _settled(admin: Admin, mid: str) -> bool:
    for host in HOSTS:
        state = admin.migrations(host).get(mid, {}).get("state", "settled")
        if state in ("in_progress", "in_doubt"):
            return False
    return True


@pytest.mark.parametrize(("step", "fault"), CASES, ids=[f"{s}-{f.replace(' ', '_')}" for s, f in CASES])
def test_fault(lab: Lab, request: pytest.FixtureRequest, step: str, fault: str) -> None:
    if fault == "dest disk full":
        request.getfixturevalue("beta_on_tmpfs")
    admin = Admin(lab)
    ct = f"f{CASES.index((step, fault)):02d}"
    timers: list[threading.Thread] = []
    with _cleaned_up(lab, admin, ct, timers), fault_case(step, fault, ct) as row:
        _start_counter(admin, ct)
        wait_for(lambda: counter_file(lab, "alpha", ct) > 2, what="the counter to run")
        mark = read_memory_mark(lab, "alpha", ct)
        assert len(mark) == 16, mark
        m = admin.migrate(ct, "alpha", "beta", fault=f"{step}:pause", method="stop-and-copy" if step == "fs-presync" else "precopy")
        marker = pause_marker(lab, "alpha")
        wait_for(lambda: marker.exists() or not m.thread.is_alive(), timeout=120, what=f"the migration to pause at {step}")
        assert marker.exists(), f"the migration never reached {step}: {m.wait().report or m.error}"
        mid, paused_at = marker.read_text().split()
        assert paused_at == step
        row["migration_id"] = mid
        row["note"] = _apply(lab, fault, row, timers)
        marker.unlink(missing_ok=True)  # go on (a killed source agent does not)
        m.wait(timeout=300)
        row["report"] = (m.report or {}).get("result") or ("no report: agent killed" if fault == "source agent killed" else "refused")
        row["error"] = ((m.report or {}).get("error") or m.error)[:300]
        row["fell_back"] = "pre-copy failed" in (m.report or {}).get("stop_reason", "")
        if fault == "source CRIU killed" and step.startswith("precopy"):  # the next CRIU is a round's
            # a pre-copy dump that fails: the migration falls back to one stop-and-copy
            assert row["fell_back"], m.report
        for t in timers:
            t.join(timeout=70)
        assert row.get("criu_killed") is not False, "no CRIU ran after the pause: the fault never happened"

        # what an admin does afterwards
        link("beta", up=True)
        (lab.state_dir("beta") / ".filler").unlink(missing_ok=True)
        restarted = ensure_agents(lab)
        before = admin.migrations("alpha").get(mid, {}).get("state")
        outcomes = admin.recover("alpha", mid) if before is not None else []
        row["recover"] = outcomes[0]["result"] if outcomes else ""
        row["recovered"] = bool(outcomes) and before in ("in_doubt", "in_progress") and not outcomes[0]["message"].startswith("already")
        row["restarted"] = restarted
        wait_for(lambda: _settled(admin, mid), timeout=SETTLE_TIMEOUT, what="both hosts to settle the migration")
        final = admin.migrations("alpha").get(mid, {}).get("state", "refused")
        row["journal"] = final

        # exactly one copy runs, still counting, with its memory
        w = where(lab, ct)
        row["runs_on"] = w.running
        assert len(w.running) == 1, f"copies running: {w.states}"
        host = w.running[0]
        other = "beta" if host == "alpha" else "alpha"
        assert w.states[other] is None, f"a copy is left on {other}: {w.states}"
        c = counter_file(lab, host, ct)
        wait_for(lambda: counter_file(lab, host, ct) > c, timeout=10, what=f"the counter to increase on {host}")
        assert read_memory_mark(lab, host, ct) == mark, "the container's memory is not the one it had"
        assert stopped_processes(lab, host, ct) == []
        for h in HOSTS:
            assert leftovers(lab, h, keep_ct=ct) == [], f"left on {h}"
        # the report (or the source's journal, when its agent died) says what happened
        expected = {"ok": "beta", "rolled_back": "alpha", "refused": "alpha"}
        if row["report"] in expected:
            assert host == expected[row["report"]], f"the report says {row['report']} but {ct} runs on {host}"
        assert final in expected and expected[final] == host, f"alpha's journal says {final} but {ct} runs on {host}"


@contextlib.contextmanager
def _cleaned_up(lab: Lab, admin: Admin, ct: str, timers: list[threading.Thread]) -> Iterator[None]:
    """After a case (recorded by faultlib.fault_case first): its container and timers go; a
    failed case also scrubs the lab for the next."""
    try:
        yield
    except BaseException:
        _cleanup(lab, admin, ct, timers)
        scrub(lab)
        raise
    _cleanup(lab, admin, ct, timers)


def _cleanup(lab: Lab, admin: Admin, ct: str, timers: list[threading.Thread]) -> None:
    for t in timers:
        t.join(timeout=70)
    for h in HOSTS:
        link(h, up=True)
        pause_marker(lab, h).unlink(missing_ok=True)
    (lab.state_dir("beta") / ".filler").unlink(missing_ok=True)
    lab.disarm_faults()
    ensure_agents(lab)
    for h in HOSTS:
        try:
            admin.call(h, "Recover", pb.RecoverRequest(), timeout=300)
        except Exception:  # the case already failed; leave nothing for the next one
            pass
        admin.destroy(h, ct)
