"""Conversions between the agent protocol's messages and phaul's dataclasses."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from phaul.checks import CheckResult, CheckState
from phaul.containers import ContainerConfig, ContainerInfo
from phaul.migration.journal import JournalEntry
from phaul.migration.recovery import Outcome
from phaul.migration.report import Report, Result, Round
from phaul.rpc import phaul_pb2 as pb


def config_to_proto(c: ContainerConfig) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        id=c.id, template=c.template, memory=c.memory or 0, cpus=c.cpus or 0.0, pids=c.pids or 0,
        ip=c.ip or "", gateway=c.gateway or "", mac=c.mac or "", args=c.args, cap_add=c.cap_add, seccomp=c.seccomp,
        packages=c.packages, init=c.init, rootfs=c.rootfs, image=c.image, image_ref=c.image_ref, env=c.env,
        uid=c.uid, gid=c.gid, groups=c.groups, cwd=c.cwd,
    )


def config_from_proto(m: pb.ContainerConfig) -> ContainerConfig:
    return ContainerConfig(
        id=m.id, template=m.template or "busybox", memory=m.memory or None, cpus=m.cpus or None,
        pids=m.pids or None, ip=m.ip or None, gateway=m.gateway or None, mac=m.mac or None, args=list(m.args),
        cap_add=list(m.cap_add), seccomp=m.seccomp or "default",
        packages=list(m.packages), init=m.init, rootfs=m.rootfs, image=m.image, image_ref=m.image_ref,
        env=list(m.env), uid=m.uid, gid=m.gid, groups=list(m.groups), cwd=m.cwd or "/",
    )


def info_to_proto(i: ContainerInfo) -> pb.ContainerInfo:
    return pb.ContainerInfo(
        id=i.id, state=i.state, pid=i.pid or 0,
        memory_used=-1 if i.memory_used is None else i.memory_used,
        memory_limit=-1 if i.memory_limit is None else i.memory_limit, ip=i.ip or "",
        exit_status=i.exit_status or "",
    )


def info_from_proto(m: pb.ContainerInfo) -> ContainerInfo:
    return ContainerInfo(
        id=m.id, state=m.state, pid=m.pid or None,
        memory_used=None if m.memory_used < 0 else m.memory_used,
        memory_limit=None if m.memory_limit < 0 else m.memory_limit, ip=m.ip or None,
        exit_status=m.exit_status or None,
    )


def report_to_proto(r: Report) -> pb.Report:
    d = asdict(r)
    d["rounds"] = [pb.Round(**x) for x in d["rounds"]]
    return pb.Report(**d)


def report_from_proto(m: pb.Report) -> Report:
    d: dict[str, Any] = {f.name: getattr(m, f.name) for f in fields(Report)}
    d["rounds"] = [Round(**{f.name: getattr(x, f.name) for f in fields(Round)}) for x in m.rounds]
    d["criu_ms"] = dict(m.criu_ms)
    d["phases_ms"] = dict(m.phases_ms)
    d["result"] = Result(m.result)
    return Report(**d)


def check_to_proto(c: CheckResult) -> pb.CheckResult:
    return pb.CheckResult(name=c.name, status=c.status, message=c.message, host=c.host)


def check_from_proto(m: pb.CheckResult) -> CheckResult:
    return CheckResult(m.name, CheckState(m.status), m.message, m.host)


def record_to_proto(e: JournalEntry, state: str) -> pb.MigrationRecord:
    """A journaled migration for ListMigrations; `state` is its result, or in_progress or in_doubt."""
    return pb.MigrationRecord(
        migration_id=e.migration_id, role=e.role, ct=e.ct, peer=e.peer, state=state, step=e.step,
        started_at=e.started_at, updated_at=e.updated_at, error=e.error[:1000], steps=e.steps[-50:],
    )


def outcome_to_proto(o: Outcome) -> pb.RecoverOutcome:
    return pb.RecoverOutcome(migration_id=o.migration_id, role=o.role, result=o.result, message=o.message)
