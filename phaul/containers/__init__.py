"""Container kinds behind one small interface.

A kind knows how to create, run, inspect and remove its containers, and how to
checkpoint and restore one with CRIU. The migration code talks only to
`ContainerKind`; `phaul.containers.runc.RuncContainers` is the OCI/runc kind.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from phaul.containers.console import Chunk

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
    cap_add: list[str] = field(default_factory=list)  # capabilities beyond the default set, e.g. ["CAP_NET_RAW"]
    seccomp: str = "default"  # "default": the Docker/Podman default profile; "unconfined": no filter
    packages: list[str] = field(default_factory=list)  # template "debian": the packages installed into it
    init: str = ""  # "": the command is PID 1; "systemd": /lib/systemd/systemd boots (debian with systemd)
    rootfs: str = ""  # template "rootfs": the directory or tarball copied in (read at create only)
    image: str = ""  # template "image": the OCI image layout or `docker save` archive (read at create only)
    image_ref: str = ""  # template "image": the tag to unpack when the image holds several
    env: list[str] = field(default_factory=list)  # the process environment, "K=V" (empty: phaul's default)
    uid: int = 0  # the command's user and groups (an image's USER)
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    cwd: str = "/"  # the command's working directory (an image's WORKDIR)


@dataclass
class ContainerInfo:
    """What `phaul ct list` shows."""

    id: str
    state: str  # "created" (bundle, no process), "running", "paused", "stopped"
    pid: int | None = None
    memory_used: int | None = None
    memory_limit: int | None = None
    ip: str | None = None
    exit_status: str | None = None  # a stopped container's init: "exit N" or "signal N", when known


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
    def logs(self, ct_id: str, lines: int = 0) -> bytes:
        """The last `lines` lines of the container's stdout and stderr (0: all that is kept)."""

    @abstractmethod
    def logs_since(self, ct_id: str, file_id: int, offset: int) -> Chunk:
        """What the container wrote after (file_id, offset) (0, 0: nothing, the position now)."""

    @abstractmethod
    def container_dir(self, ct_id: str) -> Path:
        """The directory holding everything of this container on this host."""

    # -- what migration needs ------------------------------------------------

    @abstractmethod
    def criu_config_path(self, ct_id: str) -> Path:
        """The CRIU configuration file passed to CRIU on this container's dumps and restores."""

    @abstractmethod
    def set_criu_options(self, ct_id: str, options: str = "") -> None:
        """The configuration of this container's next dump or restore: the kind's own
        options (always there) and `options`, CRIU configuration lines."""

    @abstractmethod
    def checkpoint_cmd(
        self, ct_id: str, image_dir: Path, work_dir: Path, *, leave_running: bool = False,
        tcp_established: bool = True, parent_path: Path | None = None,
        pre_dump: bool = False, lazy_port: int = 0,
    ) -> Argv:
        """The argument list that dumps the container into `image_dir`; with `lazy_port`
        private memory stays behind, served on that port of 127.0.0.1 once the dump is done."""

    def freezer_state(self, ct_id: str) -> Path | None:
        """The freezer.state file CRIU freezes this container with, if phaul may freeze it first."""
        return None

    def cgroup_procs(self, ct_id: str) -> builtins.list[Path]:
        """The cgroup.procs files that list every process of the container (they need not exist yet)."""
        return []

    @abstractmethod
    def restore(
        self, ct_id: str, image_dir: Path, work_dir: Path, *, tcp_established: bool = True, timeout: float = 300.0,
        lazy_pages: bool = False,
    ) -> ContainerInfo:
        """Restore the container (whose directory is in place) from `image_dir`;
        ToolFailed when it fails or takes longer than `timeout` s. `lazy_pages`: private
        memory comes later from CRIU's lazy-pages daemon, started in `work_dir` already."""

    @abstractmethod
    def adopt(self, ct_id: str, config: ContainerConfig) -> None:
        """Make a container directory moved here from another host this host's own: every
        configuration file of it is rebuilt from `config` (validated), none is read."""

    @abstractmethod
    def resume(self, ct_id: str, keep_stopped: tuple[int, ...] = ()) -> ContainerInfo:
        """Let every process of a container restored held stopped run, but those whose PIDs (in the
        container) are in `keep_stopped` (stopped when dumped); returns its state then."""
