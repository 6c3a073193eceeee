"""The cgroup v1 freezer around CRIU dumps.

CRIU freezes a container by writing FROZEN to its freezer cgroup and then, on
cgroup v1, sleeps 100 ms before it looks again (criu/seize.c,
freeze_processes). When the cgroup is already FROZEN as CRIU starts, it skips
that wait. phaul's CRIU action scripts freeze the cgroup themselves at the
`pre-dump` action, polling the state without sleeping, which takes a
millisecond or two.

The price: CRIU remembers the cgroup was frozen when it started and leaves it
frozen whenever the tree keeps running (a `--leave-running` round, a failed
dump, a rollback at the commit gate). Whoever ran such a dump must `thaw`.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

from phaul.linux import procfs

log = logging.getLogger(__name__)

V1_ROOT = Path("/sys/fs/cgroup/freezer")
POLL_LIMIT = 20000  # state reads before an action script gives up and lets CRIU freeze


def state_file(cgroup_path: str, root: Path = V1_ROOT) -> Path | None:
    """The freezer.state of a cgroup v1 path (as runc gets it), or None without a v1 freezer."""
    path = root / cgroup_path.strip("/") / "freezer.state"
    return path if path.is_file() else None


def freeze_snippet(state: Path | None, marker: Path | None = None) -> str:
    """Shell lines for an action script's `pre-dump` case: freeze the cgroup and
    wait (busy, no sleep) until it is FROZEN, then create `marker` (if given):
    from then on nothing in the container changes. Always succeeds (a failed
    freeze leaves the freezing to CRIU, and no marker); a no-op without a freezer."""
    if state is None or has_stopped_task(state):
        return ":"
    f = shlex.quote(str(state))
    done = f' && [ "$s" = FROZEN ] && : > {shlex.quote(str(marker))}' if marker is not None else ""
    return (
        f"{{ echo FROZEN > {f} && i=0 && while read s < {f} && [ \"$s\" != FROZEN ] && [ $i -lt {POLL_LIMIT} ];"
        f" do i=$((i+1)); [ $((i % 2000)) != 0 ] || echo FROZEN > {f}; done{done}; }} 2>/dev/null; :"
    )


def has_stopped_task(state: Path) -> bool:
    """True when a task of the cgroup is stopped (SIGSTOP, job control). Such a cgroup must not be
    frozen for a dump: the kernel's PTRACE_SEIZE of a stopped task waits for it to re-trap, which
    a frozen task never does (CRIU would hang until its timeout). phaul's CRIU then seizes the
    tree with ptrace alone (patches/criu/0002-*)."""
    try:
        tasks = (state.parent / "tasks").read_text().split()
    except OSError:
        return False
    return any(procfs.state(t) == "T" for t in tasks)


def thaw(state: Path | None) -> None:
    """Let a cgroup frozen by a dump run again; harmless when it is not frozen."""
    if state is None:
        return
    try:
        state.write_text("THAWED")
    except OSError as e:
        if state.exists():
            log.warning("cannot thaw %s: %s", state, e)


def pids(state: Path) -> list[int]:
    """The processes in the cgroup (none once it is gone)."""
    try:
        return [int(p) for p in (state.parent / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def is_frozen(state: Path | None) -> bool:
    if state is None:
        return False
    try:
        return state.read_text().strip() != "THAWED"
    except OSError:
        return False


def freeze(state: Path, timeout: float = 5.0) -> float:
    """Freeze the cgroup and wait until it is FROZEN; returns the ms it took."""
    t0 = time.monotonic()
    state.write_text("FROZEN")
    while state.read_text().strip() != "FROZEN":
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{state} did not reach FROZEN within {timeout:g} s")
        time.sleep(0.0005)
    return (time.monotonic() - t0) * 1000
