"""Container kinds behind one small interface.

A kind knows how to create, run, inspect and remove its containers, and how to
checkpoint and restore one with CRIU. The migration code talks only to
`ContainerKind`; `phaul.containers.runc.RuncContainers` is the OCI/runc kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

# A command line. Inside classes with a `list` method (ContainerKind and its kinds) a bare
# `list[...]` annotation names the method: write `Argv` or `builtins.list[...]` there.
Argv = list[str]


@dataclass
class ContainerConfig:
    """What `phaul ct create` asks for; stored with the container and moved with it."""

    id: str
    template: str = "busybox"
    memory: int | None = None  # bytes, cgroup memory limit
    cpus: float | None = None  # CPU quota in CPUs
    pids: int | None = None  # pids.max
    ip: str | None = None  # "ADDR/PREFIX" on the host's bridge (network-transparent migration)
    gateway: str | None = None
    mac: str | None = None  # derived from the ID when an ip is given
    args: list[str] = field(default_factory=list)  # the command given at `ct start`


@dataclass
class ContainerInfo:
    """What `phaul ct list` shows."""

    id: str
    state: str  # "created" (bundle, no process), "running", "paused", "stopped"
    pid: int | None = None
    memory_used: int | None = None
    memory_limit: int | None = None
    ip: str | None = None


@dataclass
class ExecResult:
    returncode: int
    stdout: bytes
    stderr: bytes


class ContainerKind(ABC):
    """One kind of container on one host (one state directory)."""

    @abstractmethod
    def create(self, config: ContainerConfig) -> ContainerInfo: ...

    @abstractmethod
    def start(self, ct_id: str, args: Argv | None = None) -> ContainerInfo: ...

    @abstractmethod
    def exec(self, ct_id: str, args: Argv, timeout: float = 60.0) -> ExecResult: ...

    @abstractmethod
    def list(self) -> list[ContainerInfo]: ...

    @abstractmethod
    def info(self, ct_id: str) -> ContainerInfo: ...

    @abstractmethod
    def stop(self, ct_id: str, timeout: float = 10.0) -> ContainerInfo: ...

    @abstractmethod
    def destroy(self, ct_id: str, timeout: float = 10.0) -> None:
        """Stop it (SIGKILL after `timeout` s; 0: at once) and remove everything of it."""

    @abstractmethod
    def kill(self, ct_id: str) -> None:
        """SIGKILL every process of the container, frozen ones too, so that none runs again."""

    @abstractmethod
    def config(self, ct_id: str) -> ContainerConfig: ...

    @abstractmethod
    def container_dir(self, ct_id: str) -> Path:
        """The directory holding everything of this container on this host."""

    # -- what migration needs ------------------------------------------------

    @abstractmethod
    def criu_config_path(self, ct_id: str) -> Path:
        """The CRIU configuration file passed to CRIU on this container's dumps and restores."""

    @abstractmethod
    def checkpoint_cmd(
        self, ct_id: str, image_dir: Path, work_dir: Path, *, leave_running: bool = False,
        tcp_established: bool = True, parent_path: Path | None = None,
        pre_dump: bool = False,
    ) -> Argv:
        """The argument list that dumps the container into `image_dir`."""

    def freezer_state(self, ct_id: str) -> Path | None:
        """The freezer.state file CRIU freezes this container with, if phaul may freeze it first."""
        return None

    @abstractmethod
    def restore(
        self, ct_id: str, image_dir: Path, work_dir: Path, *, tcp_established: bool = True, timeout: float = 300.0
    ) -> ContainerInfo:
        """Restore the container (whose directory is in place) from `image_dir`;
        ToolFailed when it fails or takes longer than `timeout` s."""

    @abstractmethod
    def rewrite_for_host(self, ct_id: str) -> None:
        """Adapt a container directory copied from another host to this one."""

    @abstractmethod
    def resume(self, ct_id: str) -> ContainerInfo:
        """Let every process of a container restored held stopped run; returns its state then."""
