"""What this host holds of a migrated container, read from the system itself:
the state of a source copy (`source_copy`), making an abandoned one run again
(`ensure_running`; `start_stopped` after an offline move), and the processes a (possibly dead) agent left for a
migration directory. Both the source's failure rules (phaul.migration.failure)
and recovery (phaul.migration.recovery) ask these."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from phaul.agent.host import Host
from phaul.errors import NotFound, PhaulError, ToolFailed
from phaul.linux import criu, procfs
from phaul.linux.run import run

log = logging.getLogger(__name__)


def procs_using(path: Path) -> list[int]:
    """PIDs of live processes that use `path`: their command line names it or
    something under it, or they work in it or under it (a data channel's commands,
    which name their files relative to the migration directory they run in)."""
    return [
        int(d.name) for d in Path("/proc").iterdir()
        if d.name.isdigit() and int(d.name) != os.getpid() and uses(int(d.name), path)
    ]


def uses(pid: int, path: Path) -> bool:
    """Whether live process `pid` uses `path` (`procs_using`)."""
    try:
        works_there = Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(path)
    except OSError:
        works_there = False
    return (works_there or str(path).encode() in _cmdline(pid)) and procfs.alive(pid)


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def kill_data_channel(mdir: Path) -> None:
    """Stop the data channel, and post-copy's page link and page hub, that a (possibly dead)
    agent opened for migration directory `mdir`. (The destination's keeper is not one of
    them: it lives until the last page has arrived.)"""
    try:
        pid = int((mdir / "data-channel.pid").read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid and uses(pid, mdir):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs_using(mdir):  # rsync servers and socats the listener forked, the page hub
        args = _cmdline(p).split(b"\0")
        if os.path.basename(args[0]).decode(errors="replace") in ("socat", "rsync") or args[2:4] == [
            b"phaul.memory.lazy_link", b"hub",
        ]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


_CRIU_UNLOCK = "*filter\n:CRIU - [0:0]\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n-X CRIU\nCOMMIT\n"


def unlock_network(pid: int) -> None:
    """Remove CRIU's network lock from the network namespace of `pid`, left when
    CRIU was killed while it held the container (best effort)."""
    for save, restore in (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")):
        if shutil.which(save) is None:
            continue
        ns = ["nsenter", f"--net=/proc/{pid}/ns/net", "--"]
        try:
            rules = run([*ns, save, "-t", "filter"], timeout=10, check=False).stdout
            if ":CRIU " in rules:
                run([*ns, restore, "-w", "--noflush"], input=_CRIU_UNLOCK, timeout=10, check=False)
                log.info("removed CRIU's network lock from the namespace of %d", pid)
        except ToolFailed as e:
            log.warning("cannot check CRIU's network lock in the namespace of %d: %s", pid, e.message)


def source_copy(host: Host, ct_id: str, mdir: Path) -> str:
    """What the source copy is now: "gate" (dumped, held at the commit gate),
    "dumping" (a dump of it is under way), "running", "frozen" (its processes
    exist but are frozen, with nothing holding them) or "gone"."""
    if criu.CommitGate.attach(mdir / "gate").waiting():
        return "gate"
    if any(b"checkpoint" in _cmdline(p) for p in procs_using(mdir)):
        return "dumping"
    try:
        state = host.containers.info(ct_id).state
    except NotFound:
        return "gone"
    except PhaulError as e:
        log.warning("cannot inspect %s: %s", ct_id, e)
        return "gone" if not host.containers.container_dir(ct_id).exists() else "frozen"
    return {"running": "running", "paused": "frozen"}.get(state, "gone")


def ensure_running(host: Host, ct_id: str) -> bool:
    """Make a source copy whose dump was abandoned run again: thaw it and lift
    CRIU's network lock. True when it runs."""
    t0 = time.monotonic()
    try:
        info = host.containers.info(ct_id)
        if info.state == "paused":
            host.containers.resume(ct_id)
            info = host.containers.info(ct_id)
            if info.pid:
                unlock_network(info.pid)
            log.info("resumed the abandoned copy of %s in %.0f ms", ct_id, (time.monotonic() - t0) * 1000)
        return info.state == "running"
    except PhaulError as e:
        log.error("cannot resume %s: %s", ct_id, e)
        return False


def start_stopped(host: Host, ct_id: str) -> bool:
    """Start a source copy an offline move stopped (phaul.migration.offline), unless it
    runs already. True when it runs."""
    try:
        if host.containers.info(ct_id).state not in ("running", "paused"):
            host.containers.start(ct_id)
        return host.containers.info(ct_id).state == "running"
    except PhaulError as e:
        log.error("cannot start %s again: %s", ct_id, e)
        return False
