"""Preflight: can container ID move from this host to HOST? (`phaul check`, and
the first step of every `phaul migrate`).

Each check ends pass, warning or failure (phaul.checks.CheckState) with the reason. The source
checks the container and its own tools, measures what the container needs and
dumps its CPU's features (`criu cpuinfo dump`); the destination checks its
CRIU against the source's, its CPU against that image (`criu cpuinfo check`),
its free memory and disk against the needs, that the container's ID and
address are free there, its bridge and runc. `migrate` refuses on a failure
unless told `--force CHECK` for that check.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from phaul.agent.host import Host
from phaul.channels import messages
from phaul.channels.client import Agent
from phaul.checks import CheckResult, CheckState
from phaul.containers import ContainerConfig
from phaul.errors import Conflict, InvalidInput, NotFound, PhaulError
from phaul.linux import criu, kobjects, network, procfs, task_owners
from phaul.linux.doctor import criu_path, criu_version
from phaul.linux.run import probe
from phaul.rpc import phaul_pb2 as pb

log = logging.getLogger(__name__)

CHECKS = ("agent", "container", "objects", "users", "criu", "cpu", "memory", "disk", "ct-id", "address", "bridge", "runc")
CPUINFO_MAX = 64 << 10
TOOL_TIMEOUT = 30.0


OFFLINE_UNCHECKED = ("objects", "users", "criu", "cpu")  # what an offline move never needs


def check_force(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate `--force` names."""
    bad = [n for n in names if n not in CHECKS]
    if bad:
        raise InvalidInput(f"unknown check {bad[0][:40]!r} to force", f"name one of: {', '.join(CHECKS)}")
    return tuple(dict.fromkeys(names))


def refusal(results: list[CheckResult], force: tuple[str, ...]) -> Conflict | None:
    """The error that stops a migration: failures not forced; None when it may go ahead."""
    failed = [r for r in results if r.status == CheckState.FAILURE and r.name not in force]
    if not failed:
        return None
    lines = "; ".join(f"{r.name} on {r.host}: {r.message}" for r in failed)
    names = " ".join(f"--force {n}" for n in dict.fromkeys(r.name for r in failed))
    return Conflict(f"preflight failed: {lines}", f"fix it, or migrate anyway with {names} (see `phaul check`)")


# -- the source ---------------------------------------------------------------------------


@dataclass
class Needs:
    """What the source measured for the destination to check."""

    config: ContainerConfig
    criu_version: str
    memory: int
    disk: int
    cpuinfo: bytes


def source_checks(host: Host, ct_id: str, offline: bool = False) -> tuple[list[CheckResult], Needs | None]:
    """The source's own checks, and what the destination must check (None when the
    container cannot be moved at all). `offline`: no memory moves (phaul.migration.offline):
    a container that is not running passes, and nothing CRIU needs is checked."""
    out: list[CheckResult] = []
    me = host.name
    try:
        info = host.containers.info(ct_id)
        config = host.containers.config(ct_id)
    except NotFound as e:
        return [CheckResult("container", CheckState.FAILURE, e.message, me)], None
    if offline:
        out.append(CheckResult("container", CheckState.PASS, f"{ct_id} is {info.state}: moved offline", me))
    elif info.state != "running":
        out.append(CheckResult("container", CheckState.FAILURE, f"{ct_id} is {info.state}, not running", me))
    else:
        out.append(CheckResult("container", CheckState.PASS, f"{ct_id} runs (init PID {info.pid})", me))
        if info.pid:
            out.append(_objects_check(me, info.pid))
    path = criu_path()
    version = criu_version(path) if path else None
    if version is None:
        out.append(CheckResult("criu", CheckState.FAILURE, "no usable CRIU here; run `make setup`", me))
    else:
        out.append(CheckResult("criu", CheckState.PASS, f"CRIU {_v(version)} at {path}", me))
    if info.state == "running" and info.pid and path and not offline:
        out.append(_users_check(host, info.pid, path))
    out.append(_runc_check(me))
    cpuinfo, why = _cpuinfo_dump(host) if path and not offline else (b"", "no CRIU")
    if not cpuinfo:
        out.append(CheckResult("cpu", CheckState.WARNING, f"could not describe this host's CPU for the destination: {why}", me))
    memory = info.memory_used or 0
    disk = _du(host.containers.container_dir(ct_id)) + memory  # files + the images of its memory
    if offline:  # the destination starts it afresh: no CRIU, no CPU to match; only its files take room
        out = [r for r in out if r.name not in OFFLINE_UNCHECKED]
        return out, Needs(config, "", memory, _du(host.containers.container_dir(ct_id)), b"")
    return out, Needs(config, _v(version) if version else "", memory, disk, cpuinfo)


