"""Tasks of other users: can this host's CRIU dump them?

CRIU reads every task's resource limits with prlimit(2). The kernel
(check_prlimit_permission) allows that on another task only when the caller's
real uid and gid equal the task's real, effective and saved ones, or with
CAP_SYS_RESOURCE. A root without CAP_SYS_RESOURCE (a restricted VM or
container) therefore cannot dump a container holding a task of another user
(`Can't get rlimit 0: Operation not permitted`) unless its CRIU carries
patches/criu/0001-dump-rlimits-from-proc-without-CAP_SYS_RESOURCE.patch,
which `make setup` builds in. `dump_ability()` finds out at run time: with
CAP_SYS_RESOURCE it is possible; without, it dumps a process of uid 65534.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phaul.linux import criu, procfs

log = logging.getLogger(__name__)

CAP_SYS_RESOURCE = 24
PROBE_UID = 65534  # nobody
PROBE_TIMEOUT = 30.0
FIX = ("build phaul's CRIU, which reads other users' limits from /proc/PID/limits "
       "(`make setup`, see patches/criu/README), or run the agent with CAP_SYS_RESOURCE")


@dataclass(frozen=True)
class TaskIds:
    """The ids of one process, from /proc/PID/status (real, effective, saved, fs)."""

    pid: int
    uids: tuple[int, ...]
    gids: tuple[int, ...]
    groups: tuple[int, ...]

    def __str__(self) -> str:
        return f"PID {self.pid} (uid {self.uids[0]}, gid {self.gids[0]})"


@dataclass(frozen=True)
class DumpAbility:
    """Whether CRIU can dump tasks of other users here, and how that was found out."""

    possible: bool
    how: str


def ids_from_status(pid: int, status: dict[str, str]) -> TaskIds | None:
    """TaskIds from the fields of /proc/PID/status (procfs.status), None when they are missing."""
    try:
        return TaskIds(
            pid,
            tuple(int(x) for x in status["Uid"].split()),
            tuple(int(x) for x in status["Gid"].split()),
            tuple(int(x) for x in status.get("Groups", "").split()),
        )
    except (KeyError, ValueError):
        return None


def task_ids(pid: int) -> TaskIds | None:
    """The ids of `pid` now, None when it is gone."""
    return ids_from_status(pid, procfs.status(pid))


def prlimit_refused(task: TaskIds, uid: int, gid: int) -> bool:
    """True when a caller of real uid `uid` and gid `gid` needs CAP_SYS_RESOURCE for prlimit(task)
    (the kernel compares the caller's real ids with the task's real, effective and saved ones)."""
    return any(u != uid for u in task.uids[:3]) or any(g != gid for g in task.gids[:3])


def foreign_tasks(pids: list[int]) -> list[TaskIds]:
    """The tasks among `pids` this process may not prlimit() without CAP_SYS_RESOURCE."""
    uid, gid = os.getuid(), os.getgid()
    tasks = (task_ids(p) for p in pids)
    return [t for t in tasks if t is not None and prlimit_refused(t, uid, gid)]


def has_cap(status: dict[str, str], bit: int) -> bool:
    """Whether the CapEff of a /proc/PID/status has capability `bit`."""
    try:
        return bool(int(status["CapEff"], 16) >> bit & 1)
    except (KeyError, ValueError):
        return False


def dump_ability(criu_path: str, tmp_dir: Path | None = None) -> DumpAbility:
    """Can `criu_path` dump tasks of other users here? A success is remembered per CRIU binary
    (path and mtime) and process; a failure is probed again next time."""
    return decide(procfs.status("self"), lambda: _probe_once(criu_path, tmp_dir))


class _Unable(Exception):
    def __init__(self, ability: DumpAbility) -> None:
        self.ability = ability


def _probe_once(criu_path: str, tmp_dir: Path | None) -> DumpAbility:
    try:
        return _cached_probe(criu_path, _mtime(criu_path), tmp_dir)
    except _Unable as e:  # functools.cache keeps no exception: the next call probes again
        return e.ability


def decide(self_status: dict[str, str], probe: Callable[[], DumpAbility]) -> DumpAbility:
    """With CAP_SYS_RESOURCE in `self_status` (ours) prlimit works on any task; without, `probe()` says."""
    if has_cap(self_status, CAP_SYS_RESOURCE):
        return DumpAbility(True, "this agent has CAP_SYS_RESOURCE")
    return probe()


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


@functools.cache
def _cached_probe(criu_path: str, _mtime_ns: int, tmp_dir: Path | None) -> DumpAbility:
    ability = probe_dump(criu_path, tmp_dir)
    if not ability.possible and "rlimit" not in ability.how:
        ability = probe_dump(criu_path, tmp_dir)  # failed for another reason: once more
    if not ability.possible:
        raise _Unable(ability)
    return ability


def probe_dump(criu_path: str, tmp_dir: Path | None = None) -> DumpAbility:
    """Dump a `sleep` of uid/gid 65534 with `criu_path` (left running, then killed); possible if the dump succeeds."""
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="foreign-dump.") as d:
        # setpriv, not Popen(user=...): that makes Python fork() instead of vfork(), which runs
        # gRPC's fork handlers in the agent's child; it sometimes died there before its exec,
        # and CRIU was given a dead task ("Unable to detach from PID: No such process").
        ids = [f"--reuid={PROBE_UID}", f"--regid={PROBE_UID}", "--clear-groups"]
        child = subprocess.Popen(
            ["setpriv", *ids, "sleep", "60"], cwd="/", start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_asleep(child.pid)
            r = subprocess.run(
                [criu_path, "dump", "-t", str(child.pid), "-D", d, "-o", "dump.log", "--leave-running"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False,
            )
            if r.returncode == 0:
                return DumpAbility(True, f"{criu_path} dumped a process of uid {PROBE_UID} without CAP_SYS_RESOURCE")
            lines = criu.error_lines(criu.read_log(Path(d) / "dump.log") or r.stderr)
            why = lines[0].strip() if lines else f"exit {r.returncode}"
            log.info("%s cannot dump a process of uid %d: %s", criu_path, PROBE_UID, why)
            return DumpAbility(False, f"{criu_path} cannot dump a process of uid {PROBE_UID} without CAP_SYS_RESOURCE: {why}")
        except subprocess.TimeoutExpired:
            return DumpAbility(False, f"{criu_path} did not dump a process of uid {PROBE_UID} within {PROBE_TIMEOUT:.0f} s")
        finally:
            child.kill()
            child.wait()


def _wait_asleep(pid: int, timeout: float = 5.0) -> None:
    """Wait until `pid` sleeps in the `sleep` that setpriv executes (Popen returns at
    setpriv's exec); a dump begun earlier would seize a task still changing its ids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = procfs.status(pid)
        if st.get("Name") == "sleep" and st.get("State", "").startswith("S"):
            return
        time.sleep(0.01)
