"""Tasks that are not root: the detection of a CRIU that can dump them (phaul.linux.task_owners,
doctor, preflight) and, in the lab, a container of several users that moves with each task's
uid/gid/groups/limits intact."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Lab, wait_for

from phaul.checks import CheckState
from phaul.linux import doctor, procfs, task_owners
from phaul.linux.task_owners import DumpAbility, TaskIds
from phaul.migration import preflight

# A CRIU as upstream 4.2 behaves for a root without CAP_SYS_RESOURCE (its log line, its exit code).
_UNPATCHED = """#!/bin/sh
[ "$1" = dump ] || exec {real} "$@"
while [ $# -gt 0 ]; do [ "$1" = -D ] && dir=$2; shift; done
echo "(00.1) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted" > "$dir/dump.log"
echo "(00.2) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted" >> "$dir/dump.log"
exit 1
"""


def _fake_unpatched_criu(tmp_path: Path) -> str:
    real = doctor.criu_path()
    assert real is not None
    path = tmp_path / "criu"
    path.write_text(_UNPATCHED.format(real=real))
    path.chmod(0o755)
    return str(path)


# ---- detection (no lab) -------------------------------------------------------------------


def test_ids_parse_and_prlimit_rule() -> None:
    status = procfs.parse_status("Name:\tx\nUid:\t1001\t1002\t1003\t1002\nGid:\t0\t0\t0\t0\nGroups:\t5 7 \nCapEff:\t0\n")
    t = task_owners.ids_from_status(9, status)
    assert t == TaskIds(9, (1001, 1002, 1003, 1002), (0, 0, 0, 0), (5, 7))
    assert task_owners.ids_from_status(9, {"Name": "x"}) is None
    root = TaskIds(1, (0, 0, 0, 0), (0, 0, 0, 0), ())
    assert not task_owners.prlimit_refused(root, 0, 0)
    # any of real/effective/saved uid or gid differing needs CAP_SYS_RESOURCE; the fs ids and groups do not count
    assert task_owners.prlimit_refused(TaskIds(2, (0, 0, 0, 0), (0, 0, 50, 0), ()), 0, 0)
    assert task_owners.prlimit_refused(TaskIds(3, (0, 1000, 0, 1000), (0, 0, 0, 0), ()), 0, 0)
    assert not task_owners.prlimit_refused(TaskIds(4, (0, 0, 0, 7), (0, 0, 0, 7), (1, 2)), 0, 0)
    assert not task_owners.prlimit_refused(TaskIds(5, (7, 7, 7, 7), (8, 8, 8, 8), ()), 7, 8)


def test_decide_probes_only_without_cap_sys_resource() -> None:
    def boom() -> DumpAbility:
        raise AssertionError("probed although CAP_SYS_RESOURCE is there")

    with_cap = {"CapEff": f"{(1 << 24) | 0x3:016x}"}
    assert task_owners.decide(with_cap, boom) == DumpAbility(True, "this agent has CAP_SYS_RESOURCE")
    without = {"CapEff": f"{((1 << 41) - 1) & ~(1 << 24):016x}"}
    answer = DumpAbility(False, "no")
    assert task_owners.decide(without, lambda: answer) is answer
    assert task_owners.decide({}, lambda: answer) is answer  # unreadable caps: probe


def test_probe_reads_the_unpatched_criu_error(tmp_path: Path) -> None:
    ability = task_owners.probe_dump(_fake_unpatched_criu(tmp_path), tmp_path)
    assert not ability.possible
    assert "Can't get rlimit 0: Operation not permitted" in ability.how and "RLIMIT_NOFILE" not in ability.how
    assert not list(tmp_path.glob("foreign-dump.*"))  # its image directory is gone
    assert not [line for line in _ps() if line.split()[1] == "sleep" and line.split()[0] == str(task_owners.PROBE_UID)]


def _ps() -> list[str]:
    return subprocess.run(["ps", "-eo", "uid=,comm="], capture_output=True, text=True).stdout.splitlines()


def test_installed_criu_dumps_other_users_tasks() -> None:
    """After `make setup` either this root has CAP_SYS_RESOURCE or the CRIU has the patch: both say possible.
    The probe really dumps a process of uid 65534."""
    criu = doctor.criu_path()
    assert criu is not None
    ability = task_owners.probe_dump(criu)
    assert ability.possible, ability.how
    [check] = [c for c in doctor.run_checks() if c.name == "other users' tasks"]
    assert check.status == CheckState.PASS, check


def test_doctor_and_preflight_refuse_with_the_fix_for_an_unpatched_criu(tmp_path: Path, monkeypatch) -> None:
    fake = _fake_unpatched_criu(tmp_path)
    monkeypatch.setattr(task_owners, "has_cap", lambda status, bit: False)  # as on a root without CAP_SYS_RESOURCE
    check = doctor._check_foreign_tasks(fake)
    assert check.status == CheckState.WARNING and "Can't get rlimit 0" in check.detail and check.fix == task_owners.FIX
    child = subprocess.Popen(["sleep", "60"], user=1000, group=1000, extra_groups=[10])
    try:
        wait_for(lambda: (task_owners.task_ids(child.pid) or TaskIds(0, (0,), (0,), ())).uids[0] == 1000, what="setuid")
        host = SimpleNamespace(name="h", state_dir=tmp_path)
        r = preflight._users_check(host, child.pid, fake)  # type: ignore[arg-type]
        assert r.status == CheckState.FAILURE, r
        assert f"PID {child.pid} (uid 1000, gid 1000)" in r.message and "Can't get rlimit 0" in r.message
        assert "patches/criu" in r.message and "CAP_SYS_RESOURCE" in r.message
        real = doctor.criu_path()
        assert real is not None
        monkeypatch.undo()
        r = preflight._users_check(host, child.pid, real)  # type: ignore[arg-type]
        assert r.status == CheckState.PASS and f"PID {child.pid}" in r.message, r
    finally:
        child.kill()
        child.wait()
    with subprocess.Popen(["sleep", "60"]) as mine:
        r = preflight._users_check(host, mine.pid, fake)  # type: ignore[arg-type]
        mine.kill()
    assert r.status == CheckState.PASS and f"every task runs as uid {os.getuid()}" in r.message, r


# ---- the lab: a container of several users moves -----------------------------------------------

# (uids, gids, groups, limits) of each asuser task (workloads/asuser.c)
TASKS = [
    ("65534", "65534", "-", ["nofile=256:512", "core=0:0"]),
    ("1000", "1000", "10,20,1000", ["nproc=100:200", "stack=4194304:8388608"]),
    ("1001,1002,1003", "2001,2002,2003", "5", ["fsize=1048576:2097152", "msgqueue=4096:8192"]),
    ("0", "50", "50,60", ["locks=10:20", "sigpending=100:200"]),
]

_SNAPSHOT = (
    'for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = asuser ] || continue; '
    'echo "@${d#/proc/}"; tr "\\0" " " < $d/cmdline; echo; grep -E "^(Uid|Gid|Groups):" $d/status; cat $d/limits; done'
)


def _snapshot(lab: Lab, host: str, ct: str) -> dict[str, str]:
    """{pid: cmdline, ids and limits} of every asuser task in the container, read inside it."""
    out: dict[str, str] = {}
    for block in lab.exec(host, ct, "sh", "-c", _SNAPSHOT).split("@")[1:]:
        pid, _, rest = block.partition("\n")
        out[pid] = rest
    return out


def _expected_lines(uids: str, gids: str, groups: str) -> list[str]:
    def four(ids: str) -> str:
        v = ids.split(",") if "," in ids else [ids] * 3
        return "\t".join([*v, v[1]])  # the fs id follows the effective one

    return [f"Uid:\t{four(uids)}", f"Gid:\t{four(gids)}", f"Groups:\t{' '.join(groups.split(',')) if groups != '-' else ''}"]


_LIMIT_ROWS = {"nofile": "Max open files", "core": "Max core file size", "nproc": "Max processes",
               "stack": "Max stack size", "fsize": "Max file size", "msgqueue": "Max msgqueue size",
               "locks": "Max file locks", "sigpending": "Max pending signals"}


def _check_task(text: str, uids: str, gids: str, groups: str, limits: list[str]) -> None:
    lines = [ln.rstrip() for ln in text.splitlines()]
    for want in _expected_lines(uids, gids, groups):
        assert want.rstrip() in lines, f"{want!r} not in {lines}"
    for limit in limits:
        name, _, values = limit.partition("=")
        soft, hard = values.split(":")
        [row] = [ln for ln in lines if ln.startswith(_LIMIT_ROWS[name])]
        assert row[26:].split()[:2] == [soft, hard], row


@pytest.mark.lab
def test_tasks_of_several_users_keep_ids_groups_and_limits(clean_lab: Lab) -> None:
    lab = clean_lab
    ct = "users1"
    starts = " ".join(f"asuser {u} {g} {grp} {' '.join(lim)} &" for u, g, grp, lim in TASKS)
    lab.phaul("--host", "alpha", "ct", "create", ct)
    lab.phaul("--host", "alpha", "ct", "start", ct, "--", "/bin/sh", "-c", f"{starts} while :; do sleep 1; done")
    wait_for(lambda: len(_snapshot(lab, "alpha", ct)) == len(TASKS), what="the asuser tasks to start")
    before = _snapshot(lab, "alpha", ct)
    for u, g, grp, lim in TASKS:
        [text] = [t for t in before.values() if t.startswith(f"asuser {u} {g} {grp} ")]
        _check_task(text, u, g, grp, lim)  # the workload did what the test means

    rows = json.loads(lab.phaul("--host", "alpha", "check", ct, "beta", "--json").stdout)["checks"]
    [users] = [r for r in rows if r["name"] == "users"]
    assert users["status"] == "pass" and "tasks of other users" in users["message"], users
    print(f"preflight users: {users['message']}")

    t0 = time.monotonic()
    report = lab.migrate(ct, "alpha", "beta")
    assert report["result"] == "ok", report
    print(f"migrated {len(TASKS)} non-root tasks alpha->beta in {time.monotonic() - t0:.1f} s, frozen {report['frozen_ms']} ms")
    after = _snapshot(lab, "beta", ct)
    assert after == before  # same PIDs, same cmdlines, ids, groups and every limit
    report = lab.migrate(ct, "beta", "alpha")
    assert report["result"] == "ok", report
    assert _snapshot(lab, "alpha", ct) == before
