"""Conversions between the agent protocol's messages and phaul's dataclasses."""

from __future__ import annotations

from phaul.containers import ContainerConfig, ContainerInfo
from phaul.rpc import phaul_pb2 as pb


def config_to_proto(c: ContainerConfig) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        id=c.id, template=c.template, memory=c.memory or 0, cpus=c.cpus or 0.0, pids=c.pids or 0,
        ip=c.ip or "", gateway=c.gateway or "", mac=c.mac or "", args=c.args,
    )


def config_from_proto(m: pb.ContainerConfig) -> ContainerConfig:
    return ContainerConfig(
        id=m.id, template=m.template or "busybox", memory=m.memory or None, cpus=m.cpus or None,
        pids=m.pids or None, ip=m.ip or None, gateway=m.gateway or None, mac=m.mac or None, args=list(m.args),
    )


def info_to_proto(i: ContainerInfo) -> pb.ContainerInfo:
    return pb.ContainerInfo(
        id=i.id, state=i.state, pid=i.pid or 0,
        memory_used=-1 if i.memory_used is None else i.memory_used,
        memory_limit=-1 if i.memory_limit is None else i.memory_limit, ip=i.ip or "",
    )


def info_from_proto(m: pb.ContainerInfo) -> ContainerInfo:
    return ContainerInfo(
        id=m.id, state=m.state, pid=m.pid or None,
        memory_used=None if m.memory_used < 0 else m.memory_used,
        memory_limit=None if m.memory_limit < 0 else m.memory_limit, ip=m.ip or None,
    )