def _objects_check(me: str, init_pid: int) -> CheckResult:
    """Refuse what the container holds that cannot arrive (phaul.linux.kobjects)."""
    found = kobjects.unmovable(init_pid)
    if not found:
        held = "no console or fanotify descriptor held"
        return CheckResult("objects", CheckState.PASS, held, me)
    message, fix = kobjects.describe(found)
    return CheckResult("objects", CheckState.FAILURE, f"the container holds what cannot move: {message} (fix: {fix})", me)


def _users_check(host: Host, init_pid: int, criu_path: str) -> CheckResult:
    """Tasks of other users need a CRIU that can read their limits (phaul.linux.task_owners)."""
    me = host.name
    foreign = task_owners.foreign_tasks(procfs.tasks_of(init_pid))
    if not foreign:
        return CheckResult("users", CheckState.PASS, f"every task runs as uid {os.getuid()}, gid {os.getgid()}", me)
    listed = ", ".join(map(str, foreign[:5])) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    tmp = host.state_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    ability = task_owners.dump_ability(criu_path, tmp)
    if ability.possible:
        return CheckResult("users", CheckState.PASS, f"tasks of other users ({listed}): {ability.how}", me)
    return CheckResult(
        "users", CheckState.FAILURE,
        f"the container has tasks of other users ({listed}) and {ability.how}; to move it: {task_owners.FIX}", me,
    )


def _cpuinfo_dump(host: Host) -> tuple[bytes, str]:
    tmp = host.state_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp, prefix="cpuinfo.") as d:
        r = probe([criu_path() or "criu", "cpuinfo", "dump", "-D", d, "-o", "cpuinfo.log"], timeout=TOOL_TIMEOUT)
        img = Path(d) / "cpuinfo.img"
        if r.returncode != 0 or not img.is_file():
            return b"", _criu_error(Path(d) / "cpuinfo.log", r)
        data = img.read_bytes()
        return (data, "") if len(data) <= CPUINFO_MAX else (b"", "the CPU image is too large")


# -- the destination --------------------------------------------------------------------------


def dest_checks(host: Host, source: str, req: pb.PeerCheckRequest, config: ContainerConfig, busy: bool) -> list[CheckResult]:
    """The destination's checks for a container `source` wants to send here. `busy`:
    a migration of this container to this host is already under way."""
    me = host.name
    out = [_criu_check(me, req.criu_version), _cpu_check(host, req.cpuinfo), _memory_check(me, req.need_memory),
           _disk_check(host, req.need_disk), _id_check(host, config.id, busy), _address_check(host, config),
           _bridge_check(host, config), _runc_check(me)]
    return out


def _criu_check(me: str, theirs_text: str) -> CheckResult:
    path = criu_path()
    mine = criu_version(path) if path else None
    if mine is None:
        return CheckResult("criu", CheckState.FAILURE, "no usable CRIU here; run `make setup`", me)
    theirs = tuple(int(x) for x in theirs_text.split(".") if x.isdigit())
    if theirs and mine < theirs:
        return CheckResult(
            "criu", CheckState.FAILURE,
            f"CRIU {_v(mine)} here is older than the source's {theirs_text}: it may not read its images", me,
        )
    if theirs and mine[:2] != theirs[:2]:
        return CheckResult(
            "criu", CheckState.WARNING, f"CRIU {_v(mine)} here, {theirs_text} on the source: newer, should read its images", me
        )
    return CheckResult("criu", CheckState.PASS, f"CRIU {_v(mine)}" + (f", as the source's {theirs_text}" if theirs else ""), me)


def _cpu_check(host: Host, cpuinfo: bytes) -> CheckResult:
    me = host.name
    if not cpuinfo:
        return CheckResult("cpu", CheckState.WARNING, "the source sent no CPU description; not checked", me)
    if criu_path() is None:
        return CheckResult("cpu", CheckState.FAILURE, "no CRIU here to check the CPU with", me)
    tmp = host.state_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp, prefix="cpuinfo.") as d:
        (Path(d) / "cpuinfo.img").write_bytes(cpuinfo)
        r = probe([criu_path() or "criu", "cpuinfo", "check", "-D", d, "-o", "cpuinfo.log"], timeout=TOOL_TIMEOUT)
        if r.returncode == 0:
            return CheckResult(
                "cpu", CheckState.PASS, "this CPU has every feature the container's processes may use (criu cpuinfo check)", me
            )
        return CheckResult(
            "cpu", CheckState.FAILURE, f"this CPU lacks features of the source's: {_criu_error(Path(d) / 'cpuinfo.log', r)}", me
        )


def _memory_check(me: str, need: int) -> CheckResult:
    avail = procfs.mem_available()
    if avail is None:
        return CheckResult("memory", CheckState.WARNING, "cannot read MemAvailable from /proc/meminfo", me)
    if need > avail:
        return CheckResult("memory", CheckState.FAILURE, f"the container uses {_mib(need)}, only {_mib(avail)} is available", me)
    if need > avail * 0.8:
        return CheckResult("memory", CheckState.WARNING, f"the container uses {_mib(need)} of {_mib(avail)} available", me)
    return CheckResult("memory", CheckState.PASS, f"{_mib(avail)} available, the container uses {_mib(need)}", me)


