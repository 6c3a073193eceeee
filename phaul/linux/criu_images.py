"""Checks on CRIU images from a peer, before `runc restore` acts on them.

CRIU restores what the images say: credentials, capability sets, namespaces,
mounts, the paths of open files. `runc restore` does not re-apply the bundle's
`process` section. So before the destination restores images a source pushed,
`validate_images` holds them against an `ImageExpectation` derived from the
container's OCI spec as this host rebuilt it (`expectation_from_spec`):

- every thread's credentials and capability sets within what the spec grants,
  no_new_privs and a seccomp filter where the spec sets them;
- every task in the container's own namespaces: the root task's ids differ from
  the dumping CRIU's (inventory `root_ids`) exactly for the types the spec
  creates (CRIU creates those and no others), every task has the root task's
  ids, and namespace files name only namespaces the container created;
- exactly the mounts runc creates for the spec, no host bind mount, external
  mounts only the keys runc passes, the spec's mount flags kept;
- files opened only by normalized absolute paths on one of those mounts;
- files deleted while open (CRIU's ghost files) only as regular files or
  directories without set-id bits, of bounded size, re-created on the root file
  system or a tmpfs of the container through real directories only (`_ghosts`);
  tmpfs archives with safe member names and the usual /dev nodes only;
- only known image kinds, with sizes and counts bounded.

Images are parsed with pycriu's generated protobuf classes (no dict
conversion); `pages-*.img` and `pagemap-*.img` are bounded by size and never
read (CRIU itself refuses pages outside the task's VMAs). The cost is about
1.5 ms plus 30 µs per thread (docs/notes/criu-image-validation.md).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import posixpath
import re
import resource
import stat
import struct
import tarfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phaul.errors import InvalidInput, ToolFailed
from phaul.linux import pycriu_module

log = logging.getLogger(__name__)

try:  # pycriu's generated classes; imported once (about 60 ms) when the agent starts
    from pycriu.images import (  # type: ignore[attr-defined]
        cgroup_pb2,
        core_pb2,
        fdinfo_pb2,
        fs_pb2,
        ghost_file_pb2,
        inventory_pb2,
        mm_pb2,
        mnt_pb2,
        pstree_pb2,
        remap_file_path_pb2,
        seccomp_pb2,
        tty_pb2,
    )

    _PYCRIU_ERROR = ""
except ImportError as _e:  # checked by validate_images: the agent still starts, restores are refused
    _PYCRIU_ERROR = str(_e)

CAP_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)  # fmt: skip
CAP = {f"CAP_{n}": i for i, n in enumerate(CAP_NAMES)}
NS_TYPES = ("pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time")
_OCI_NS = {"pid": "pid", "network": "net", "ipc": "ipc", "uts": "uts", "mount": "mnt", "user": "user",
           "cgroup": "cgroup", "time": "time"}  # fmt: skip
_NS_CFLAG = {"mnt": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000, "ipc": 0x08000000, "user": 0x10000000,
             "pid": 0x20000000, "net": 0x40000000, "time": 0x00000080}  # fmt: skip
# The image kinds a runc container's dump holds; anything else (netns-*, userns-*, ext-files,
# tunfile, fsnotify, bpfmap-*) is refused unseen. tty-*: ptys of the container's own devpts
# only (`_ttys`); remap-fpath and ghost-file-*: files deleted while open (`_ghosts`).
# (Names as criu/image-desc.c writes them; group 1: the uts/ipc namespace id, group 2: a tmpfs's s_dev.)
_KINDS = re.compile(
    r"^(?:inventory|pstree|files|seccomp|cgroup|pipes-data|fifo-data|sk-queues|filelocks|memfd|eventpoll-tfd|cpuinfo|tty-info|tty-data"
    r"|remap-fpath|ghost-file-[0-9a-f]+"
    r"|(?:core|ids|fs|mm|pagemap|pagemap-shmem|fdinfo|pages|mountpoints|timens|signal-p|signal-s)-\d+"
    r"|(?:utsns|ipcns-var|ipcns-shm|ipcns-msg|ipcns-sem)-(\d+)|tcp-stream-[0-9a-f]+)\.img$"
    r"|^tmpfs-dev-(\d+)\.tar\.gz\.img$|^descriptors\.json$|^stats-dump$|^parent$"
)
_PARENT = re.compile(r"^\.\./rounds/\d+$")  # pre-copy's parent images (phaul.memory.methods), never elsewhere
_TASK_DEAD = 2  # a zombie: CRIU writes only its core image
_SECCOMP_TSYNC = 1  # SECCOMP_FILTER_FLAG_TSYNC
_TASK_STOPPED = 3  # stopped by a signal (SIGSTOP, job control) when dumped
_FLAGS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8}  # MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC
_MS_RDONLY = 0x1
_MAGIC = (struct.pack("<I", 0x54564319), struct.pack("<I", 0x55105940))  # IMG_COMMON, IMG_SERVICE
_PAGE = 4096
_RLIM_NLIMITS = 16
_RLIM_UNLIMITED = (1 << 64) - 1  # RLIM_INFINITY as CRIU writes it
_VALID_SECBITS = 0xFF
_PROC_MAGIC_LINKS = frozenset({"root", "cwd", "exe", "fd", "map_files", "ns"})
# runc's default device nodes in /dev (libcontainer/specconv AllowedDevices): name -> (major, minor)
_RUNC_DEVICES = {"./null": (1, 3), "./zero": (1, 5), "./full": (1, 7), "./random": (1, 8), "./urandom": (1, 9),
                 "./tty": (5, 0)}  # fmt: skip
_FSTYPE = {"proc": 1, "sysfs": 2, "tmpfs": 5, "devpts": 6, "mqueue": 14, "cgroup2": 23}  # mnt.proto fstype
_CGROUP, _TMPFS, _UNSUPPORTED = 12, 5, 0
_GHOST_MAGIC = struct.pack("<II", 0x54564319, 0x52583605)  # IMG_COMMON, GHOST_FILE_MAGIC (criu/include/magic.h)
_GHOST_ENTRY_BYTES = 8192  # a ghost_file_entry: a few numbers (a symlink's target, refused, is the only long field)
_CHUNK_ENTRY_BYTES = 32  # a ghost_chunk_entry: two varints


class ImageRefused(InvalidInput):
    """A CRIU image breaks a rule; `image` and `field` name where."""

    def __init__(self, image: str, fld: str, problem: str) -> None:
        super().__init__(
            f"CRIU image {image}: {fld} {problem}",
            "the source sent images that would restore more than the container's spec grants; "
            "the restore is refused (the source keeps its container)",
        )
        self.image = image
        self.field = fld


@dataclass(frozen=True)
class Limits:
    """Bounds on what the images may hold (counts are also bounded by the spec's pids limit)."""

    max_tasks: int = 1024
    max_threads: int = 4096  # about 30 µs each; the pids limit usually bounds them first
    max_files: int = 65536  # files.img entries
    max_mounts: int = 256
    max_vmas: int = 65530  # per task: vm.max_map_count
    image_bytes: int = 16 << 20  # any protobuf image other than pages/pagemap
    pagemap_bytes_per_page: int = 24  # an entry is at most ~24 bytes and covers at least one page
    tar_bytes: int = 64 << 20  # a tmpfs archive, compressed and listed (runc's /dev is size=65536k)
    ghost_bytes: int = 1 << 30  # a deleted-but-open file's size (apparent), and the data of all of them
    ghost_chunks: int = 65536  # data extents of one ghost file (CRIU writes one per extent of a sparse file)


@dataclass(frozen=True)
class MountRule:
    """A mount runc creates for the spec: where, of which type, with which flags."""

    fstype: int
    flags: int = 0  # MS_* bits the mount must carry
    root: str = "/"  # the mount's root within its file system
    ext_key: str | None = None  # the --external key runc passes for it; None: mounted anew
    masked: bool = False  # a masked path: an empty read-only tmpfs (directory) or /dev/null bound over it (file)


@dataclass(frozen=True)
class ImageExpectation:
    """What the container's spec grants, in the terms of CRIU's images."""

    caps_bounding: int  # capability bit masks; inheritable and ambient sets may reach the bounding set
    caps_permitted: int
    uid: int
    gid: int
    additional_gids: frozenset[int]
    no_new_privileges: bool
    seccomp: bool  # the spec has a seccomp profile: every thread runs under a filter
    namespaces: frozenset[str]  # CRIU names ('net', 'mnt', ...) of the namespaces the spec creates
    mounts: Mapping[str, MountRule]  # mountpoint -> rule, for everything but the root
    required_mounts: frozenset[str]  # mountpoints the image must have: a missing mask would uncover a path
    cgroup_dirs: Mapping[str, int]  # mountpoint below which runc binds each cgroup v1 hierarchy -> MS_* flags
    root_flags: int  # MS_* bits the root mount must carry (ro for a read-only root)
    memory_limit: int  # bytes: bounds pages-*.img and pagemap-*.img
    max_tasks: int
    max_threads: int
    rlimits_hard: tuple[int, ...]  # per RLIMIT_* index: the spec's hard limit, else this host's
    oom_score_adj: int
    lsm_labels: frozenset[str]  # the spec's apparmorProfile/selinuxLabel, if any
    devices: Mapping[str, tuple[int, int]]  # device nodes the /dev archive may hold
    cap_last_cap: int
    limits: Limits = field(default_factory=Limits)
    # the option sets (controllers, name=...) of this host's cgroup v1 hierarchies: what a container
    # in a cgroup namespace may mount anew (runc does, below each of cgroup_dirs)
    cgroup_hierarchies: frozenset[frozenset[str]] = frozenset()
    rootfs: Path | None = None  # the container's root file system on this host; None: ghosts on it are refused


@dataclass(frozen=True)
class ImageReport:
    """What a validated image directory holds, and what checking it cost."""

    tasks: int
    threads: int
    files: int
    mounts: int
    pages_bytes: int
    ms: float
    stopped: tuple[int, ...] = ()  # PIDs (in the container) of the tasks that were stopped (SIGSTOP) at the dump


def expectation_from_spec(spec: Mapping[str, Any], limits: Limits | None = None, bundle: Path | None = None) -> ImageExpectation:
    """The expectation for a container run from OCI `spec` (the config.json this host wrote);
    `bundle`: its directory here, where the spec's root path is (ghost files are re-created there)."""
    limits = limits or Limits()
    proc = spec.get("process") or {}
    caps = proc.get("capabilities") or {}
    user = proc.get("user") or {}
    linux = spec.get("linux") or {}
    res = linux.get("resources") or {}
    mounts: dict[str, MountRule] = {}
    cgroup_dirs: dict[str, int] = {}
    for m in spec.get("mounts") or []:
        dest, kind, opts = m["destination"], m.get("type"), m.get("options") or []
        flags = _flag_bits(opts)
        if kind == "cgroup":  # cgroup v1: a tmpfs and one bind per hierarchy (runc passes each as --external)
            mounts[dest] = MountRule(_TMPFS, flags & ~_MS_RDONLY)
            cgroup_dirs[dest] = flags
        elif kind in _FSTYPE:
            mounts[dest] = MountRule(_FSTYPE[kind], flags)
        else:  # a bind mount the spec asks for: runc passes it as --external mnt[dest]
            mounts[dest] = MountRule(_UNSUPPORTED, flags, "", ext_key=dest)
    for p in linux.get("maskedPaths") or []:  # directories: an empty read-only tmpfs; files: /dev/null bound
        mounts[p] = MountRule(_TMPFS, _MS_RDONLY, masked=True)
    for p in linux.get("readonlyPaths") or []:  # a read-only bind of the file system it is on
        parent = _mount_of(p, mounts)
        rule = mounts.get(parent)
        if rule is not None:
            mounts[p] = MountRule(rule.fstype, _MS_RDONLY, root="/" + posixpath.relpath(p, parent))
    # runc skips masked and read-only paths missing from the kernel; those this host has must be covered
    covered = [*(linux.get("maskedPaths") or []), *(linux.get("readonlyPaths") or [])]
    required = {m["destination"] for m in spec.get("mounts") or []} | {p for p in covered if os.path.lexists(p)}
    created = frozenset(_OCI_NS[n["type"]] for n in linux.get("namespaces") or [] if not n.get("path"))
    pids = (res.get("pids") or {}).get("limit")
    hard = [resource.getrlimit(i)[1] & _RLIM_UNLIMITED for i in range(_RLIM_NLIMITS)]  # -1 (infinity) -> 2**64-1
    for r in proc.get("rlimits") or []:
        hard[getattr(resource, r["type"])] = int(r["hard"])
    devices = dict(_RUNC_DEVICES)
    for d in linux.get("devices") or []:
        if d.get("type") == "c":
            devices["./" + posixpath.relpath(d["path"], "/dev")] = (int(d["major"]), int(d["minor"]))
    memory = (res.get("memory") or {}).get("limit") or _mem_total()
    oom = proc.get("oomScoreAdj")
    return ImageExpectation(
        caps_bounding=_cap_mask(caps.get("bounding")),
        caps_permitted=_cap_mask(caps.get("permitted")),
        uid=int(user.get("uid", 0)),
        gid=int(user.get("gid", 0)),
        additional_gids=frozenset(int(g) for g in user.get("additionalGids") or []),
        no_new_privileges=bool(proc.get("noNewPrivileges")),
        seccomp=bool(linux.get("seccomp")),
        namespaces=created,
        mounts=mounts,
        required_mounts=frozenset(required),
        cgroup_dirs=cgroup_dirs,
        root_flags=_MS_RDONLY if (spec.get("root") or {}).get("readonly") else 0,
        memory_limit=int(memory),
        max_tasks=min(limits.max_tasks, int(pids)) if pids and pids > 0 else limits.max_tasks,
        max_threads=min(limits.max_threads, int(pids)) if pids and pids > 0 else limits.max_threads,
        rlimits_hard=tuple(hard),
        oom_score_adj=int(oom) if oom is not None else _own_oom_score_adj(),
        lsm_labels=frozenset(v for v in (proc.get("apparmorProfile"), proc.get("selinuxLabel")) if v),
        devices=devices,
        cap_last_cap=int(Path("/proc/sys/kernel/cap_last_cap").read_text()),
        limits=limits,
        cgroup_hierarchies=_cgroup_hierarchies() if "cgroup" in created else frozenset(),
        rootfs=bundle / str((spec.get("root") or {}).get("path") or "rootfs") if bundle is not None else None,
    )


def _cgroup_hierarchies(mountinfo: Path = Path("/proc/self/mountinfo")) -> frozenset[frozenset[str]]:
    """The super options (less rw/ro) of each cgroup v1 mount this host has: {'cpu'}, {'name=systemd'}."""
    found = set()
    for line in mountinfo.read_text().splitlines():
        _, _, after = line.partition(" - ")
        fields = after.split()
        if len(fields) >= 3 and fields[0] == "cgroup":
            found.add(frozenset(fields[2].split(",")) - {"rw", "ro"})
    return frozenset(found)


def read_spec(config_json: Path) -> dict[str, Any]:
    """The OCI spec in `config_json` (this host's own file), as a dict."""
    try:
        spec = json.loads(config_json.read_text())
    except (OSError, ValueError) as e:
        raise ToolFailed(f"cannot read the container's spec {config_json}: {e}", "recreate the bundle") from None
    if not isinstance(spec, dict):
        raise ToolFailed(f"{config_json} is not an OCI spec", "recreate the bundle")
    return spec


def validate_for_bundle(image_dir: Path, config_json: Path) -> ImageReport:
    """`validate_images` against the spec in `config_json` (the bundle as this host placed it);
    the report's ms include reading the spec."""
    t0 = time.perf_counter()
    expect = expectation_from_spec(read_spec(config_json), bundle=config_json.parent)
    report = validate_images(image_dir, expect)
    return dataclasses.replace(report, ms=(time.perf_counter() - t0) * 1000)


def validate_images(image_dir: Path, expect: ImageExpectation) -> ImageReport:
    """Refuse (ImageRefused) the images in `image_dir` unless restoring them gives no
    more than `expect` grants. Never follows a link; reads no pages."""
    if _PYCRIU_ERROR:
        raise ToolFailed(
            f"pycriu is missing ({_PYCRIU_ERROR}): CRIU images from a peer cannot be checked, so they are not restored",
            pycriu_module.FIX,
        )
    t0 = time.perf_counter()
    return _Check(image_dir, expect).run(t0)


class _Check:
    """One validation of one image directory."""

    def __init__(self, d: Path, expect: ImageExpectation) -> None:
        self.d = d
        self.e = expect
        self.lim = expect.limits
        self.memfds: set[int] = set()  # files.img ids of memfds (a shared mapping may name one)
        self.reg_files: dict[int, Any] = {}  # files.img id -> reg_file_entry
        self.tmpfs_members: dict[int, dict[str, str]] = {}  # a tmpfs's s_dev -> member name -> 'dir'|'link'|'other'
        self.stopped: list[int] = []

    def run(self, t0: float) -> ImageReport:
        e = self.e
        names = self._listing()
        inv = self._one("inventory.img", inventory_pb2.inventory_entry)
        if inv.img_version != 2 or not inv.fdinfo_per_id or not inv.ns_per_id or not inv.HasField("root_ids"):
            raise ImageRefused("inventory.img", "img_version/fdinfo_per_id/ns_per_id/root_ids", "not as CRIU 4 writes them")
        tree = self._entries("pstree.img", pstree_pb2.pstree_entry)
        if not 1 <= len(tree) <= e.max_tasks:
            raise ImageRefused("pstree.img", "entries", f"{len(tree)} tasks, allowed 1..{e.max_tasks}")
        pids = {t.pid for t in tree}
        if len(pids) != len(tree) or tree[0].ppid != 0 or any(t.ppid not in pids for t in tree[1:]):
            raise ImageRefused("pstree.img", "pid/ppid", "do not form one tree rooted at the first entry")
        if "pid" in e.namespaces and tree[0].pid != 1:
            raise ImageRefused("pstree.img", "pid", f"of the root task is {tree[0].pid}, not 1 in the container's pid namespace")
        # CRIU collects no threads of a dead task: a zombie's entry lists one thread id of no meaning
        # (0, or whatever CRIU's memory held). Such an entry must be a zombie's (its core says so).
        odd = {t.pid for t in tree if len(t.threads) == 1 and t.threads[0] != t.pid}
        zombies = {pid for pid in odd if self._dead(pid)}
        tids = [tid for t in tree if t.pid not in zombies for tid in t.threads]
        if len(tids) > e.max_threads or len(set(tids)) != len(tids) or any(
            t.pid not in t.threads and t.pid not in zombies for t in tree
        ):
            raise ImageRefused("pstree.img", "threads", f"{len(tids)} threads: duplicated, missing or more than {e.max_threads}")
        pages = self._sizes(names, len(tree))
        own, dead = self._namespaces(tree, inv.root_ids)
        self._namespace_images(names, own)
        mounts = self._mounts(names, own["mnt"])
        self._archives(names, mounts)
        regs, nfiles = self._files(own, mounts)
        self._ghosts(names, mounts)
        self._descriptors(names)
        cgsets = self._cgroups()
        for t in tree:
            if t.pid not in dead:
                self._task(t, regs, cgsets)
        report = ImageReport(
            len(tree), len(tids), nfiles, len(mounts), pages, (time.perf_counter() - t0) * 1000, tuple(self.stopped)
        )
        log.debug("images in %s accepted: %s", self.d, report)
        return report

    # ---- reading ----------------------------------------------------------------

    def _listing(self) -> list[str]:
        try:
            names = os.listdir(self.d)
        except OSError as err:
            raise ImageRefused(self.d.name, "directory", f"cannot be listed: {err.strerror}") from None
        for n in names:
            if not _KINDS.match(n):
                raise ImageRefused(n, "file name", "is not an image kind a container restore needs")
        if "parent" in names:  # CRIU reads the parent's pagemap and pages: only this migration's rounds
            target = os.readlink(self.d / "parent") if os.path.islink(self.d / "parent") else ""
            rounds = self.d.parent / "rounds"
            if not _PARENT.match(target) or rounds.is_symlink() or (self.d / target).is_symlink():
                raise ImageRefused("parent", "link", f"{target!r} is not a pre-copy round of this migration (../rounds/N)")
        return names

    def _namespace_images(self, names: Iterable[str], own: dict[str, int]) -> None:
        """utsns-ID/ipcns-*-ID.img: the contents of the container's own uts/ipc namespaces only."""
        for n in names:
            hit = _KINDS.match(n)
            if hit is not None and hit.group(1) is not None:
                ns = "uts" if n.startswith("utsns") else "ipc"
                if int(hit.group(1)) != own[ns] or ns not in self.e.namespaces:
                    raise ImageRefused(n, "file name", f"names {ns} namespace {hit.group(1)}, not one the container created")

    def _open(self, name: str) -> tuple[int, os.stat_result]:
        """The image `name` opened without following a link, and its status; a regular file or refused."""
        try:
            fd = os.open(self.d / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise ImageRefused(name, "file", f"cannot be opened: {err.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ImageRefused(name, "file", "is not a regular file")
        return fd, st

    def _read(self, name: str, limit: int) -> bytes:
        fd, st = self._open(name)
        try:
            if st.st_size > limit:
                raise ImageRefused(name, "size", f"{st.st_size} bytes, more than {limit}")
            data = os.read(fd, st.st_size + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise ImageRefused(name, "size", f"grew past {limit} bytes")
        return data

    def _entries(self, name: str, cls: Any) -> list[Any]:
        """The length-prefixed protobuf entries of image `name`, after its magic."""
        b = self._read(name, self.lim.image_bytes)
        off, out = (4 if name == "inventory.img" else 8), []  # inventory.img has no IMG_COMMON magic
        if len(b) < off or (off == 8 and b[:4] not in _MAGIC):
            raise ImageRefused(name, "magic", f"{b[:4].hex()!r} is not CRIU's (the file is damaged or not an image)")
        while off < len(b):
            if off + 4 > len(b):
                raise ImageRefused(name, "entry size", f"truncated at offset {off}")
            (size,) = struct.unpack_from("<I", b, off)
            off += 4
            if size > len(b) - off:
                raise ImageRefused(name, "entry size", f"{size} bytes overruns the file at offset {off}")
            out.append(_parse(name, cls, b[off : off + size], off))
            off += size
        return out

    def _one(self, name: str, cls: Any) -> Any:
        e = self._entries(name, cls)
        if len(e) != 1:
            raise ImageRefused(name, "entries", f"{len(e)}, expected 1")
        return e[0]

    # ---- the rules ----------------------------------------------------------------

    def _sizes(self, names: Iterable[str], tasks: int) -> int:
        """pages-*.img within the memory limit (per task: forked tasks repeat shared pages);
        pagemap-*.img within what that many pages need."""
        limit, total = self.e.memory_limit, 0
        pagemap_max = 64 + self.lim.pagemap_bytes_per_page * (limit // _PAGE)
        for n in names:
            if n.startswith(("pages-", "pagemap-")):
                st = os.lstat(self.d / n)
                if not stat.S_ISREG(st.st_mode):
                    raise ImageRefused(n, "file", "is not a regular file")
                most = limit if n.startswith("pages-") else pagemap_max
                if st.st_size > most:
                    raise ImageRefused(n, "size", f"{st.st_size} bytes, more than {most} for a memory limit of {limit}")
                total += st.st_size if n.startswith("pages-") else 0
        if total > limit * tasks:
            raise ImageRefused("pages-*.img", "size", f"{total} bytes in all, more than {tasks} x the memory limit {limit}")
        return total

    def _namespaces(self, tree: list[Any], dumper_ids: Any) -> tuple[dict[str, int], set[int]]:
        """The root task's namespace ids (the container's own for what the spec creates, the
        dumper's otherwise: CRIU creates exactly the types whose ids differ from root_ids), and
        the zombies (no ids: restored in their parent's namespaces, to exit at once)."""
        created = self.e.namespaces
        name = f"ids-{tree[0].pid}.img"
        ids = self._one(name, core_pb2.task_kobj_ids_entry)
        own = {ns: getattr(ids, f"{ns}_ns_id") for ns in NS_TYPES}
        for ns, val in own.items():
            # CRIU gives every restored tree a new time namespace, from timens-ID.img or timens-0.img
            # (criu/cr-restore.c, prepare_timens): a copy restored once has its own on the next dump.
            if ns != "time" and (val != getattr(dumper_ids, f"{ns}_ns_id")) != (ns in created):
                says = "creates" if ns in created else "does not create"
                host = "is" if ns in created else "is not"
                raise ImageRefused(name, f"{ns}_ns_id", f"{val} {host} the dumping host's, but the spec {says} a {ns} namespace")
        dead: set[int] = set()
        for t in tree[1:]:
            name = f"ids-{t.pid}.img"
            if not os.path.lexists(self.d / name) and self._zombie(t):
                dead.add(t.pid)
                continue
            ids = self._one(name, core_pb2.task_kobj_ids_entry)
            for ns, val in own.items():
                if getattr(ids, f"{ns}_ns_id") != val:
                    raise ImageRefused(name, f"{ns}_ns_id", f"{getattr(ids, f'{ns}_ns_id')} is not the container's ({val})")
        return own, dead

    def _zombie(self, t: Any) -> bool:
        """A task without ids: a zombie as CRIU dumps it (its core alone, no credentials), or refused."""
        if len(t.threads) != 1 or not self._dead(t.pid):
            raise ImageRefused(f"ids-{t.pid}.img", "file", "missing, and the task is not a zombie")
        return True

    def _dead(self, pid: int) -> bool:
        """core-PID.img is a zombie's as CRIU's dump_one_zombie writes it: a dead task's tc, nothing else."""
        core = self._one(f"core-{pid}.img", core_pb2.core_entry)
        return core.tc.task_state == _TASK_DEAD and not core.HasField("thread_core") and not core.HasField("ids")

    def _mounts(self, names: Iterable[str], mnt_ns: int) -> dict[int, Any]:
        """The container's mounts by mnt_id: exactly those runc creates for the spec."""
        e = self.e
        want = [f"mountpoints-{mnt_ns}.img"] if "mnt" in e.namespaces else []
        have = sorted(n for n in names if n.startswith("mountpoints-"))
        if have != want:
            raise ImageRefused(have[0] if have else "mountpoints-*.img", "file name", f"{have}: expected {want}")
        if not want:
            return {}
        name = want[0]
        ms = self._entries(name, mnt_pb2.mnt_entry)
        if len(ms) > self.lim.max_mounts:
            raise ImageRefused(name, "entries", f"{len(ms)} mounts, more than {self.lim.max_mounts}")
        by_id = {m.mnt_id: m for m in ms}
        roots = [m for m in ms if m.parent_mnt_id not in by_id]
        if len(by_id) != len(ms) or len(roots) != 1 or roots[0].mountpoint != "/":
            raise ImageRefused(name, "mnt_id/parent_mnt_id", f"not one tree of mounts rooted at '/' ({len(roots)} roots)")
        root = roots[0]
        if root.flags & e.root_flags != e.root_flags:
            raise ImageRefused(name, f"mnt_id {root.mnt_id} flags", f"{root.flags:#x} lack the spec's {e.root_flags:#x} for '/'")
        seen: set[str] = set()
        for m in ms:
            where = f"mnt_id {m.mnt_id} ({m.mountpoint!r})"
            _normal(m.mountpoint, name, f"{where} mountpoint")
            if m.mountpoint in seen:
                raise ImageRefused(name, f"{where} mountpoint", "is mounted twice")
            seen.add(m.mountpoint)
            if m.deleted or m.with_plugin or m.HasField("ext_mount") and m.ext_mount:
                raise ImageRefused(name, f"{where} deleted/with_plugin/ext_mount", "set; runc creates no such mount")
            if m.shared_id or m.master_id:
                raise ImageRefused(name, f"{where} shared_id/master_id", "set; the spec's mounts are private")
            if m is not root:
                self._mount(name, where, m, by_id)
        missing = sorted(e.required_mounts - seen)
        if missing:
            raise ImageRefused(name, "mountpoint", f"{missing[0]!r} missing: the spec mounts (or masks) it")
        return by_id

    def _mount(self, name: str, where: str, m: Any, by_id: dict[int, Any]) -> None:
        e = self.e
        key = m.ext_key if m.HasField("ext_key") else None
        parent = posixpath.dirname(m.mountpoint)
        if key is not None and parent in e.cgroup_dirs and by_id[m.parent_mnt_id].mountpoint == parent:
            if m.fstype != _CGROUP or key != m.mountpoint:  # one hierarchy, bound by runc as --external
                raise ImageRefused(name, f"{where} ext_key", f"{key!r} with fstype {m.fstype}: not runc's cgroup bind")
            rule = MountRule(_CGROUP, e.cgroup_dirs[parent], ext_key=key)
        elif key is None and parent in e.cgroup_dirs and e.cgroup_hierarchies and by_id[m.parent_mnt_id].mountpoint == parent:
            # in a cgroup namespace runc mounts each v1 hierarchy anew, rooted at the container's cgroup
            # (cgroup.img's cgns_prefix); with exactly the options this host mounts it with (no release_agent of its own)
            if m.fstype != _CGROUP or frozenset(m.options.split(",")) - {"rw", "ro"} not in e.cgroup_hierarchies:
                what = f"fstype {m.fstype}, options {m.options[:200]!r}"
                raise ImageRefused(name, f"{where} options", f"{what}: not one of this host's cgroup hierarchies")
            rule = MountRule(_CGROUP, e.cgroup_dirs[parent])
        elif m.mountpoint in e.mounts:
            rule = e.mounts[m.mountpoint]
        else:
            what = f"(fstype {m.fstype}, source {m.source!r})"
            raise ImageRefused(name, f"{where} mountpoint", f"{what} is not a mount of the spec")
        if rule.masked:  # an empty read-only tmpfs (directory) or /dev/null bound over it (file)
            if key == "/dev/null" or (key is None and m.fstype == _TMPFS and m.root == "/" and m.flags & _MS_RDONLY):
                return
            raise ImageRefused(name, f"{where} ext_key/fstype", f"{key!r}/{m.fstype}: not how runc masks a path")
        if m.flags & rule.flags != rule.flags:
            raise ImageRefused(name, f"{where} flags", f"{m.flags:#x} lack the spec's {rule.flags:#x}")
        if key != rule.ext_key:
            raise ImageRefused(name, f"{where} ext_key", f"{key!r}: runc passes {rule.ext_key!r} for this mountpoint")
        if key is None:
            if m.fstype != rule.fstype or m.fstype == _UNSUPPORTED:
                what = f"{m.fstype} ({m.fsname!r} {m.source!r})"
                raise ImageRefused(name, f"{where} fstype", f"{what}, the spec mounts {rule.fstype}")
            if m.root != rule.root:
                raise ImageRefused(name, f"{where} root", f"{m.root!r}, expected {rule.root!r}")

    def _archives(self, names: Iterable[str], mounts: dict[int, Any]) -> None:
        """tmpfs contents CRIU extracts with `tar` as root: plain names, the usual /dev nodes."""
        by_dev = {m.root_dev: m for m in mounts.values() if m.fstype == _TMPFS and not m.HasField("ext_key")}
        for n in names:
            hit = _KINDS.match(n)
            if hit is None or hit.group(2) is None:
                continue
            dev = int(hit.group(2))  # the tmpfs's s_dev (MKKDEV: major << 20 | minor)
            m = by_dev.get(dev)
            if m is None:
                raise ImageRefused(n, "file name", f"names device {dev >> 20}:{dev & 0xFFFFF}, not a tmpfs of the container")
            devices = self.e.devices if m.mountpoint == "/dev" else {}
            limit, total = self.lim.tar_bytes, 0
            if os.lstat(self.d / n).st_size > limit:
                raise ImageRefused(n, "size", f"more than {limit} bytes")
            listing = self.tmpfs_members.setdefault(dev, {})
            try:
                with tarfile.open(self.d / n, "r:gz") as tf:
                    links: set[str] = set()
                    for ti in tf:
                        total += ti.size
                        _member(n, ti, devices, links)
                        key = ti.name.rstrip("/")  # a link once stays one: tar replaces what it finds
                        link = ti.issym() or listing.get(key) == "link"
                        listing[key] = "link" if link else "dir" if ti.isdir() else "other"
                        if total > limit:
                            raise ImageRefused(n, f"member {ti.name!r}", f"brings the contents past {limit} bytes")
            except (tarfile.TarError, OSError, EOFError) as err:
                raise ImageRefused(n, "archive", f"is not a readable tar.gz: {err}") from None

    def _files(self, own: dict[str, int], mounts: dict[int, Any]) -> tuple[dict[int, str], int]:
        """files.img: only harmless kinds; paths normalized, absolute and on a container mount."""
        name = "files.img"
        files = self._entries(name, fdinfo_pb2.file_entry)
        if len(files) > self.lim.max_files:
            raise ImageRefused(name, "entries", f"{len(files)}, more than {self.lim.max_files}")
        created = {own[t] for t in self.e.namespaces}
        regs: dict[int, str] = {}
        reg_mnt: dict[int, int] = {}
        ttys: list[Any] = []
        for f in files:
            kind = fdinfo_pb2.fd_types.Name(f.type)
            where = f"id {f.id} ({kind})"
            if kind == "REG":
                regs[f.id] = self._path(name, where, f.reg.name, f.reg.mnt_id, mounts)
                reg_mnt[f.id] = f.reg.mnt_id
                self.reg_files[f.id] = f.reg
            elif kind == "TTY":
                ttys.append(f)
            elif kind == "MEMFD":
                self.memfds.add(f.id)
            elif kind == "UNIXSK":
                self._netns(name, f"{where} usk.ns_id", f.usk.ns_id, own)
                if f.usk.name[:1] not in (b"", b"\0"):  # bound to a path (not abstract): CRIU binds it again
                    sock = f.usk.name.rstrip(b"\0").decode(errors="replace")
                    _normal(sock if sock.startswith("/") else "/" + sock, name, f"{where} usk.name")
                    if f.usk.HasField("name_dir"):
                        _normal(f.usk.name_dir, name, f"{where} usk.name_dir")
                if f.usk.HasField("mnt_id") and f.usk.mnt_id != -1 and mounts and f.usk.mnt_id not in mounts:
                    raise ImageRefused(name, f"{where} usk.mnt_id", f"{f.usk.mnt_id} is not a mount of the container")
            elif kind == "INETSK":
                self._netns(name, f"{where} isk.ns_id", f.isk.ns_id, own)
            elif kind == "NETLINKSK":
                self._netns(name, f"{where} nlsk.ns_id", f.nlsk.ns_id, own)
            elif kind == "INOTIFY":
                # each watch by the path CRIU recorded (force-irmap), opened in the container's mounts;
                # a bare file handle would reach any inode of its file system: refused
                for wd in f.ify.wd:
                    if not wd.f_handle.HasField("path"):
                        why = "has a file handle but no path (dumped without force-irmap)"
                        raise ImageRefused(name, f"{where} wd {wd.wd}", why)
                    self._path(name, f"{where} wd {wd.wd}", wd.f_handle.path, wd.f_handle.mnt_id, mounts)
            elif kind == "NS":
                ns = next((t for t, c in _NS_CFLAG.items() if c == f.nsf.ns_cflag), None)
                if f.nsf.ns_id not in created or ns is None or own.get(ns) != f.nsf.ns_id:
                    raise ImageRefused(name, f"{where} nsf.ns_id", f"{f.nsf.ns_id} is not a namespace the container created")
            elif kind not in ("PIPE", "FIFO", "EVENTFD", "EVENTPOLL", "SIGNALFD", "TIMERFD", "MEMFD", "PIDFD"):
                # EXT, TUNF, PACKETSK, FANOTIFY (file handles reach any inode), BPFMAP, ...
                raise ImageRefused(name, f"{where} type", "is a file kind a container restore does not take")
        self._ttys(ttys, reg_mnt, mounts)
        return regs, len(files)

    def _ttys(self, ttys: list[Any], reg_mnt: dict[int, int], mounts: dict[int, Any]) -> None:
        """tty-info.img/tty-data.img and the TTY files: pseudo-terminals only, each opened
        through a path on a devpts mount of the container (runc's newinstance /dev/pts), so
        the restore reaches no terminal of the host."""
        names = os.listdir(self.d)
        info = self._entries("tty-info.img", tty_pb2.tty_info_entry) if "tty-info.img" in names else []
        ids = set()
        for i in info:
            if i.type != tty_pb2.PTY:
                raise ImageRefused("tty-info.img", f"id {i.id} type", f"{tty_pb2.TtyType.Name(i.type)}: only ptys are taken")
            ids.add(i.id)
        for f in ttys:
            where = f"id {f.id} (TTY)"
            if f.tty.tty_info_id not in ids:
                raise ImageRefused("files.img", f"{where} tty.tty_info_id", f"{f.tty.tty_info_id} is not a pty of tty-info.img")
            mnt = mounts.get(reg_mnt.get(f.tty.regf_id, -1)) if mounts else None
            if f.tty.regf_id not in reg_mnt or (mounts and (mnt is None or mnt.fstype != _FSTYPE["devpts"])):
                why = f"{f.tty.regf_id} is not a file of the container's devpts"
                raise ImageRefused("files.img", f"{where} tty.regf_id", why)
        if "tty-data.img" in names:
            for d in self._entries("tty-data.img", tty_pb2.tty_data_entry):
                if d.tty_id not in ids:
                    raise ImageRefused("tty-data.img", "tty_id", f"{d.tty_id} is not a pty of tty-info.img")

    def _ghosts(self, names: list[str], mounts: dict[int, Any]) -> None:
        """remap-fpath.img and ghost-file-N.img: files deleted while open or mapped. CRIU
        re-creates each ghost (criu/files-reg.c create_ghost) as root, in the dumping CRIU's
        service mount namespace, beside its first client's path (NAME.cr.N.ghost; a directory
        at its own path, mkdir -p), links it to every client's path to open it, then unlinks it.
        Taken: regular files and directories without set-id bits, of bounded size, whose data
        the image holds; every client on the same mount of the container (its root file system
        or one of its tmpfs), reached through real directories only (a symbolic link there would
        be followed outside the container). Refused: linked remaps (a link_remap.N hard link the
        dump made in the source's file system) and /proc remaps (a helper task for a dead pid)."""
        ghosts = {int(n[len("ghost-file-") : -len(".img")], 16): n for n in names if n.startswith("ghost-file-")}
        if "remap-fpath.img" not in names:
            if ghosts:
                raise ImageRefused(min(ghosts.values()), "file name", "is no deleted file's: remap-fpath.img is missing")
            return
        name = "remap-fpath.img"
        remaps = self._entries(name, remap_file_path_pb2.remap_file_path_entry)
        if len(remaps) > self.lim.max_files:
            raise ImageRefused(name, "entries", f"{len(remaps)}, more than {self.lim.max_files}")
        clients: dict[int, list[Any]] = {}
        seen: set[int] = set()
        for r in remaps:
            where = f"orig_id {r.orig_id}"
            if not r.HasField("remap_type"):  # CRIU would take remap_id's top bit for the kind (images before 2016)
                raise ImageRefused(name, f"{where} remap_type", "missing (CRIU 4 always writes it)")
            if r.remap_type == remap_file_path_pb2.LINKED:
                why = ("LINKED: the file was reached through a link_remap name CRIU made in the source's file system, "
                       "which the destination does not have; only deleted files carried whole (ghosts) move")  # fmt: skip
                raise ImageRefused(name, f"{where} remap_type", why)
            if r.remap_type == remap_file_path_pb2.PROCFS:
                why = "PROCFS: a /proc/PID directory of a dead task (CRIU would fork a helper task with that PID)"
                raise ImageRefused(name, f"{where} remap_type", why)
            if r.remap_type != remap_file_path_pb2.GHOST:
                raise ImageRefused(name, f"{where} remap_type", f"{r.remap_type}: not a kind CRIU 4 writes")
            if r.orig_id not in self.reg_files or r.orig_id in seen:
                raise ImageRefused(name, f"{where} orig_id", "is not a regular-file entry of files.img, or is remapped twice")
            seen.add(r.orig_id)
            if r.remap_id not in ghosts:
                raise ImageRefused(name, f"{where} remap_id", f"{r.remap_id}: no ghost-file-{r.remap_id:x}.img")
            clients.setdefault(r.remap_id, []).append(self.reg_files[r.orig_id])
        unused = sorted(set(ghosts) - set(clients))
        if unused:
            raise ImageRefused(ghosts[unused[0]], "file name", "is no remapped file's (remap-fpath.img does not name it)")
        total = 0
        for gid, regs in sorted(clients.items()):
            n = ghosts[gid]
            if not mounts:
                raise ImageRefused(n, "file", "a ghost outside a mount namespace would be made in the host's root")
            mnt_ids = {r.mnt_id for r in regs}
            if len(mnt_ids) != 1:
                raise ImageRefused(n, "clients' reg.mnt_id", f"{sorted(mnt_ids)}: CRIU links a ghost within one mount only")
            m = mounts[regs[0].mnt_id]  # _files checked it is the container's and holds every client's path
            mode, size, data = self._ghost_file(n)
            total += data
            if total > self.lim.ghost_bytes:
                raise ImageRefused(n, "size", f"the ghost files' data pass {self.lim.ghost_bytes} bytes in all")
            for r in regs:
                if r.HasField("mode") and stat.S_IFMT(r.mode) != stat.S_IFMT(mode):
                    raise ImageRefused(n, "mode", f"{mode:#o} is not the type of its file ({r.name!r}, mode {r.mode:#o})")
                if stat.S_ISREG(mode) and r.HasField("size") and r.size != size:
                    raise ImageRefused(n, "size", f"{size} bytes, but its file {r.name!r} had {r.size}")
                self._ghost_place(n, r.name, m, mounts, stat.S_ISDIR(mode))

    def _ghost_file(self, n: str) -> tuple[int, int, int]:
        """One ghost-file-N.img: (mode, size, data bytes); read as far as its headers (the data are skipped)."""
        fd, st = self._open(n)
        try:
            end = st.st_size
            head = os.pread(fd, 12 + _GHOST_ENTRY_BYTES, 0)
            if head[:8] != _GHOST_MAGIC or len(head) < 12:
                raise ImageRefused(n, "magic", f"{head[:8].hex()!r} is not a CRIU ghost file's")
            (size,) = struct.unpack_from("<I", head, 8)
            if size > len(head) - 12:
                raise ImageRefused(n, "entry size", f"{size} bytes overruns the file (or {_GHOST_ENTRY_BYTES}) at offset 12")
            g = _parse(n, ghost_file_pb2.ghost_file_entry, head[12 : 12 + size], 12)
            mode, off = g.mode, 12 + size
            if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFDIR):
                kind = stat.filemode(mode)[0]
                raise ImageRefused(n, "mode", f"{mode:#o} (type {kind!r}): only regular files and directories are re-created")
            if mode & (stat.S_ISUID | stat.S_ISGID):
                raise ImageRefused(n, "mode", f"{mode:#o} has the set-user-ID or set-group-ID bit")
            if g.HasField("rdev") or g.HasField("symlnk_target"):
                raise ImageRefused(n, "rdev/symlnk_target", "set, for a regular file or directory")
            if stat.S_ISDIR(mode):
                if g.chunks or g.HasField("size") or off != end:
                    raise ImageRefused(n, "chunks/size", "set, or data follow, for a directory")
                return mode, 0, 0
            if not g.chunks:  # a small file (CRIU: under 12 KiB): the rest of the image is its contents
                if end - off > self.lim.ghost_bytes:
                    raise ImageRefused(n, "size", f"{end - off} bytes of data, more than {self.lim.ghost_bytes}")
                return mode, end - off, end - off
            if not g.HasField("size") or g.size > self.lim.ghost_bytes:
                have = g.size if g.HasField("size") else "missing"
                raise ImageRefused(n, "size", f"{have}: a chunked ghost needs one of at most {self.lim.ghost_bytes} bytes")
            return mode, g.size, self._ghost_chunks(n, fd, off, end, g.size)
        finally:
            os.close(fd)

    def _ghost_chunks(self, n: str, fd: int, off: int, end: int, size: int) -> int:
        """The data extents after a chunked ghost's entry: each a ghost_chunk_entry and its bytes,
        in order, within the file's size, filling the image exactly. Returns their bytes."""
        data, last, count = 0, 0, 0
        while off < end:
            count += 1
            if count > self.lim.ghost_chunks:
                raise ImageRefused(n, "chunks", f"more than {self.lim.ghost_chunks}")
            b = os.pread(fd, 4 + _CHUNK_ENTRY_BYTES, off)
            if len(b) < 4 or struct.unpack_from("<I", b)[0] > len(b) - 4:
                raise ImageRefused(n, "chunk entry size", f"truncated or too long at offset {off}")
            (sz,) = struct.unpack_from("<I", b)
            c = _parse(n, ghost_file_pb2.ghost_chunk_entry, b[4 : 4 + sz], off)
            off += 4 + sz
            if c.off < last or c.off + c.len > size or c.len > end - off:
                why = f"off {c.off} len {c.len}: out of order, past the file's {size} bytes or the image's end"
                raise ImageRefused(n, f"chunk at offset {off}", why)
            last = c.off + c.len
            off += c.len
            data += c.len
        return data

    def _ghost_place(self, n: str, path: str, m: Any, mounts: dict[int, Any], is_dir: bool) -> None:
        """Where CRIU makes the ghost for the client at `path` on mount `m`: the mount must be the
        deepest one holding the path, writable, the root file system (read here) or a tmpfs of the
        container (its archive); every existing directory on the way, and for a directory the
        path itself, must be a real directory (CRIU goes up past missing ones, never follows a link)."""
        deepest = max((x for x in mounts.values() if (path + "/").startswith(x.mountpoint.rstrip("/") + "/")),
                      key=lambda x: len(x.mountpoint))  # fmt: skip
        where = f"client path {path!r}"
        if deepest is not m:
            raise ImageRefused(n, where, f"lies under mount {deepest.mountpoint!r}, not on its own {m.mountpoint!r}")
        if m.flags & _MS_RDONLY:
            raise ImageRefused(n, where, f"is on read-only mount {m.mountpoint!r} (CRIU would remount it writable)")
        rel = posixpath.relpath(path, m.mountpoint).split("/")
        parts = rel if is_dir else rel[:-1]
        if m.mountpoint == "/":
            self._ghost_rootfs(n, where, [p for p in parts if p != "."])
        elif m.fstype == _TMPFS and not m.HasField("ext_key") and m.root == "/":
            listing = self.tmpfs_members.get(m.root_dev, {})
            for i in range(1, len(parts) + 1):
                kind = listing.get("./" + "/".join(parts[:i]))
                if kind is None:
                    return  # missing here: CRIU goes up to the last one that exists
                if kind != "dir":
                    why = f"goes through {'/'.join(parts[:i])!r} of {m.mountpoint!r}, a {kind}, not a directory"
                    raise ImageRefused(n, where, why)
        else:
            why = f"is on {m.mountpoint!r} (fstype {m.fstype}): ghosts are re-created only on the root file system or a tmpfs"
            raise ImageRefused(n, where, why)

    def _ghost_rootfs(self, n: str, where: str, parts: list[str]) -> None:
        root = self.e.rootfs
        if root is None:
            raise ImageRefused(n, where, "is on the root file system, which this check was not given (the bundle's rootfs)")
        try:
            fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise ImageRefused(n, where, f"is on the root file system, and {root} cannot be opened: {err.strerror}") from None
        try:
            for i, part in enumerate(parts):
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    return  # missing here: CRIU goes up to the last one that exists
                except OSError as err:
                    raise ImageRefused(n, where, f"goes through {'/'.join(parts[: i + 1])!r}: {err.strerror}") from None
                if not stat.S_ISDIR(st.st_mode):
                    what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise ImageRefused(n, where, f"goes through {'/'.join(parts[: i + 1])!r}, {what} in the container's root")
                nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nfd
        finally:
            os.close(fd)

    def _path(self, image: str, where: str, path: str, mnt_id: int, mounts: dict[int, Any]) -> str:
        _normal(path, image, f"{where} reg.name")
        if mounts:
            m = mounts.get(mnt_id)
            if m is None:
                raise ImageRefused(image, f"{where} reg.mnt_id", f"{mnt_id} is not a mount of the container")
            mp = m.mountpoint.rstrip("/") + "/"
            if not (path + "/").startswith(mp):
                raise ImageRefused(image, f"{where} reg.name", f"{path!r} is not under its mount {m.mountpoint!r}")
            if m.fstype == _FSTYPE["proc"] and _PROC_MAGIC_LINKS.intersection(path.split("/")):
                raise ImageRefused(image, f"{where} reg.name", f"{path!r} goes through a /proc magic link")
        return path

    def _netns(self, image: str, fld: str, ns_id: int, own: dict[str, int]) -> None:
        if ns_id and ns_id != own["net"]:
            raise ImageRefused(image, fld, f"{ns_id} is not the container's net namespace ({own['net']})")

    def _descriptors(self, names: Iterable[str]) -> None:
        """runc's descriptors.json: the container's stdio as runc saw it."""
        if "descriptors.json" not in names:
            return
        raw = self._read("descriptors.json", 64 << 10)
        try:
            fds = json.loads(raw)
        except ValueError:
            fds = None
        if not isinstance(fds, list) or len(fds) > 3 or not all(isinstance(x, str) and len(x) < 4096 for x in fds):
            raise ImageRefused("descriptors.json", "contents", "not runc's list of the three stdio descriptors")

    def _cgroups(self) -> set[int]:
        """cgroup.img: the container's cgroup (the same path in every hierarchy) and the
        cgroups below it (systemd's slices and scopes), nothing beside it."""
        name = "cgroup.img"
        cg = self._one(name, cgroup_pb2.cgroup_entry)
        paths = {c.path for s in cg.sets for c in s.ctls}
        for p in paths:
            _normal(p, name, "sets[].ctls[].path")
        root = min(paths, key=len, default="")
        if any(p != root and not p.startswith(root.rstrip("/") + "/") for p in paths):
            raise ImageRefused(name, "sets[].ctls[].path", f"{sorted(paths)[:4]}: more than the container's one cgroup")
        top = root.strip("/")
        # in a cgroup namespace (the spec's, for systemd) its root is the container's cgroup, nothing above
        prefix = len(root.rstrip("/")) if "cgroup" in self.e.namespaces else 0
        for c in (c for s in cg.sets for c in s.ctls):
            if c.cgns_prefix != prefix:
                must = f"the cgroup namespace's root must be {root[:prefix]!r}"
                raise ImageRefused(name, "sets[].ctls[].cgns_prefix", f"{c.cgns_prefix} for {c.path!r}: {must}")

        def below(dirs: Any) -> None:
            for d in dirs:
                if d.dir_name != top and not d.dir_name.startswith(top + "/") or ".." in d.dir_name.split("/"):
                    raise ImageRefused(name, "controllers[].dirs[].dir_name", f"{d.dir_name!r} is not the container's cgroup")
                below(d.children)

        for c in cg.controllers:
            below(c.dirs)
        return {s.id for s in cg.sets}

    def _task(self, t: Any, regs: dict[int, str], cgsets: set[int]) -> None:
        fs = self._one(f"fs-{t.pid}.img", fs_pb2.fs_entry)
        for fld in ("root_id", "cwd_id"):
            if getattr(fs, fld) not in regs:
                raise ImageRefused(f"fs-{t.pid}.img", fld, f"{getattr(fs, fld)} is not a regular-file entry of files.img")
        if regs[fs.root_id] != "/":
            raise ImageRefused(f"fs-{t.pid}.img", "root_id", f"names {regs[fs.root_id]!r}, expected '/'")
        name = f"mm-{t.pid}.img"
        mm = self._one(name, mm_pb2.mm_entry)
        if len(mm.vmas) > self.lim.max_vmas:
            raise ImageRefused(name, "vmas", f"{len(mm.vmas)}, more than {self.lim.max_vmas}")
        if mm.HasField("exe_file_id") and mm.exe_file_id not in regs:
            raise ImageRefused(name, "exe_file_id", f"{mm.exe_file_id} is not a regular-file entry of files.img")
        for v in mm.vmas:
            # VMA_FILE_PRIVATE | VMA_FILE_SHARED: a mapping of a regular file or a memfd of files.img
            if v.status & (1 << 6 | 1 << 7) and v.shmid not in regs and v.shmid not in self.memfds:
                why = f"{v.shmid} is not a regular-file or memfd entry of files.img"
                raise ImageRefused(name, f"vmas[{v.start:#x}].shmid", why)
        tsync = self._tsync(t.pid)
        for tid in t.threads:
            self._thread(f"core-{tid}.img", tid == t.pid, cgsets, tsync)

    def _tsync(self, pid: int) -> bool:
        """Whether the task's leader restores its seccomp filter with SECCOMP_FILTER_FLAG_TSYNC:
        CRIU then writes no filter for the other threads (they share the leader's) and the
        kernel installs the leader's on every thread of the task."""
        core = self._one(f"core-{pid}.img", core_pb2.core_entry)
        th = core.thread_core
        if th.seccomp_mode != core_pb2.seccomp_mode.Value("filter") or "seccomp.img" not in os.listdir(self.d):
            return False
        filters = self._one("seccomp.img", seccomp_pb2.seccomp_entry).seccomp_filters
        return th.seccomp_filter < len(filters) and bool(filters[th.seccomp_filter].flags & _SECCOMP_TSYNC)

    def _thread(self, name: str, leader: bool, cgsets: set[int], tsync: bool = False) -> None:
        e = self.e
        core = self._one(name, core_pb2.core_entry)
        if core.HasField("ids") or (not leader and core.HasField("tc")):
            raise ImageRefused(name, "ids/tc", "set where CRIU 4 writes none (ids-*.img and the leader's tc rule)")
        tc, th = core.tc, core.thread_core
        if leader and (not core.HasField("tc") or tc.HasField("old_seccomp_mode") or tc.HasField("old_seccomp_filter")):
            raise ImageRefused(name, "tc", "missing, or with the old per-task seccomp fields")
        if not th.HasField("creds"):
            raise ImageRefused(name, "thread_core.creds", "missing")
        if leader and tc.task_state == _TASK_STOPPED:
            self.stopped.append(int(name[len("core-"):-len(".img")]))
        c = th.creds
        bnd = e.caps_bounding
        if not bnd >> CAP["CAP_SETUID"] & 1:
            for k in ("uid", "euid", "suid", "fsuid"):
                if getattr(c, k) != e.uid:
                    why = f"the spec runs as uid {e.uid} without CAP_SETUID"
                    raise ImageRefused(name, f"thread_core.creds.{k}", f"{getattr(c, k)}: {why}")
        if not bnd >> CAP["CAP_SETGID"] & 1:
            for k in ("gid", "egid", "sgid", "fsgid"):
                if getattr(c, k) != e.gid:
                    why = f"the spec runs as gid {e.gid} without CAP_SETGID"
                    raise ImageRefused(name, f"thread_core.creds.{k}", f"{getattr(c, k)}: {why}")
            extra = set(c.groups) - e.additional_gids - {e.gid}
            if extra:
                raise ImageRefused(name, "thread_core.creds.groups", f"{sorted(extra)} not granted by the spec (no CAP_SETGID)")
        sets = {k: self._caps(name, k, getattr(c, k)) for k in ("cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb")}
        # A task may gain permitted capabilities up to its bounding set by exec, unless no_new_privs.
        most = {"cap_prm": e.caps_permitted if e.no_new_privileges else bnd}
        for k, v in sets.items():
            over = v & ~most.get(k, bnd)
            if over:
                raise ImageRefused(name, f"thread_core.creds.{k}", f"has {_cap_names(over)}, which the spec does not grant")
        if sets["cap_eff"] & ~sets["cap_prm"] or sets["cap_amb"] & ~(sets["cap_prm"] & sets["cap_inh"]):
            raise ImageRefused(name, "thread_core.creds.cap_eff/cap_amb", "not within cap_prm (and cap_inh)")
        if c.secbits & ~_VALID_SECBITS:
            raise ImageRefused(name, "thread_core.creds.secbits", f"{c.secbits:#x} has unknown bits")
        if e.no_new_privileges and c.no_new_privs != 1:
            raise ImageRefused(name, "thread_core.creds.no_new_privs", f"{c.no_new_privs}: the spec sets noNewPrivileges")
        for k in ("lsm_profile", "lsm_sockcreate"):
            if c.HasField(k) and getattr(c, k) not in e.lsm_labels:
                raise ImageRefused(name, f"thread_core.creds.{k}", f"{getattr(c, k)!r} is not the spec's label")
        if c.HasField("apparmor_data") and c.apparmor_data:
            raise ImageRefused(name, "thread_core.creds.apparmor_data", "set; the spec loads no AppArmor policy")
        shared = not leader and tsync and not th.HasField("seccomp_mode")  # the leader's filter, synced
        if e.seccomp and th.seccomp_mode != core_pb2.seccomp_mode.Value("filter") and not shared:
            mode = core_pb2.seccomp_mode.Name(th.seccomp_mode) if th.HasField("seccomp_mode") else "unset"
            raise ImageRefused(name, "thread_core.seccomp_mode", f"{mode}: the spec has a seccomp profile (mode filter)")
        if th.HasField("cg_set") and th.cg_set not in cgsets:
            raise ImageRefused(name, "thread_core.cg_set", f"{th.cg_set} is not a set of the container's cgroup")
        if not leader:
            return
        if tc.HasField("cg_set") and tc.cg_set not in cgsets:
            raise ImageRefused(name, "tc.cg_set", f"{tc.cg_set} is not a set of the container's cgroup")
        if not bnd >> CAP["CAP_SYS_RESOURCE"] & 1:
            for i, r in enumerate(tc.rlimits.rlimits):
                top = e.rlimits_hard[i] if i < len(e.rlimits_hard) else _RLIM_UNLIMITED
                if r.max > top or r.cur > r.max:
                    raise ImageRefused(name, f"tc.rlimits.rlimits[{i}]", f"cur {r.cur} max {r.max}: above the hard limit {top}")
            if tc.HasField("oom_score_adj") and tc.oom_score_adj < e.oom_score_adj:
                raise ImageRefused(name, "tc.oom_score_adj", f"{tc.oom_score_adj} is below the spec's {e.oom_score_adj}")

    def _caps(self, image: str, fld: str, words: Iterable[int]) -> int:
        mask = 0
        for i, w in enumerate(words):
            mask |= int(w) << (32 * i)
        if mask >> (self.e.cap_last_cap + 1):
            why = f"has bit {mask.bit_length() - 1}, above cap_last_cap {self.e.cap_last_cap}"
            raise ImageRefused(image, f"thread_core.creds.{fld}", why)
        return mask


def _warm_up() -> None:
    """Read a tiny tar.gz once at import: tarfile's first use costs about 1 ms, which
    would otherwise fall in the first migration's frozen time."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.addfile(tarfile.TarInfo("./warm"))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue()), mode="r:gz") as tf:
        list(tf)


def _parse(image: str, cls: Any, data: bytes, off: int) -> Any:
    """One protobuf entry of `image` (found at `off`), or refused."""
    m = cls()
    try:
        m.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError
        raise ImageRefused(image, "entry", f"at offset {off} is not a {cls.__name__}: {err}") from None
    return m


def _normal(path: str, image: str, fld: str) -> None:
    """An absolute, normalized path: no '..', '.', '//' or NUL."""
    if not path.startswith("/") or "\0" in path or (path != "/" and posixpath.normpath(path) != path) or "//" in path:
        raise ImageRefused(image, fld, f"{path!r} is not a normalized absolute path")


def _member(image: str, ti: tarfile.TarInfo, devices: Mapping[str, tuple[int, int]], links: set[str]) -> None:
    """One member of a tmpfs archive: a relative name that stays inside, of a harmless kind."""
    name = ti.name
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "\0" in name or (name != "." and not name.startswith("./")):
        raise ImageRefused(image, f"member {name!r}", "is not a plain relative name ('./...')")
    if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
        raise ImageRefused(image, f"member {name!r}", "goes through a symbolic link of the archive")
    if ti.isfifo():  # a named pipe reaches nothing outside the tmpfs (systemd's /run/initctl)
        return
    if ti.isdev():
        if ti.ischr() and devices.get(name) == (ti.devmajor, ti.devminor):
            return
        if ti.ischr() and (ti.devmajor, ti.devminor) == (0, 0):
            return  # the whiteout node: no driver behind it, anyone may make one (systemd's /run/systemd/inaccessible/chr)
        raise ImageRefused(image, f"member {name!r}", f"is device {ti.devmajor}:{ti.devminor}, not one the spec creates")
    if ti.issym():
        links.add(name)
    elif not (ti.isdir() or ti.isreg()):
        raise ImageRefused(image, f"member {name!r}", "is a hard link")


def _flag_bits(options: Iterable[str]) -> int:
    return sum(bit for opt, bit in _FLAGS.items() if opt in options)


def _mount_of(path: str, mounts: Mapping[str, MountRule]) -> str:
    """The longest spec mountpoint that contains `path` ('/' if none)."""
    best = "/"
    for mp in mounts:
        if (path + "/").startswith(mp.rstrip("/") + "/") and len(mp) > len(best) and mp != path:
            best = mp
    return best


def _cap_mask(names: Iterable[str] | None) -> int:
    mask = 0
    for n in names or []:
        if n in CAP:
            mask |= 1 << CAP[n]
    return mask


def _cap_names(mask: int) -> str:
    return ", ".join(f"CAP_{CAP_NAMES[i]}" if i < len(CAP_NAMES) else str(i) for i in range(mask.bit_length()) if mask >> i & 1)


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 1 << 40


def _own_oom_score_adj() -> int:
    try:
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return 0


_warm_up()
