"""OCI containers run by runc, one state directory per host.

Layout under `state_dir`:

    runc/                      runc's --root (its own state of running containers)
    containers/ID/phaul.json   the ContainerConfig
    containers/ID/criu.conf    CRIU configuration file, named in config.json (org.criu.config)
    containers/ID/bundle/      the OCI bundle: config.json and rootfs/

A container directory is self-contained: copying its rootfs to another host's
state_dir and calling `adopt` there with the container's configuration
(which rebuilds everything else) makes it restorable there.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from phaul.containers import Argv, ContainerConfig, ContainerInfo, ContainerKind, ExecResult, console, workloads
from phaul.containers.debian import RootfsCache, check_packages
from phaul.containers.seccomp import oci_seccomp
from phaul.containers.template import SOURCES, TEMPLATES, build_rootfs
from phaul.errors import Conflict, InvalidInput, NotFound, PhaulError, ToolFailed
from phaul.linux import criu, freezer, network, procfs
from phaul.linux.fsutil import write_atomic
from phaul.linux.run import run
from phaul.validate import check_id

log = logging.getLogger(__name__)

# PID 1 of a PID namespace ignores signals it has no handler for, so a bare
# `sleep infinity` would ignore `runc kill TERM`; this one exits on TERM/INT.
DEFAULT_ARGS = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]
# force-irmap: CRIU records the path of every inotify watch (systemd holds many), which the
# restore opens inside the container's mounts; without it only a file handle, valid on the
# source's file system alone, and one the destination's image check refuses.
# ghost-limit: files deleted while open travel inside the images up to CRIU's 1 MiB by default;
# the destination's image check takes them up to criu_images.Limits.ghost_bytes (1 GiB).
CRIU_CONF = "force-irmap\nghost-limit 1G\n"
SYSTEMD = "/lib/systemd/systemd"
SYSTEMD_STOP = str(signal.SIGRTMIN + 3)  # systemd's "halt" (37 with glibc)
DEFAULT_CACHE = Path("/var/cache/phaul/rootfs")
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm", "HOME=/root"]
CPU_PERIOD_US = 100_000
MIN_MEMORY = 4 << 20
_UNLIMITED = 1 << 62  # cgroup v1 reports "no limit" as 0x7FFFFFFFFFFFF000
_POLL = 0.05
START_SETTLE = 0.3  # s: a container still running this long after start is reported running
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

# Docker's default capability set less CAP_MKNOD and CAP_NET_RAW (raw sockets:
# spoofed packets on the bridge): enough for ordinary admin work inside the
# container (chown, su), nothing that reaches the host.
_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip
# What `ct create --cap-add` may add: namespaced and harmless to the host and to CRIU.
EXTRA_CAPS = ("CAP_MKNOD", "CAP_NET_RAW", "CAP_SYS_PTRACE")
SECCOMP_MODES = ("default", "unconfined")
# CRIU refuses to dump a task holding a flock/POSIX/OFD lock unless told to carry locks
# (--file-locks). A container's tree is dumped whole, so its locks are always safe to carry:
# every checkpoint (pre-copy rounds, final dump) and every restore passes it.
FILE_LOCKS = "--file-locks"

INITS = ("", "systemd")
# runc 1.1 restores a cgroup v1 container's /sys/fs/cgroup/* binds from the cgroups runc
# itself is in (/proc/self/cgroup), not the container's: run from the agent's (the root),
# every restored container saw the host's whole hierarchies (systemd's read-write). So
# `runc restore` runs from inside the container's own cgroups: this moves the shell into
# each cgroup.procs named before "--", then execs the rest.
_IN_CGROUPS = 'for f; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'


class RuncContainers(ContainerKind):
    """OCI containers on this host, managed with runc under `state_dir`.

    `host` names this host; it keeps cgroup paths apart when two lab "hosts"
    share one kernel (`/phaul-<host>/<ID>`). `bridge` is the bridge addressed
    containers are plugged into (phaul.linux.network); without one, `create` refuses them.
    `cache` is where built root file systems are kept (phaul.containers.debian).
    """

    def __init__(
        self, state_dir: Path, host: str, bridge: str | None = None, cache: RootfsCache | None = None,
        programs: workloads.WorkloadDir | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.host = check_id(host, "host name")
        self.bridge = bridge
        self.cache = cache or RootfsCache(DEFAULT_CACHE)
        self.programs = programs or workloads.find()  # the workload programs templates add
        self.runc_root = self.state_dir / "runc"
        self.containers_dir = self.state_dir / "containers"
        runc = shutil.which("runc")
        if runc is None:
            raise ToolFailed("runc not found on PATH", "install it: apt-get install runc (or run scripts/setup.sh)")
        self.runc_path = Path(runc).resolve()
        criu = shutil.which("criu")
        # Only checkpoint and restore need CRIU; containers run without it.
        self.criu_path: Path | None = Path(criu).resolve() if criu else None

    # ---- paths ---------------------------------------------------------------

    def container_dir(self, ct_id: str) -> Path:
        """The directory holding everything of this container on this host (may not exist yet)."""
        return self.containers_dir / check_id(ct_id)

    def bundle_dir(self, ct_id: str) -> Path:
        """The OCI bundle directory (config.json and rootfs/)."""
        return self.container_dir(ct_id) / "bundle"

    def criu_config_path(self, ct_id: str) -> Path:
        """The CRIU configuration file runc hands to CRIU on checkpoint and restore (org.criu.config)."""
        return self.container_dir(ct_id) / "criu.conf"

    def set_criu_options(self, ct_id: str, options: str = "") -> None:
        path = self.criu_config_path(check_id(ct_id))
        try:  # rewritten in place, never through a link: needs no new inode or block on a full disk
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            write_atomic(path, CRIU_CONF + options)
            return
        with os.fdopen(fd, "w") as f:
            f.write(CRIU_CONF + options)

    def cgroup_path(self, ct_id: str) -> str:
        """The container's cgroup path below every hierarchy's root, as runc gets it."""
        return f"/phaul-{self.host}/{ct_id}"

    # ---- ContainerKind ----------------------------------------------------------

    def create(self, config: ContainerConfig) -> ContainerInfo:
        """Build the rootfs and bundle for `config`; the container is left "created" (no process)."""
        config = dataclasses.replace(config, args=list(config.args))
        if config.init == "systemd" and config.template == "debian" and "systemd" not in config.packages:
            config.packages = [*config.packages, "systemd"]
        _check_config(config)
        ident = network.Identity.of(config)
        if ident is not None:
            network.check_bridge(self.bridge, f"host {self.host}")
            others = [self.config(i.id) for i in self.list()]
            problem = network.address_problem(ident, f"host {self.host}", others, bridge=None)
            if problem:
                raise Conflict(problem, "give the container another address")
        final = self.container_dir(config.id)
        if final.exists():
            raise Conflict(f"container {config.id!r} already exists", f"pick another ID or run `phaul ct destroy {config.id}`")
        if self._runc_state(config.id) is not None:
            raise Conflict(
                f"runc already knows a container {config.id!r} under {self.runc_root} but phaul has no directory for it",
                f"remove the leftover: runc --root {self.runc_root} delete --force {config.id}",
            )
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        # Build under a hidden name and rename at the end: a crash or failure
        # half-way leaves no container and never blocks the ID.
        tmp = Path(tempfile.mkdtemp(prefix=f".{config.id}.", dir=self.containers_dir))
        try:
            (tmp / "bundle").mkdir()
            defaults = build_rootfs(config, tmp / "bundle" / "rootfs", self.cache, self.programs)
            if defaults is not None:  # the image's command, environment, user, working directory
                config.args = config.args or defaults.args
                config.env, config.cwd = config.env or defaults.env, defaults.cwd
                config.uid, config.gid, config.groups = defaults.uid, defaults.gid, defaults.groups
                _check_config(config)
            if config.init == "systemd" and not os.path.lexists(tmp / "bundle" / "rootfs" / SYSTEMD.lstrip("/")):
                raise InvalidInput(f"--init systemd: the root has no {SYSTEMD}", "install systemd in it (debian: it is added)")
            write_atomic(tmp / "criu.conf", CRIU_CONF)
            spec = self._spec(config, final)
            write_atomic(tmp / "bundle" / "config.json", json.dumps(spec, indent=2) + "\n")
            write_atomic(tmp / "phaul.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")
            try:
                tmp.rename(final)
            except OSError as e:  # another create of the same ID won the race
                raise Conflict(f"container {config.id!r} already exists", f"pick another ID ({e.strerror})") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("created container %s in %s", config.id, final)
        return self.info(config.id)

    def start(self, ct_id: str, args: Argv | None = None) -> ContainerInfo:
        """Run the container's command (or `args`, stored as its new command); returns once it runs."""
        config = self.config(ct_id)
        state = self._runc_state(ct_id)
        if state is not None:
            if state["status"] in ("running", "paused"):
                raise Conflict(f"container {ct_id!r} is already {state['status']}", f"stop it first: phaul ct stop {ct_id}")
            self._runc("delete", "--force", ct_id)  # exited on its own: clear runc's record
        if args is not None:
            if not args:
                raise InvalidInput("empty command", "give the program to run and its arguments")
            config.args = list(args)
            spec = self._read_spec(ct_id)
            spec["process"]["args"] = list(args)
            write_atomic(self.bundle_dir(ct_id) / "config.json", json.dumps(spec, indent=2) + "\n")
            write_atomic(self.container_dir(ct_id) / "phaul.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        fd, log_name = tempfile.mkstemp(prefix=f"phaul-runc-{ct_id}-", suffix=".log")
        os.close(fd)
        try:
            ident = network.Identity.of(config)
            # An addressed container is created, plugged into the bridge, then started.
            cmd = self._base("--log", log_name) + (["create"] if ident else ["run", "--detach"])
            cmd += ["--bundle", str(self.bundle_dir(ct_id)), ct_id]
            # The container inherits runc's stdout and stderr: the console keeper's pipe (its log).
            rc = console.run(cmd, self.log_dir(ct_id), timeout=60)
            if rc == 0 and ident is not None:
                rc = self._plug_and_start(ident)
            if rc != 0:
                self._runc("delete", "--force", ct_id)
                raise ToolFailed(
                    f"runc could not start container {ct_id!r} (exit {rc}): {_tail(Path(log_name), 10)}",
                    f"check the command {config.args or DEFAULT_ARGS} exists in the rootfs and the limits are sane",
                )
        finally:
            os.unlink(log_name)
        deadline = time.monotonic() + 10
        settled = None  # a command that exits at once is reported, not "running"
        while True:
            state = self._runc_state(ct_id)
            status = state["status"] if state else "created"
            now = time.monotonic()
            if status == "running":
                settled = settled or now + START_SETTLE
            if status == "stopped":
                self._wait_exit_status(ct_id)
                log.warning("container %s exited right after start (%s)", ct_id, console.exit_status(self.log_dir(ct_id)))
                break
            if (settled and now >= settled) or now > deadline:
                break
            time.sleep(_POLL)
        log.info("started container %s (%s)", ct_id, status)
        return self.info(ct_id)

    def log_dir(self, ct_id: str) -> Path:
        """The container's console log (phaul.containers.console): moves with it."""
        return self.container_dir(ct_id) / console.LOG_DIR

    def logs(self, ct_id: str, lines: int = 0) -> bytes:
        """The last `lines` lines of the container's stdout and stderr (0: all that is kept)."""
        self.config(ct_id)  # NotFound
        return console.tail(self.log_dir(ct_id), lines)

    def logs_since(self, ct_id: str, file_id: int, offset: int) -> console.Chunk:
        """What the container wrote after (file_id, offset) (0, 0: from now on)."""
        self.config(ct_id)  # NotFound
        return console.read_since(self.log_dir(ct_id), file_id, offset)

    def _wait_exit_status(self, ct_id: str, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while console.exit_status(self.log_dir(ct_id)) is None and time.monotonic() < deadline:
            time.sleep(_POLL)

    def exec(self, ct_id: str, args: Argv, timeout: float = 60.0) -> ExecResult:
        """Run `args` inside the running container; returns its exit code and output."""
        if not args:
            raise InvalidInput("empty command", "give the program to run and its arguments")
        self._require_running(ct_id)
        cmd = self._base() + ["exec", ct_id, *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # runc exec forwards SIGTERM to the command
            try:
                proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise ToolFailed(
                f"command {args!r} in container {ct_id!r} did not finish within {timeout:g} s",
                "give it a longer timeout or run it in the background",
            ) from None
        return ExecResult(proc.returncode, out, err)

    def list(self) -> list[ContainerInfo]:
        """Every container in this state directory, created ones too, sorted by ID."""
        if not self.containers_dir.is_dir():
            return []
        states = self._runc_states()
        result: builtins.list[ContainerInfo] = []
        for d in sorted(self.containers_dir.iterdir()):
            if d.name.startswith(".") or not (d / "phaul.json").is_file():
                continue  # a create in progress or failed half-way
            try:
                result.append(self._info(self.config(d.name), states.get(d.name)))
            except NotFound:
                continue  # destroyed meanwhile
        return result

    def info(self, ct_id: str) -> ContainerInfo:
        """State, init PID, memory use and limit, and address of one container."""
        config = self.config(ct_id)
        return self._info(config, self._runc_state(ct_id))

    def stop(self, ct_id: str, timeout: float = 10.0) -> ContainerInfo:
        """SIGTERM the container's init, SIGKILL after `timeout` s, delete runc's record.

        The bundle stays: the container is "created" afterwards and can be started again.
        """
        self.config(ct_id)  # NotFound
        state = self._runc_state(ct_id)
        if state is None:
            return self.info(ct_id)
        if state["status"] == "paused":
            self._runc("resume", ct_id, check=False)
        if state["status"] in ("running", "paused"):
            # systemd halts on SIGRTMIN+3 (and ignores SIGTERM); other inits get SIGTERM
            self._runc("kill", ct_id, SYSTEMD_STOP if self.config(ct_id).init == "systemd" else "TERM", check=False)
            if not self._wait_stopped(ct_id, timeout):
                log.info("container %s ignored SIGTERM for %g s; killing it", ct_id, timeout)
                self._runc("kill", ct_id, "KILL", check=False)
                self._wait_stopped(ct_id, 5)
        proc = self._runc("delete", ct_id, check=False)
        if proc.returncode != 0:
            self._runc("delete", "--force", ct_id)
        network.unplug(ct_id)
        console.wait_keeper(self.log_dir(ct_id))
        log.info("stopped container %s", ct_id)
        return self.info(ct_id)

    def resume(self, ct_id: str, keep_stopped: tuple[int, ...] = ()) -> ContainerInfo:
        """Let the container run again: thaws a paused one and sends SIGCONT to a tree
        restored stopped (CRIU's leave-stopped), but to the tasks whose container PIDs are in
        `keep_stopped`; a running one is left as it is. This ends a migration's freeze, so
        it runs runc once (its state), twice for a paused one, and signals the tasks itself."""
        config = self.config(ct_id)  # NotFound
        state = self._runc_state(ct_id)
        if state is None or state["status"] not in ("running", "paused"):
            raise Conflict(f"container {ct_id!r} has no processes to resume", f"start it: phaul ct start {ct_id}")
        if state["status"] == "paused":
            self._runc("resume", ct_id)
        self._continue_all_but(ct_id, set(keep_stopped), int(state.get("pid") or 0))
        log.info("resumed container %s", ct_id)
        return ContainerInfo(id=ct_id, state="running", pid=state.get("pid") or None, memory_limit=config.memory, ip=config.ip)

    def _continue_all_but(self, ct_id: str, keep: set[int], init: int) -> None:
        """SIGCONT to every process of the container (init `init`) whose PID in it is not in `keep`."""
        state = self.freezer_state(ct_id)
        pids = freezer.pids(state) if state is not None else procfs.tree(init)
        for pid in pids:
            ns_pid = procfs.status(pid).get("NSpid", "").split()
            if ns_pid and int(ns_pid[-1]) in keep:
                log.info("container %s: PID %s (%s here) was stopped when dumped: left stopped", ct_id, ns_pid[-1], pid)
                continue
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def kill(self, ct_id: str) -> None:
        for path in self.cgroup_dirs(check_id(ct_id)):
            _kill_cgroup(path)
        freezer.thaw(self.freezer_state(ct_id))  # a frozen process dies when it wakes, before it runs

    def destroy(self, ct_id: str, timeout: float = 10.0) -> None:
        """Stop the container if it runs and remove everything of it: runc state, cgroups, directory."""
        d = self.container_dir(ct_id)
        if not d.is_dir():
            raise NotFound(f"no container {ct_id!r} on host {self.host!r}", "see `phaul ct list` for the containers here")
        if (d / "phaul.json").is_file() and self._runc_state(ct_id) is not None:
            try:
                self.stop(ct_id, timeout)
            except PhaulError as e:
                log.warning("stopping %s before destroy failed (%s); forcing", ct_id, e)
        self._runc("delete", "--force", ct_id)
        network.unplug(ct_id)
        self._remove_cgroups(ct_id)
        console.wait_keeper(self.log_dir(ct_id))
        shutil.rmtree(d)
        log.info("destroyed container %s", ct_id)

    def config(self, ct_id: str) -> ContainerConfig:
        """The stored ContainerConfig of the container, validated as `create` validates one."""
        path = self.container_dir(ct_id) / "phaul.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(
                f"no container {ct_id!r} on host {self.host!r}", "see `phaul ct list` for the containers here"
            ) from None
        except (OSError, ValueError) as e:
            raise ToolFailed(f"cannot read {path}: {e}", f"fix or remove the file, then `phaul ct destroy {ct_id}`") from e
        known = {f.name for f in dataclasses.fields(ContainerConfig)}
        try:
            config = ContainerConfig(**{k: v for k, v in data.items() if k in known})
            if config.id != ct_id or not isinstance(config.args, builtins.list):
                raise InvalidInput(f"it describes {str(config.id)[:80]!r} with command {str(config.args)[:80]}")
            _check_config(config)
        except (InvalidInput, TypeError, AttributeError) as e:
            raise InvalidInput(
                f"{path} is not a valid configuration of {ct_id!r}: {getattr(e, 'message', e)}",
                f"fix or remove the file, then `phaul ct destroy {ct_id}`",
            ) from None
        return config

    # ---- checkpoint / restore (used by migration) -----------------------------

    def checkpoint_cmd(
        self,
        ct_id: str,
        image_dir: Path,
        work_dir: Path,
        *,
        leave_running: bool = False,
        tcp_established: bool = True,
        parent_path: Path | None = None,
        pre_dump: bool = False,
        lazy_port: int = 0,
    ) -> Argv:
        """The `runc checkpoint` argument list; CRIU logs to work_dir/dump.log, runc to work_dir/runc.log.
        `pre_dump`: memory only, with dirty tracking (needs soft-dirty); the container keeps running.

        Run it with stdin at /dev/null; on failure build the error with `criu_error`.
        """
        check_id(ct_id)
        cmd = self._base("--log", str(Path(work_dir).resolve() / "runc.log"), "--criu", str(self._criu()))
        cmd += ["checkpoint", "--image-path", str(Path(image_dir).resolve()), "--work-path", str(Path(work_dir).resolve())]
        cmd.append(FILE_LOCKS)
        if leave_running:
            cmd.append("--leave-running")
        if tcp_established:
            cmd.append("--tcp-established")
        if parent_path is not None:
            cmd += ["--parent-path", str(parent_path)]  # CRIU resolves it relative to the image dir
        if pre_dump:
            cmd.append("--pre-dump")
        if lazy_port:  # CRIU listens on the port only; `address 127.0.0.1` in its configuration (lazy_link.SOURCE_CRIU_OPTIONS)
            cmd += ["--lazy-pages", "--page-server", f"127.0.0.1:{lazy_port}"]
        return cmd + [ct_id]

    def cgroup_procs(self, ct_id: str) -> builtins.list[Path]:
        rel = self.cgroup_path(check_id(ct_id)).lstrip("/")
        return [mount / rel / "cgroup.procs" for mount in _cgroup_mounts()]

    def freezer_state(self, ct_id: str) -> Path | None:
        """The container's cgroup v1 freezer.state (phaul.linux.freezer), or None without one."""
        return freezer.state_file(self.cgroup_path(check_id(ct_id)))

    def restore_cmd(
        self, ct_id: str, image_dir: Path, work_dir: Path, *, tcp_established: bool = True, lazy_pages: bool = False,
    ) -> Argv:
        """The `runc restore --detach` argument list; CRIU logs to work_dir/restore.log, runc to work_dir/runc.log.

        Run it under phaul.containers.console (the restored container inherits its stdout and stderr).
        """
        check_id(ct_id)
        cmd = self._base("--log", str(Path(work_dir).resolve() / "runc.log"), "--criu", str(self._criu()))
        cmd += ["restore", "--detach", "--bundle", str(self.bundle_dir(ct_id))]
        cmd += ["--image-path", str(Path(image_dir).resolve()), "--work-path", str(Path(work_dir).resolve())]
        cmd.append(FILE_LOCKS)
        if tcp_established:
            cmd.append("--tcp-established")
        if lazy_pages:
            cmd.append("--lazy-pages")
        procs = [str(d / "cgroup.procs") for d in self._make_cgroups(ct_id)]
        return ["sh", "-c", _IN_CGROUPS, "phaul-in-cgroups", *procs, "--", *cmd, ct_id]

    def _make_cgroups(self, ct_id: str) -> builtins.list[Path]:
        """The container's cgroup directory in every cgroup v1 hierarchy, created where missing."""
        rel = Path(self.cgroup_path(ct_id).lstrip("/"))
        dirs = []
        for mount in _cgroup_mounts():
            if (mount / "cgroup.controllers").exists():
                continue  # cgroup v2: runc mounts a cgroup2 of the container's own, no binds
            for part in reversed([rel, *rel.parents][:-1]):  # top down
                d = mount / part
                d.mkdir(exist_ok=True)
                for knob in ("cpuset.cpus", "cpuset.mems"):  # a new cpuset takes no task until set
                    if (d / knob).exists() and not (d / knob).read_text().strip():
                        (d / knob).write_text((d.parent / knob).read_text())
            dirs.append(mount / rel)
        return dirs

    def checkpoint(self, ct_id: str, image_dir: Path, work_dir: Path, **options: Any) -> None:
        """Run `checkpoint_cmd` to completion; ToolFailed with CRIU's log tail if it fails."""
        Path(image_dir).mkdir(parents=True, exist_ok=True)
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        cmd = self.checkpoint_cmd(ct_id, image_dir, work_dir, **options)
        proc = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True)
        if proc.returncode != 0:
            raise self.criu_error(ct_id, "checkpoint", work_dir, proc.returncode, proc.stderr)

    def restore(
        self, ct_id: str, image_dir: Path, work_dir: Path, *, tcp_established: bool = True, timeout: float = 300.0,
        lazy_pages: bool = False,
    ) -> ContainerInfo:
        """Run `restore_cmd` to completion; the container runs afterwards. ToolFailed with CRIU's log tail."""
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        cmd = self.restore_cmd(ct_id, image_dir, work_dir, tcp_established=tcp_established, lazy_pages=lazy_pages)
        try:  # the restored container's stdout and stderr: a new console keeper's pipe, appending to its log
            rc = console.run(cmd, self.log_dir(ct_id), timeout)
        except ToolFailed:
            raise self.criu_error(ct_id, "restore", work_dir, -1, f"runc restore did not finish within {timeout:.0f} s") from None
        if rc != 0:  # runc removes what it created; never delete here: the ID may name a running container
            console.wait_keeper(self.log_dir(ct_id))
            for d in self.cgroup_dirs(ct_id):  # those restore_cmd made, if empty (rmdir refuses others)
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise self.criu_error(ct_id, "restore", work_dir, rc)
        return self.info(ct_id)

    def criu_error(
        self,
        ct_id: str,
        action: Literal["checkpoint", "restore"],
        work_dir: Path,
        returncode: int,
        output: bytes | str = b"",
    ) -> ToolFailed:
        """The error for a failed `runc checkpoint`/`restore`: runc's message and the tail of CRIU's log."""
        work_dir = Path(work_dir)
        criu_log = work_dir / ("dump.log" if action == "checkpoint" else "restore.log")
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        failure = criu.explain_log(criu_log)  # CRIU's own cause first: runc says only "criu failed: type NOTIFY errno 0"
        parts = [f"runc {action} of {ct_id!r} failed (exit {returncode}): {failure}"]
        runc_said = [output.strip()[-2000:], _tail(work_dir / "runc.log", 5)]
        if failure.cause:  # runc's own words add nothing to CRIU's then
            runc_said = ["\n".join(ln for ln in t.splitlines() if "criu failed: type" not in ln) for t in runc_said]
        if runc_said[0]:
            parts.append(runc_said[0])
        parts.append(f"runc log:\n{runc_said[1]}")
        if criu_log.exists():
            tail = criu.log_tail(criu_log, 12, context=12) or f"({criu_log} not written: CRIU did not start)"
            parts.append(f"{criu_log}:\n{tail}")
            hint = f"read {criu_log} for CRIU's full account"
            hint = f"{failure.fix}; {hint}" if failure.cause else hint
        else:
            hint = f"runc stopped before CRIU ran; `runc --root {self.runc_root} list` shows what runc holds"
        return ToolFailed("\n".join(parts), hint)

    def adopt(self, ct_id: str, config: ContainerConfig) -> None:
        """Make a container directory moved here from another host this host's own:
        its bundle's config.json, phaul.json and criu.conf are written anew from
        `config` (validated here), whatever was there before; only bundle/rootfs is kept."""
        config = dataclasses.replace(config, args=list(config.args))
        _check_config(config)
        if config.id != ct_id:
            raise InvalidInput(f"the configuration describes {config.id!r}, not {ct_id!r}")
        ct_dir = self.container_dir(ct_id)
        # write_atomic renames over the name: a link there is replaced, never followed.
        write_atomic(self.criu_config_path(ct_id), CRIU_CONF)
        write_atomic(self.bundle_dir(ct_id) / "config.json", json.dumps(self._spec(config, ct_dir), indent=2) + "\n")
        write_atomic(ct_dir / "phaul.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    # ---- internals ------------------------------------------------------------

    def _criu(self) -> Path:
        if self.criu_path is None:
            raise ToolFailed("criu not found on PATH", "install CRIU >= 4.2: scripts/setup.sh")
        return self.criu_path

    def _plug_and_start(self, ident: network.Identity) -> int:
        """Plug the created container's eth0 into the bridge, then let it run; runc's exit status."""
        state = self._runc_state(ident.ct_id)
        try:
            if not state or not state.get("pid"):
                raise ToolFailed(
                    f"runc created {ident.ct_id!r} but reports no process", f"see `runc --root {self.runc_root} list`"
                )
            assert self.bridge is not None  # create refuses addressed containers without one
            network.plug(ident, int(state["pid"]), self.bridge)
        except BaseException:
            self._runc("delete", "--force", ident.ct_id, check=False)
            network.unplug(ident.ct_id)
            raise
        rc = self._runc("start", ident.ct_id, check=False).returncode
        if rc != 0:
            network.unplug(ident.ct_id)
        return rc

    def _base(self, *global_opts: str) -> Argv:
        return [str(self.runc_path), "--root", str(self.runc_root), *global_opts]

    def _runc(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(
            self._base() + list(args), timeout=timeout, check=check, what=f"`runc {' '.join(args)}`",
            hint=f"runc's state is under {self.runc_root}; check `runc list` and the kernel log",
        )

    def _runc_state(self, ct_id: str) -> dict[str, Any] | None:
        """runc's view of the container, or None when runc does not know it."""
        proc = self._runc("state", ct_id, check=False)
        if proc.returncode != 0:
            if "does not exist" in proc.stderr:
                return None
            raise ToolFailed(f"`runc state {ct_id}` failed: {proc.stderr.strip()}", f"runc's state is under {self.runc_root}")
        return json.loads(proc.stdout)

    def _runc_states(self) -> dict[str, dict[str, Any]]:
        proc = self._runc("list", "--format", "json")
        return {s["id"]: s for s in json.loads(proc.stdout or "null") or []}

    def _info(self, config: ContainerConfig, state: dict[str, Any] | None) -> ContainerInfo:
        info = ContainerInfo(id=config.id, state="created", memory_limit=config.memory, ip=config.ip)
        if state is None:
            return info
        info.state = state["status"]
        if info.state == "stopped":
            info.exit_status = console.exit_status(self.log_dir(config.id))
        if info.state in ("running", "paused"):
            info.pid = state.get("pid") or None
            used, limit = self._memory(config.id)
            info.memory_used = used
            if limit is not None:
                info.memory_limit = limit if limit < _UNLIMITED else None
        return info

    def _memory(self, ct_id: str) -> tuple[int | None, int | None]:
        """(used, limit) bytes from the container's memory cgroup, via `runc events --stats`."""
        proc = self._runc("events", "--stats", ct_id, check=False, timeout=10)
        if proc.returncode != 0:
            return None, None
        try:
            usage = json.loads(proc.stdout)["data"]["memory"]["usage"]
            return int(usage["usage"]), int(usage["limit"])
        except (ValueError, KeyError, TypeError):
            return None, None

    def _require_running(self, ct_id: str) -> None:
        self.config(ct_id)  # NotFound
        state = self._runc_state(ct_id)
        status = state["status"] if state else "created"
        if status != "running":
            if status == "paused":
                fix = f"resume it: runc --root {self.runc_root} resume {ct_id}"
            else:
                fix = f"start it: phaul ct start {ct_id}"
            raise Conflict(f"container {ct_id!r} is not running (it is {status})", fix)

    def _wait_stopped(self, ct_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            state = self._runc_state(ct_id)
            if state is None or state["status"] == "stopped":
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)

    def _read_spec(self, ct_id: str) -> dict[str, Any]:
        path = self.bundle_dir(ct_id) / "config.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(
                f"container {ct_id!r} has no bundle at {path.parent}", f"recreate it: phaul ct destroy {ct_id}"
            ) from None

    def cgroup_dirs(self, ct_id: str) -> builtins.list[Path]:
        """The container's cgroup directory in every hierarchy that has one."""
        rel = self.cgroup_path(ct_id).lstrip("/")
        return [mount / rel for mount in _cgroup_mounts() if (mount / rel).is_dir()]

    def _remove_cgroups(self, ct_id: str) -> None:
        """Kill what is left in the container's cgroups and remove them in every hierarchy."""
        for path in self.cgroup_dirs(ct_id):
            for attempt in range(40):
                try:
                    _rmdir_cgroup(path)
                    break
                except OSError as e:
                    if attempt == 39:
                        log.warning("cannot remove cgroup %s: %s", path, e)
                        break
                    _kill_cgroup(path)
                    time.sleep(_POLL)

    def _spec(self, config: ContainerConfig, ct_dir: Path) -> dict[str, Any]:
        """The OCI config.json: `runc spec`'s defaults with phaul's changes."""
        resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
        if config.memory is not None:
            resources["memory"] = {"limit": config.memory}
        if config.cpus is not None:
            resources["cpu"] = {"quota": max(1000, round(config.cpus * CPU_PERIOD_US)), "period": CPU_PERIOD_US}
        if config.pids is not None:
            resources["pids"] = {"limit": config.pids}
        systemd = config.init == "systemd"
        return {
            "ociVersion": "1.0.2-dev",
            "process": {
                "terminal": False,
                "user": {"uid": config.uid, "gid": config.gid, **({"additionalGids": config.groups} if config.groups else {})},
                "args": config.args or ([SYSTEMD] if systemd else DEFAULT_ARGS),
                # systemd reads `container` to know it runs in one (systemd-detect-virt: container-other),
                # and takes its machine ID from `container_uuid` when /etc/machine-id is empty
                "env": (config.env or DEFAULT_ENV) + (_systemd_env(config.id) if systemd else []),
                "cwd": config.cwd,
                "capabilities": {k: capabilities(config) for k in ("bounding", "effective", "permitted", "ambient")},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs", "readonly": False},
            "hostname": config.id,
            # runc spec's default mounts, unchanged: runc 1.1.5 + CRIU 4.2.1 checkpoint
            # and restore all of them (tests/test_containers.py proves it).
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                 "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                # the container's own cgroups; systemd makes its slices and scopes below them
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                 "options": ["nosuid", "noexec", "nodev", "relatime", "rw" if systemd else "ro"]},
                *(_SYSTEMD_MOUNTS if systemd else []),
            ],
            "annotations": {"org.criu.config": str(ct_dir / "criu.conf")},  # == criu_config_path(ID)
            "linux": {
                "cgroupsPath": self.cgroup_path(config.id),
                "resources": resources,
                # No user namespace: runc checkpoints it poorly; a cgroup namespace for systemd only,
                # which mounts its hierarchies anew (criu_images checks them); the network
                # namespace is runc's own (CRIU dumps and locks it).
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", *(["cgroup"] if systemd else []))],
                "maskedPaths": [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
                ],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
                # CRIU dumps and restores the filter with the tasks (tests/test_containers.py migrates one).
                **({"seccomp": oci_seccomp(capabilities(config))} if config.seccomp == "default" else {}),
            },
        }


# What systemd expects to find as PID 1 of a container (as podman's --systemd gives it).
_SYSTEMD_MOUNTS = [
    {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755", "size=65536k"]},
    {"destination": "/run/lock", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "nodev", "noexec", "mode=1777", "size=5120k"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=262144k"]},
]


def _systemd_env(ct_id: str) -> list[str]:
    return ["container=oci", f"container_uuid={hashlib.sha256(ct_id.encode()).hexdigest()[:32]}"]


def capabilities(config: ContainerConfig) -> list[str]:
    """The container's capability set: the default one plus what it asked for at `ct create`."""
    return _CAPS + [c for c in config.cap_add if c not in _CAPS]


def _check_config(config: ContainerConfig) -> None:
    """Validate a ContainerConfig from the user; fills in the MAC for an addressed container."""
    check_id(config.id)
    check_id(config.template, "template name")
    if config.template not in TEMPLATES + SOURCES:
        raise InvalidInput(f"unknown template {config.template!r}", f"use one of: {', '.join(TEMPLATES)}")
    config.packages = check_packages(config.packages)
    if config.packages and config.template != "debian":
        raise InvalidInput("packages are installed only into debian containers", "use --template debian --packages ...")
    if config.init not in INITS:
        raise InvalidInput(f"unknown init {config.init!r}", "use --init systemd, or leave it out")
    for name in ("rootfs", "image", "image_ref", "cwd"):
        value = getattr(config, name)
        if not isinstance(value, str) or len(value) > 4096 or "\0" in value:
            raise InvalidInput(f"invalid {name} {str(value)[:100]!r}", "give a path of at most 4096 bytes")
    if not config.cwd.startswith("/"):
        raise InvalidInput(f"working directory {config.cwd[:100]!r} is not absolute", "give an absolute path")
    if len(config.env) > 1024 or any(
        not isinstance(e, str) or "=" not in e or "\0" in e or len(e) > 32768 or e.startswith("=") for e in config.env
    ):
        raise InvalidInput("invalid environment", "give at most 1024 variables, each NAME=VALUE")
    ids = [config.uid, config.gid, *config.groups]
    if len(config.groups) > 64 or any(not isinstance(i, int) or not 0 <= i < (1 << 32) - 1 for i in ids):
        raise InvalidInput(f"invalid user or groups {ids[:8]!r}", "give numeric IDs below 4294967295, at most 64 groups")
    if config.memory is not None and (not isinstance(config.memory, int) or config.memory < MIN_MEMORY):
        raise InvalidInput(f"memory limit {config.memory!r} is too small", "give at least 4M")
    if config.cpus is not None and not 0.01 <= config.cpus <= 1024:
        raise InvalidInput(f"invalid CPU limit {config.cpus!r}", "give a number of CPUs between 0.01 and 1024, e.g. 0.5")
    if config.pids is not None and (not isinstance(config.pids, int) or config.pids < 1):
        raise InvalidInput(f"invalid pids limit {config.pids!r}", "give a positive number of processes, e.g. 256")
    if config.ip is not None:
        try:
            if "/" not in config.ip:
                raise ValueError("no prefix length")
            ipaddress.ip_interface(config.ip)
        except ValueError as e:
            raise InvalidInput(f"invalid address {config.ip!r} ({e})", "write ADDRESS/PREFIX, e.g. 10.77.0.10/24") from None
        if config.mac is None:
            digest = hashlib.sha256(config.id.encode()).digest()
            config.mac = "02:" + ":".join(f"{b:02x}" for b in digest[:5])  # locally administered, unicast
    if config.gateway is not None:
        if config.ip is None:
            raise InvalidInput("a gateway needs an address for the container", "give --ip ADDRESS/PREFIX with --gateway")
        try:
            gateway = ipaddress.ip_address(config.gateway)
        except ValueError:
            raise InvalidInput(f"invalid gateway {config.gateway!r}", "write a plain address, e.g. 10.77.0.1") from None
        if gateway not in ipaddress.ip_interface(config.ip).network:
            raise InvalidInput(
                f"gateway {config.gateway} is outside {config.ip}", "give a gateway on the container's own network"
            )
    if config.mac is not None:
        config.mac = config.mac.lower()
        if not _MAC.match(config.mac) or int(config.mac[:2], 16) & 1:
            raise InvalidInput(f"invalid MAC {config.mac!r}", "write a unicast MAC like 02:00:00:00:00:01, or omit it")
    if any(not isinstance(a, str) for a in config.args):
        raise InvalidInput(f"invalid command {config.args!r}", "give the command as a list of strings")
    allowed = ", ".join(c.removeprefix("CAP_") for c in EXTRA_CAPS)
    caps = []
    for cap in config.cap_add:
        name = cap.strip().upper() if isinstance(cap, str) else ""
        name = name if name.startswith("CAP_") else f"CAP_{name}"
        if name not in EXTRA_CAPS:
            raise InvalidInput(f"capability {cap!r} may not be added", f"--cap-add takes only: {allowed}")
        caps.append(name)
    config.cap_add = sorted(set(caps))
    if config.seccomp not in SECCOMP_MODES:
        raise InvalidInput(f"unknown seccomp mode {config.seccomp!r}", f"use one of: {', '.join(SECCOMP_MODES)}")



def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


def _cgroup_mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """One mount point of every cgroup (v1) and cgroup2 hierarchy on this host: the first
    whole mount of each (its root "/"). A hierarchy mounted again later, such as the yard
    CRIU mounts in its work directory during a restore (`.criu.cgyard.*`, gone when it
    ends), is the same hierarchy: never used, another restore may be unmounting it."""
    mounts: dict[str, Path] = {}  # by the hierarchy's device (major:minor)
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, fstype = before.split(), after.split()[:1]
        if len(fields) >= 5 and fstype in (["cgroup"], ["cgroup2"]) and fields[3] == "/":
            mounts.setdefault(fields[2], Path(fields[4].replace("\\040", " ")))
    return list(mounts.values())


def _rmdir_cgroup(path: Path) -> None:
    """Remove a cgroup directory and its child cgroups (deepest first)."""
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        os.rmdir(dirpath)


def _kill_cgroup(path: Path) -> None:
    for procs in path.rglob("cgroup.procs"):
        try:
            pids = procs.read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