def _disk_check(host: Host, need: int) -> CheckResult:
    me = host.name
    try:
        st = os.statvfs(host.state_dir)
    except OSError as e:
        return CheckResult("disk", CheckState.FAILURE, f"cannot stat the state directory: {e.strerror}", me)
    free = st.f_bavail * st.f_frsize
    if need > free:
        return CheckResult(
            "disk", CheckState.FAILURE, f"the container needs about {_mib(need)}, {host.state_dir} has {_mib(free)} free", me
        )
    if need * 2 > free:
        return CheckResult(
            "disk", CheckState.WARNING,
            f"the container needs about {_mib(need)} of {_mib(free)} free (pre-copy rounds need more)", me,
        )
    return CheckResult("disk", CheckState.PASS, f"{_mib(free)} free in {host.state_dir}, about {_mib(need)} needed", me)


def _id_check(host: Host, ct_id: str, busy: bool) -> CheckResult:
    me = host.name
    if host.containers.container_dir(ct_id).exists():
        return CheckResult("ct-id", CheckState.FAILURE, f"{me} already has a container {ct_id}", me)
    if busy:
        return CheckResult("ct-id", CheckState.FAILURE, f"a migration of {ct_id} to {me} is already under way", me)
    return CheckResult("ct-id", CheckState.PASS, f"no container {ct_id} here", me)


def _address_check(host: Host, config: ContainerConfig) -> CheckResult:
    me = host.name
    if not config.ip:
        return CheckResult("address", CheckState.PASS, "the container has no address of its own", me)
    ident = network.Identity.of(config)
    assert ident is not None
    problem = network.address_problem(ident, me, _configs(host), host.bridge)
    if problem:
        return CheckResult("address", CheckState.FAILURE, problem, me)
    return CheckResult("address", CheckState.PASS, f"{ident.ip} is free here", me)


def _bridge_check(host: Host, config: ContainerConfig) -> CheckResult:
    me = host.name
    if not config.ip:
        return CheckResult("bridge", CheckState.PASS, "the container has no address: no bridge needed", me)
    problem = network.bridge_problem(host.bridge, me)  # ip(8): this agent's network namespace, not /sys
    if problem:
        return CheckResult("bridge", CheckState.FAILURE, problem, me)
    return CheckResult("bridge", CheckState.PASS, f"bridge {host.bridge} is present", me)


def _runc_check(me: str) -> CheckResult:
    path = shutil.which("runc")
    if path is None:
        return CheckResult("runc", CheckState.FAILURE, "runc is not installed (apt-get install runc)", me)
    first = probe([path, "--version"], timeout=TOOL_TIMEOUT).stdout.splitlines()
    return CheckResult("runc", CheckState.PASS, first[0] if first else path, me)


# -- helpers ------------------------------------------------------------------------------------


def _configs(host: Host) -> list[ContainerConfig]:
    out = []
    for info in host.containers.list():
        try:
            out.append(host.containers.config(info.id))
        except PhaulError:
            continue
    return out


def _criu_error(log_path: Path, r: subprocess.CompletedProcess[str]) -> str:
    lines = criu.error_lines(criu.read_log(log_path) or "")
    text = (lines[-1] if lines else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
    return text[-300:]


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _v(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def run(
    host: Host, ct_id: str, dest: Agent, dest_name: str, offline: ContainerConfig | None = None,
) -> tuple[list[CheckResult], Needs | None]:
    """Every check, on this host (the source) and on the destination agent `dest`,
    and what the container needs there (None when it cannot be moved at all).
    `offline`: an offline move or copy (phaul.migration.offline) of a container
    that is this configuration on the destination (a copy's own ID and address)."""
    results, needs = source_checks(host, ct_id, offline is not None)
    if needs is None:
        return results, None
    if offline is not None:
        needs.config = offline
    request = pb.PeerCheckRequest(
        source_name=host.name, config=messages.config_to_proto(needs.config), criu_version=needs.criu_version,
        need_memory=needs.memory, need_disk=needs.disk, cpuinfo=needs.cpuinfo,
    )
    try:
        reply = dest.call("PeerCheck", request, timeout=60)
    except PhaulError as e:
        results.append(CheckResult("agent", CheckState.FAILURE, f"cannot ask {dest_name}: {e.message}", host.name))
        return results, needs
    results.append(CheckResult("agent", CheckState.PASS, f"{dest_name}'s agent answers", host.name))
    theirs = [messages.check_from_proto(c) for c in reply.checks]
    if offline is not None:
        theirs = [c for c in theirs if c.name not in OFFLINE_UNCHECKED]
    return results + theirs, needs
