"""CRIU image validation (phaul.linux.criu_images) on a real dump of a real runc
container: the dump is accepted, and each tampered copy (the protobuf messages
edited and written back) is refused with an error naming the image and field."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import shutil
import stat
import struct
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agentlib import remove_host_cgroups
from imagelib import dumped
from imagelib import edit as _edit
from imagelib import entries as _entries
from imagelib import write as _write
from pycriu.images import (
    core_pb2,
    fdinfo_pb2,
    ghost_file_pb2,
    inventory_pb2,
    mnt_pb2,
    pstree_pb2,
    remap_file_path_pb2,
    seccomp_pb2,
    tty_pb2,
)

from phaul.containers import ContainerConfig
from phaul.containers.runc import RuncContainers
from phaul.errors import InvalidInput, PhaulError, ToolFailed
from phaul.linux import criu_images
from phaul.linux.criu_images import CAP, ImageRefused, expectation_from_spec, read_spec, validate_images

# A seccomp profile as h4's default would be: every thread of the dump runs under a filter.
SECCOMP = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": [{"names": ["kexec_load", "open_by_handle_at"], "action": "SCMP_ACT_ERRNO"}],
}
SYS_ADMIN = 1 << CAP["CAP_SYS_ADMIN"]


@dataclass(frozen=True)
class Dump:
    images: Path
    spec: dict[str, Any]
    child: int  # the pid of the container's second task (its `sleep`)
    bundle: Path | None = None  # the container's bundle (its rootfs), while the module runs


@pytest.fixture(scope="module")
def dump() -> Iterator[Dump]:
    """One real dump for the module: phaul's busybox container (its spec as runc.py
    writes it, plus a seccomp profile), checkpointed with --leave-running."""
    def seccomp(spec: dict[str, Any]) -> None:
        spec["linux"]["seccomp"] = SECCOMP

    with dumped(ContainerConfig(id="imgs", memory=64 << 20, pids=64), seccomp) as (images, bundle):
        tree = _entries(images / "pstree.img", pstree_pb2.pstree_entry)[1]
        assert len(tree) == 2, f"expected the shell and its sleep, got {[t.pid for t in tree]}"
        yield Dump(images, read_spec(bundle / "config.json"), tree[1].pid)


@pytest.fixture
def tampered(dump: Dump, tmp_path: Path) -> Path:
    """A copy of the dump to edit."""
    return _linked_copy(dump.images, tmp_path / "images")


def _linked_copy(images: Path, dest: Path) -> Path:
    """A copy of `images` made of hard links (the image editors unlink before they write)."""
    shutil.copytree(images, dest, copy_function=os.link)
    return dest


def _refused(d: Path, spec: dict[str, Any], image: str, fld: str) -> str:
    with pytest.raises(ImageRefused) as e:
        validate_images(d, expectation_from_spec(spec))
    assert isinstance(e.value, InvalidInput)
    text = str(e.value)
    assert e.value.image == image and fld in e.value.field, text
    assert f"CRIU image {image}: " in text and fld in text, text
    return text


def _root_ids(d: Path) -> Any:
    return _entries(d / "inventory.img", inventory_pb2.inventory_entry)[1][0].root_ids


def _mount_image(d: Path) -> str:
    [name] = [n for n in os.listdir(d) if n.startswith("mountpoints-")]
    return name


def _dev_archive(d: Path) -> str:
    """The tmpfs archive of the container's /dev."""
    mounts = _entries(d / _mount_image(d), mnt_pb2.mnt_entry)[1]
    [dev] = [m for m in mounts if m.mountpoint == "/dev"]
    return f"tmpfs-dev-{dev.root_dev}.tar.gz.img"


# ---- the real dump -----------------------------------------------------------------


def test_the_real_dump_is_accepted(dump: Dump) -> None:
    report = validate_images(dump.images, expectation_from_spec(dump.spec))
    assert (report.tasks, report.threads) == (2, 2)
    assert report.mounts >= 20 and report.files >= 3
    assert report.ms < 10, report


def test_the_dump_runs_under_the_seccomp_filter(dump: Dump) -> None:
    core = _entries(dump.images / "core-1.img", core_pb2.core_entry)[1][0]
    assert core.thread_core.seccomp_mode == core_pb2.seccomp_mode.Value("filter")


def test_pycriu_missing_is_reported(dump: Dump, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(criu_images, "_PYCRIU_ERROR", "No module named 'pycriu'")
    with pytest.raises(ToolFailed, match="pycriu is missing .* cannot be checked"):
        validate_images(dump.images, expectation_from_spec(dump.spec))


# ---- credentials ------------------------------------------------------------------------


@pytest.mark.parametrize("fld", ["cap_eff", "cap_prm", "cap_bnd", "cap_amb", "cap_inh"])
def test_an_extra_capability_is_refused(dump: Dump, tampered: Path, fld: str) -> None:
    def add(e: list[Any]) -> None:
        getattr(e[0].thread_core.creds, fld)[0] |= SYS_ADMIN

    _edit(tampered, "core-1.img", core_pb2.core_entry, add)
    text = _refused(tampered, dump.spec, "core-1.img", f"thread_core.creds.{fld}")
    assert "CAP_SYS_ADMIN" in text


def test_a_capability_of_the_spec_beyond_its_permitted_set_is_refused(dump: Dump, tampered: Path) -> None:
    """noNewPrivileges: the permitted set cannot grow past the spec's, even within the bounding set."""
    spec = copy.deepcopy(dump.spec)
    spec["process"]["capabilities"]["permitted"].remove("CAP_KILL")
    _refused(tampered, spec, "core-1.img", "thread_core.creds.cap_prm")


def test_a_capability_above_cap_last_cap_is_refused(dump: Dump, tampered: Path) -> None:
    _edit(tampered, "core-1.img", core_pb2.core_entry, lambda e: e[0].thread_core.creds.cap_bnd.__setitem__(1, 1 << 30))
    _refused(tampered, dump.spec, "core-1.img", "thread_core.creds.cap_bnd")


def test_other_uids_need_cap_setuid_in_the_spec(dump: Dump, tampered: Path) -> None:
    """Without a user namespace uid 0 is the host's root, but the spec already runs the
    container as uid 0 with CAP_SETUID/CAP_SETGID: it may take any uid/gid itself, so
    any is accepted. A spec without them pins the image to its user."""
    _edit(tampered, "core-1.img", core_pb2.core_entry, lambda e: setattr(e[0].thread_core.creds, "euid", 1000))
    validate_images(tampered, expectation_from_spec(dump.spec))
    spec = copy.deepcopy(dump.spec)
    for caps in spec["process"]["capabilities"].values():
        caps[:] = [c for c in caps if c not in ("CAP_SETUID", "CAP_SETGID")]
    spec["process"]["user"] = {"uid": 1000, "gid": 1000}
    text = _refused(tampered, spec, "core-1.img", "thread_core.creds.uid")  # the real image says uid 0
    assert "uid 1000 without CAP_SETUID" in text


def test_groups_beyond_the_spec_need_cap_setgid(dump: Dump, tampered: Path) -> None:
    spec = copy.deepcopy(dump.spec)
    for caps in spec["process"]["capabilities"].values():
        caps[:] = [c for c in caps if c != "CAP_SETGID"]
    _edit(tampered, "core-1.img", core_pb2.core_entry, lambda e: e[0].thread_core.creds.groups.append(42))
    with pytest.raises(ImageRefused, match=r"thread_core.creds.groups \[42\]"):
        validate_images(tampered, expectation_from_spec(spec))


def test_no_new_privs_cleared_is_refused(dump: Dump, tampered: Path) -> None:
    _edit(tampered, "core-1.img", core_pb2.core_entry, lambda e: setattr(e[0].thread_core.creds, "no_new_privs", 0))
    _refused(tampered, dump.spec, "core-1.img", "thread_core.creds.no_new_privs")


def test_seccomp_dropped_is_refused_when_the_spec_has_a_profile(dump: Dump, tampered: Path) -> None:
    _edit(tampered, f"core-{dump.child}.img", core_pb2.core_entry, lambda e: e[0].thread_core.ClearField("seccomp_mode"))
    _refused(tampered, dump.spec, f"core-{dump.child}.img", "thread_core.seccomp_mode")
    spec = copy.deepcopy(dump.spec)
    del spec["linux"]["seccomp"]  # without a profile in the spec a task need not have one
    validate_images(tampered, expectation_from_spec(spec))


def _add_thread(d: Path, tid: int, change: Callable[[Any], None]) -> None:
    _edit(d, "pstree.img", pstree_pb2.pstree_entry, lambda e: e[0].threads.append(tid))
    head, [core] = _entries(d / "core-1.img", core_pb2.core_entry)
    core.ClearField("tc")  # a thread's core carries no task fields
    change(core.thread_core.creds)
    _write(d / f"core-{tid}.img", head, [core])


def test_a_second_thread_with_other_creds_is_refused(dump: Dump, tampered: Path) -> None:
    _add_thread(tampered, 77, lambda c: None)
    assert validate_images(tampered, expectation_from_spec(dump.spec)).threads == 3

    def admin(creds: Any) -> None:
        creds.cap_eff[0] |= SYS_ADMIN
        creds.cap_prm[0] |= SYS_ADMIN

    _add_thread(tampered, 78, admin)
    _refused(tampered, dump.spec, "core-78.img", "thread_core.creds.cap_prm")


def test_raised_rlimit_is_refused(dump: Dump, tampered: Path) -> None:
    def raise_nofile(e: list[Any]) -> None:
        e[0].tc.rlimits.rlimits[7].max = 1 << 20
        e[0].tc.rlimits.rlimits[7].cur = 1 << 20

    _edit(tampered, "core-1.img", core_pb2.core_entry, raise_nofile)
    _refused(tampered, dump.spec, "core-1.img", "tc.rlimits.rlimits[7]")


# ---- namespaces --------------------------------------------------------------------------


@pytest.mark.parametrize("ns", ["net", "pid", "mnt", "ipc", "uts"])
def test_the_root_task_in_a_host_namespace_is_refused(dump: Dump, tampered: Path, ns: str) -> None:
    host = getattr(_root_ids(tampered), f"{ns}_ns_id")
    _edit(tampered, "ids-1.img", core_pb2.task_kobj_ids_entry, lambda e: setattr(e[0], f"{ns}_ns_id", host))
    text = _refused(tampered, dump.spec, "ids-1.img", f"{ns}_ns_id")
    assert "is the dumping host's" in text


def test_a_namespace_the_spec_does_not_create_is_refused(dump: Dump, tampered: Path) -> None:
    _edit(tampered, "ids-1.img", core_pb2.task_kobj_ids_entry, lambda e: setattr(e[0], "user_ns_id", 4242))
    _refused(tampered, dump.spec, "ids-1.img", "user_ns_id")


def test_a_child_in_the_host_net_namespace_is_refused(dump: Dump, tampered: Path) -> None:
    host = _root_ids(tampered).net_ns_id
    _edit(tampered, f"ids-{dump.child}.img", core_pb2.task_kobj_ids_entry, lambda e: setattr(e[0], "net_ns_id", host))
    _refused(tampered, dump.spec, f"ids-{dump.child}.img", "net_ns_id")


def test_a_namespace_file_of_a_host_namespace_is_refused(dump: Dump, tampered: Path) -> None:
    def ns_file(e: list[Any]) -> None:
        f = fdinfo_pb2.file_entry(type=fdinfo_pb2.NS, id=999)
        f.nsf.id, f.nsf.ns_id, f.nsf.ns_cflag, f.nsf.flags = 999, _root_ids(tampered).net_ns_id, 0x40000000, 0
        e.append(f)

    _edit(tampered, "files.img", fdinfo_pb2.file_entry, ns_file)
    _refused(tampered, dump.spec, "files.img", "nsf.ns_id")


# ---- mounts ------------------------------------------------------------------------------


def _add_mount(d: Path, change: Callable[[Any, list[Any]], None]) -> str:
    name = _mount_image(d)

    def add(e: list[Any]) -> None:
        [root] = [m for m in e if m.mountpoint == "/"]
        m = mnt_pb2.mnt_entry()
        m.CopyFrom(root)
        m.mnt_id, m.parent_mnt_id = 9000, root.mnt_id
        change(m, e)
        e.append(m)

    _edit(d, name, mnt_pb2.mnt_entry, add)
    return name


def test_a_bind_mount_of_a_host_path_is_refused(dump: Dump, tampered: Path) -> None:
    def host_etc(m: Any, _: list[Any]) -> None:
        m.mountpoint, m.root, m.ext_key = "/host", "/etc", "/etc"

    name = _add_mount(tampered, host_etc)
    _refused(tampered, dump.spec, name, "mountpoint")


def test_the_host_disk_mounted_anew_is_refused(dump: Dump, tampered: Path) -> None:
    def disk(m: Any, _: list[Any]) -> None:
        m.mountpoint, m.root, m.fsname = "/mnt", "/", "ext4"

    name = _add_mount(tampered, disk)
    _refused(tampered, dump.spec, name, "mountpoint")


def test_a_host_bind_over_a_mount_of_the_spec_is_refused(dump: Dump, tampered: Path) -> None:
    """/dev/shm exists in the spec, but as a tmpfs runc creates, not an external bind."""
    name = _mount_image(tampered)

    def bind(e: list[Any]) -> None:
        [shm] = [m for m in e if m.mountpoint == "/dev/shm"]
        shm.ext_key = "/dev/shm"

    _edit(tampered, name, mnt_pb2.mnt_entry, bind)
    _refused(tampered, dump.spec, name, "ext_key")


def test_a_writable_sys_is_refused(dump: Dump, tampered: Path) -> None:
    name = _mount_image(tampered)

    def writable(e: list[Any]) -> None:
        [sys_] = [m for m in e if m.mountpoint == "/sys"]
        sys_.flags &= ~1

    _edit(tampered, name, mnt_pb2.mnt_entry, writable)
    _refused(tampered, dump.spec, name, "flags")


def test_a_readonly_path_bound_from_elsewhere_is_refused(dump: Dump, tampered: Path) -> None:
    name = _mount_image(tampered)

    def elsewhere(e: list[Any]) -> None:
        [m] = [m for m in e if m.mountpoint == "/proc/sys"]
        m.root = "/1/root"

    _edit(tampered, name, mnt_pb2.mnt_entry, elsewhere)
    _refused(tampered, dump.spec, name, "root")


@pytest.mark.parametrize("path", ["/proc/keys", "/sys/firmware", "/proc/sys", "/dev/pts"])
def test_a_mask_or_mount_of_the_spec_left_out_is_refused(dump: Dump, tampered: Path, path: str) -> None:
    """runc restore does not mask again: a mask missing from the image leaves the host's file open."""
    name = _mount_image(tampered)
    _edit(tampered, name, mnt_pb2.mnt_entry, lambda e: e.remove(next(m for m in e if m.mountpoint == path)))
    text = _refused(tampered, dump.spec, name, "mountpoint")
    assert repr(path) in text


def test_a_masked_directory_made_writable_is_refused(dump: Dump, tampered: Path) -> None:
    name = _mount_image(tampered)
    _edit(tampered, name, mnt_pb2.mnt_entry, lambda e: setattr(next(m for m in e if m.mountpoint == "/proc/acpi"), "flags", 0))
    _refused(tampered, dump.spec, name, "ext_key/fstype")


# ---- files -------------------------------------------------------------------------------


def _set_file(d: Path, change: Callable[[Any], None]) -> None:
    def edit(e: list[Any]) -> None:
        change(next(f for f in e if f.type == fdinfo_pb2.REG and f.reg.name == "/dev/null"))

    _edit(d, "files.img", fdinfo_pb2.file_entry, edit)


@pytest.mark.parametrize("path", ["/../../etc/shadow", "../x", "/dev/../etc/shadow", "dev/null", "/dev//null"])
def test_a_file_by_a_path_outside_the_root_is_refused(dump: Dump, tampered: Path, path: str) -> None:
    _set_file(tampered, lambda f: setattr(f.reg, "name", path))
    _refused(tampered, dump.spec, "files.img", "reg.name")


def test_a_file_on_a_mount_outside_the_container_is_refused(dump: Dump, tampered: Path) -> None:
    _set_file(tampered, lambda f: setattr(f.reg, "mnt_id", 4242))
    _refused(tampered, dump.spec, "files.img", "reg.mnt_id")


def test_a_file_not_under_its_mount_is_refused(dump: Dump, tampered: Path) -> None:
    _set_file(tampered, lambda f: setattr(f.reg, "name", "/etc/shadow"))  # mnt_id stays /dev's
    _refused(tampered, dump.spec, "files.img", "reg.name")


def test_a_file_through_a_proc_magic_link_is_refused(dump: Dump, tampered: Path) -> None:
    mounts = _entries(tampered / _mount_image(tampered), mnt_pb2.mnt_entry)[1]
    proc = next(m for m in mounts if m.mountpoint == "/proc")
    _set_file(tampered, lambda f: (setattr(f.reg, "name", "/proc/1/root/etc/shadow"), setattr(f.reg, "mnt_id", proc.mnt_id)))
    _refused(tampered, dump.spec, "files.img", "reg.name")


def test_a_file_kind_with_host_reach_is_refused(dump: Dump, tampered: Path) -> None:
    def ext(e: list[Any]) -> None:
        f = fdinfo_pb2.file_entry(type=fdinfo_pb2.EXT, id=998)
        f.ext.id = 998
        f.ext.fown.uid = f.ext.fown.euid = f.ext.fown.signum = f.ext.fown.pid_type = f.ext.fown.pid = 0
        e.append(f)

    _edit(tampered, "files.img", fdinfo_pb2.file_entry, ext)
    _refused(tampered, dump.spec, "files.img", "type")


# ---- tmpfs archives ------------------------------------------------------------------------


def _rewrite_archive(d: Path, member: tarfile.TarInfo) -> str:
    name = _dev_archive(d)
    with tarfile.open(d / name, "r:gz") as old:
        members = [(m, old.extractfile(m).read() if m.isreg() else None) for m in old.getmembers()]  # type: ignore[union-attr]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as new:
        for m, data in [*members, (member, b"x" if member.isreg() else None)]:
            new.addfile(m, io.BytesIO(data) if data is not None else None)
    (d / name).unlink()
    (d / name).write_bytes(buf.getvalue())
    return name


@pytest.mark.parametrize("member", ["../../x", "/etc/cron.d/x", "./a/../../x"])
def test_an_archive_member_escaping_is_refused(dump: Dump, tampered: Path, member: str) -> None:
    ti = tarfile.TarInfo(member)
    ti.size = 1
    name = _rewrite_archive(tampered, ti)
    _refused(tampered, dump.spec, name, "member")


def test_an_archive_device_node_not_in_the_spec_is_refused(dump: Dump, tampered: Path) -> None:
    ti = tarfile.TarInfo("./vda")
    ti.type, ti.devmajor, ti.devminor = tarfile.BLKTYPE, 254, 0
    name = _rewrite_archive(tampered, ti)
    _refused(tampered, dump.spec, name, "member './vda'")


def test_an_archive_member_through_its_own_symlink_is_refused(dump: Dump, tampered: Path) -> None:
    ti = tarfile.TarInfo("./fd/x")  # ./fd is the archive's symlink to /proc/self/fd
    ti.size = 1
    name = _rewrite_archive(tampered, ti)
    _refused(tampered, dump.spec, name, "member './fd/x'")


# ---- sizes, counts, kinds --------------------------------------------------------------------


def test_more_threads_than_the_pids_limit_are_refused(dump: Dump, tampered: Path) -> None:
    _edit(tampered, "pstree.img", pstree_pb2.pstree_entry, lambda e: e[0].threads.extend(range(1000, 1100)))
    _refused(tampered, dump.spec, "pstree.img", "threads")  # the spec's pids limit is 64


def test_more_tasks_than_the_pids_limit_are_refused(dump: Dump, tampered: Path) -> None:
    def fork(e: list[Any]) -> None:
        e.extend(pstree_pb2.pstree_entry(pid=p, ppid=1, pgid=1, sid=1, threads=[p]) for p in range(2000, 2100))

    _edit(tampered, "pstree.img", pstree_pb2.pstree_entry, fork)
    _refused(tampered, dump.spec, "pstree.img", "entries")


def test_pages_beyond_the_memory_limit_are_refused(dump: Dump, tampered: Path) -> None:
    spec = copy.deepcopy(dump.spec)
    spec["linux"]["resources"]["memory"]["limit"] = 16 << 10
    with pytest.raises(ImageRefused, match=r"CRIU image pages-\d+\.img: size"):
        validate_images(tampered, expectation_from_spec(spec))


def test_an_entry_overrunning_its_image_is_refused(dump: Dump, tampered: Path) -> None:
    (tampered / "pstree.img").unlink()
    (tampered / "pstree.img").write_bytes(struct.pack("<III", 0x54564319, 0x50273030, 0x7FFFFFFF))
    _refused(tampered, dump.spec, "pstree.img", "entry size")


def test_an_oversized_image_is_refused(dump: Dump, tampered: Path) -> None:
    (tampered / "files.img").unlink()
    with open(tampered / "files.img", "wb") as f:
        f.truncate(criu_images.Limits().image_bytes + 1)
    _refused(tampered, dump.spec, "files.img", "size")


def test_a_damaged_image_is_refused(dump: Dump, tampered: Path) -> None:
    """What the fault matrix's damage-image does: the restore is refused before CRIU runs."""
    from phaul.testing.faults import damage_images

    for f in [tampered / "pstree.img", *tampered.glob("pages-*.img")]:  # it writes in place: no hard links
        data = f.read_bytes()
        f.unlink()
        f.write_bytes(data)
    damage_images(tampered)
    _refused(tampered, dump.spec, "pstree.img", "magic")


@pytest.mark.parametrize("name", ["netns-10.img", "userns-11.img", "ext-files.img", "fsnotify.img", "x"])
def test_an_image_kind_outside_the_list_is_refused(dump: Dump, tampered: Path, name: str) -> None:
    (tampered / name).write_bytes(b"\0" * 16)
    _refused(tampered, dump.spec, name, "file name")


def test_a_symlinked_image_is_refused(dump: Dump, tampered: Path) -> None:
    (tampered / "fs-1.img").unlink()
    (tampered / "fs-1.img").symlink_to("/etc/passwd")
    _refused(tampered, dump.spec, "fs-1.img", "file")


def test_a_uts_namespace_image_of_another_namespace_is_refused(dump: Dump, tampered: Path) -> None:
    [uts] = [n for n in os.listdir(tampered) if n.startswith("utsns-")]
    host = f"utsns-{_root_ids(tampered).uts_ns_id}.img"
    (tampered / uts).rename(tampered / host)
    _refused(tampered, dump.spec, host, "file name")


def _add_task(d: Path, pid: int, zombie: bool, threads: tuple[int, ...] | None = None) -> None:
    tids = list(threads) if threads is not None else [pid]
    _edit(d, "pstree.img", pstree_pb2.pstree_entry,
          lambda e: e.append(pstree_pb2.pstree_entry(pid=pid, ppid=1, pgid=1, sid=1, threads=tids)))  # fmt: skip
    head, [core] = _entries(d / "core-1.img", core_pb2.core_entry)
    if zombie:  # as CRIU's dump_one_zombie writes it: tc only
        core.ClearField("thread_core")
        core.ClearField("thread_info")
        core.tc.task_state = 2
    _write(d / f"core-{pid}.img", head, [core])


def test_a_zombie_without_ids_is_accepted_a_live_task_is_refused(dump: Dump, tampered: Path) -> None:
    _add_task(tampered, 3000, zombie=True)
    assert validate_images(tampered, expectation_from_spec(dump.spec)).tasks == 3
    _add_task(tampered, 3001, zombie=False)  # alive, no ids-3001.img: CRIU would give it the root's namespaces
    _refused(tampered, dump.spec, "ids-3001.img", "file")


def test_zombies_as_criu_lists_them_are_accepted(dump: Dump, tampered: Path) -> None:
    """CRIU collects no threads of a dead task: its pstree entry lists one thread id of no
    meaning (0, or left-over memory: 4272418512 was seen)."""
    _add_task(tampered, 3000, zombie=True, threads=(0,))
    _add_task(tampered, 3002, zombie=True, threads=(0,))
    _add_task(tampered, 3004, zombie=True, threads=(4272418512,))
    assert validate_images(tampered, expectation_from_spec(dump.spec)).tasks == 5
    _add_task(tampered, 3003, zombie=False, threads=(0,))  # alive (its core has credentials), not its own thread
    _refused(tampered, dump.spec, "pstree.img", "threads")


def test_threads_sharing_the_leaders_synced_filter_are_accepted(dump: Dump, tampered: Path) -> None:
    """CRIU writes no filter for the other threads when the leader's is restored with TSYNC
    (the kernel installs it on every thread); without TSYNC such a thread would run unfiltered."""
    _add_thread(tampered, 77, lambda c: None)
    _edit(tampered, "core-77.img", core_pb2.core_entry, lambda e: e[0].thread_core.ClearField("seccomp_mode"))

    def tsync(on: bool) -> Callable[[list[Any]], None]:
        def change(e: list[Any]) -> None:
            for f in e[0].seccomp_filters:
                f.flags = 1 if on else 0
        return change

    _edit(tampered, "seccomp.img", seccomp_pb2.seccomp_entry, tsync(True))
    assert validate_images(tampered, expectation_from_spec(dump.spec)).threads == 3
    _edit(tampered, "seccomp.img", seccomp_pb2.seccomp_entry, tsync(False))
    _refused(tampered, dump.spec, "core-77.img", "thread_core.seccomp_mode")


@pytest.mark.parametrize("target", ["/etc", "../../incoming/other/recv/images", "../rounds/../../x"])
def test_a_parent_link_outside_the_rounds_is_refused(dump: Dump, tampered: Path, target: str) -> None:
    (tampered / "parent").symlink_to(target)
    _refused(tampered, dump.spec, "parent", "link")


def test_a_parent_link_to_a_round_is_accepted(dump: Dump, tampered: Path) -> None:
    (tampered.parent / "rounds" / "2").mkdir(parents=True)
    (tampered / "parent").symlink_to("../rounds/2")
    validate_images(tampered, expectation_from_spec(dump.spec))


def test_a_time_namespace_of_its_own_is_accepted(dump: Dump, tampered: Path) -> None:
    """What a copy restored once looks like: CRIU restores every tree into a new time namespace."""
    def own_time(e: list[Any]) -> None:
        e[0].time_ns_id = 4343

    _edit(tampered, "ids-1.img", core_pb2.task_kobj_ids_entry, own_time)
    _edit(tampered, f"ids-{dump.child}.img", core_pb2.task_kobj_ids_entry, own_time)
    validate_images(tampered, expectation_from_spec(dump.spec))
    _edit(tampered, f"ids-{dump.child}.img", core_pb2.task_kobj_ids_entry, lambda e: setattr(e[0], "time_ns_id", 4344))
    _refused(tampered, dump.spec, f"ids-{dump.child}.img", "time_ns_id")


# ---- terminals: ptys of the container's own devpts ------------------------------------------


@pytest.fixture(scope="module")
def pty_dump() -> Iterator[Dump]:
    """A real dump of a container whose process holds a pty pair (workloads/objects.c)."""
    state = Path(tempfile.mkdtemp(prefix="phaul-imgcheck-", dir="/tmp"))
    host = f"t{uuid.uuid4().hex[:10]}"
    kind = RuncContainers(state, host)
    try:
        kind.create(ContainerConfig(id="ptys", args=["/bin/objects", "run", "pty"]))
        kind.start("ptys")
        time.sleep(0.5)
        kind.checkpoint("ptys", state / "images", state / "work", leave_running=True)
        yield Dump(state / "images", read_spec(kind.bundle_dir("ptys") / "config.json"), 0)
    finally:
        try:
            kind.destroy("ptys", timeout=1)
        except PhaulError:
            pass
        remove_host_cgroups(host)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def pty_images(pty_dump: Dump, tmp_path: Path) -> Path:
    return _linked_copy(pty_dump.images, tmp_path / "images")


def _tty_files(d: Path) -> list[Any]:
    return [f for f in _entries(d / "files.img", fdinfo_pb2.file_entry)[1] if f.type == fdinfo_pb2.fd_types.Value("TTY")]


def test_a_pty_of_the_container_is_accepted(pty_dump: Dump) -> None:
    assert len(_tty_files(pty_dump.images)) == 2  # master and slave
    validate_images(pty_dump.images, expectation_from_spec(pty_dump.spec))


def test_a_terminal_other_than_a_pty_is_refused(pty_dump: Dump, pty_images: Path) -> None:
    _edit(pty_images, "tty-info.img", tty_pb2.tty_info_entry, lambda e: setattr(e[0], "type", tty_pb2.CONSOLE))
    _refused(pty_images, pty_dump.spec, "tty-info.img", "type")


def test_a_pty_opened_off_the_devpts_is_refused(pty_dump: Dump, pty_images: Path) -> None:
    files = _entries(pty_images / "files.img", fdinfo_pb2.file_entry)[1]
    [exe] = [f.id for f in files if f.type == fdinfo_pb2.fd_types.Value("REG") and f.reg.name == "/bin/objects"]

    def retarget(e: list[Any]) -> None:
        for f in e:
            if f.type == fdinfo_pb2.fd_types.Value("TTY"):
                f.tty.regf_id = exe

    _edit(pty_images, "files.img", fdinfo_pb2.file_entry, retarget)
    _refused(pty_images, pty_dump.spec, "files.img", "tty.regf_id")


def test_tty_data_of_an_unknown_terminal_is_refused(pty_dump: Dump, pty_images: Path) -> None:
    _edit(pty_images, "tty-data.img", tty_pb2.tty_data_entry, lambda e: setattr(e[0], "tty_id", 999))
    _refused(pty_images, pty_dump.spec, "tty-data.img", "tty_id")


# ---- files deleted while open: ghost files -----------------------------------------------

# Four deleted-but-open files: a small one (its data inline), a 64 KiB mapped one (objects.c,
# its data in chunks; open twice: by fd and by its mapping), one on the /dev/shm tmpfs, and the
# shell's working directory (a directory ghost).
GHOSTS = (
    "exec 3<>/tmp/small; echo hello >&3; rm /tmp/small; exec 4<>/dev/shm/x; echo shm >&4; rm /dev/shm/x; "
    "mkdir /tmp/gone; cd /tmp/gone; rmdir /tmp/gone; exec /bin/objects run deleted-file"
)


@pytest.fixture(scope="module")
def ghost_dump() -> Iterator[Dump]:
    with dumped(ContainerConfig(id="ghosts", args=["/bin/sh", "-c", GHOSTS]), settle=0.7) as (images, bundle):
        yield Dump(images, read_spec(bundle / "config.json"), 0, bundle)


@pytest.fixture
def ghost_images(ghost_dump: Dump, tmp_path: Path) -> Path:
    return _linked_copy(ghost_dump.images, tmp_path / "images")


def _ghost_expect(dump: Dump, **change: Any) -> criu_images.ImageExpectation:
    return dataclasses.replace(expectation_from_spec(dump.spec, bundle=dump.bundle), **change)


def _ghost_refused(d: Path, dump: Dump, image: str, fld: str, **change: Any) -> str:
    with pytest.raises(ImageRefused) as e:
        validate_images(d, _ghost_expect(dump, **change))
    assert e.value.image == image and fld in e.value.field, str(e.value)
    return str(e.value)


def _ghost_of(d: Path, path: str) -> str:
    """The ghost-file image of the deleted file (or directory) at `path`."""
    files = _entries(d / "files.img", fdinfo_pb2.file_entry)[1]
    ids = {f.id for f in files if f.type == fdinfo_pb2.REG and f.reg.name == path}
    remaps = _entries(d / "remap-fpath.img", remap_file_path_pb2.remap_file_path_entry)[1]
    [gid] = {r.remap_id for r in remaps if r.orig_id in ids}
    return f"ghost-file-{gid:x}.img"


def _edit_ghost(d: Path, name: str, change: Callable[[Any], None], rest: Callable[[bytes], bytes] = lambda b: b) -> None:
    """Edit a ghost-file image's entry (and, with `rest`, the data after it)."""
    b = (d / name).read_bytes()
    (size,) = struct.unpack_from("<I", b, 8)
    g = ghost_file_pb2.ghost_file_entry()
    g.ParseFromString(b[12 : 12 + size])
    change(g)
    s = g.SerializeToString()
    (d / name).unlink()
    (d / name).write_bytes(b[:8] + struct.pack("<I", len(s)) + s + rest(b[12 + size :]))


def _set_client(d: Path, path: str, change: Callable[[Any], None]) -> None:
    def edit(e: list[Any]) -> None:
        for f in e:
            if f.type == fdinfo_pb2.REG and f.reg.name == path:
                change(f.reg)

    _edit(d, "files.img", fdinfo_pb2.file_entry, edit)


def _mnt_id(d: Path, mountpoint: str) -> int:
    return next(m.mnt_id for m in _entries(d / _mount_image(d), mnt_pb2.mnt_entry)[1] if m.mountpoint == mountpoint)


def test_ghost_files_of_a_real_dump_are_accepted(ghost_dump: Dump) -> None:
    d = ghost_dump.images
    kinds = {}
    for path in ("/tmp/small", "/tmp/obj-deleted", "/dev/shm/x", "/tmp/gone"):
        b = (d / _ghost_of(d, path)).read_bytes()
        g = ghost_file_pb2.ghost_file_entry()
        g.ParseFromString(b[12 : 12 + struct.unpack_from("<I", b, 8)[0]])
        kinds[path] = ("dir" if stat.S_ISDIR(g.mode) else "file", g.chunks)
    assert kinds == {"/tmp/small": ("file", False), "/tmp/obj-deleted": ("file", True),
                     "/dev/shm/x": ("file", False), "/tmp/gone": ("dir", False)}  # fmt: skip
    report = validate_images(d, _ghost_expect(ghost_dump))
    assert report.ms < 10, report


def test_ghost_files_need_the_root_file_system(ghost_dump: Dump) -> None:
    """Without the bundle's rootfs the ways to a ghost on it cannot be checked."""
    with pytest.raises(ImageRefused, match="root file system, which this check was not given"):
        validate_images(ghost_dump.images, expectation_from_spec(ghost_dump.spec))


@pytest.mark.parametrize("kind", [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFLNK])
def test_a_ghost_other_than_a_file_or_directory_is_refused(ghost_dump: Dump, ghost_images: Path, kind: int) -> None:
    name = _ghost_of(ghost_images, "/tmp/small")

    def device(g: Any) -> None:
        g.mode = kind | 0o666
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            g.rdev = os.makedev(8, 0)  # /dev/sda
        if kind == stat.S_IFLNK:
            g.symlnk_target = "/etc/shadow"

    _edit_ghost(ghost_images, name, device)
    _ghost_refused(ghost_images, ghost_dump, name, "mode")


@pytest.mark.parametrize("bit", [stat.S_ISUID, stat.S_ISGID])
def test_a_set_id_ghost_is_refused(ghost_dump: Dump, ghost_images: Path, bit: int) -> None:
    name = _ghost_of(ghost_images, "/tmp/obj-deleted")
    _edit_ghost(ghost_images, name, lambda g: setattr(g, "mode", g.mode | bit | 0o755))
    _ghost_refused(ghost_images, ghost_dump, name, "mode")


@pytest.mark.parametrize("path", ["/tmp/../etc/cron.d/x", "/../etc/x", "tmp/obj-deleted"])
def test_a_ghost_by_a_path_with_dots_is_refused(ghost_dump: Dump, ghost_images: Path, path: str) -> None:
    _set_client(ghost_images, "/tmp/obj-deleted", lambda r: setattr(r, "name", path))
    _ghost_refused(ghost_images, ghost_dump, "files.img", "reg.name")


def test_a_ghost_through_a_symlink_of_the_root_is_refused(ghost_dump: Dump, ghost_images: Path, tmp_path: Path) -> None:
    """CRIU makes the ghost from its service mount namespace: an absolute link would be the host's."""
    root = tmp_path / "rootfs"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / "gone").symlink_to("/etc")
    name = _ghost_of(ghost_images, "/tmp/gone")
    text = _ghost_refused(ghost_images, ghost_dump, name, "client path", rootfs=root)
    assert "'tmp/gone', a symbolic link" in text
    (root / "tmp" / "gone").unlink()
    (root / "tmp").rename(root / "real")
    (root / "tmp").symlink_to("/etc")
    text = _ghost_refused(ghost_images, ghost_dump, _ghost_of(ghost_images, "/tmp/obj-deleted"), "client path", rootfs=root)
    assert "'tmp', a symbolic link" in text


def test_a_ghost_through_a_symlink_of_a_tmpfs_is_refused(ghost_dump: Dump, ghost_images: Path) -> None:
    """/dev/fd is a symbolic link of the /dev archive (to /proc/self/fd)."""
    dev = _mnt_id(ghost_images, "/dev")
    _set_client(ghost_images, "/dev/shm/x", lambda r: (setattr(r, "name", "/dev/fd/x"), setattr(r, "mnt_id", dev)))
    text = _ghost_refused(ghost_images, ghost_dump, _ghost_of(ghost_images, "/dev/fd/x"), "client path")
    assert "'fd' of '/dev', a link" in text


def test_a_ghost_on_a_mount_outside_the_container_is_refused(ghost_dump: Dump, ghost_images: Path) -> None:
    _set_client(ghost_images, "/tmp/obj-deleted", lambda r: setattr(r, "mnt_id", 4242))
    _ghost_refused(ghost_images, ghost_dump, "files.img", "reg.mnt_id")


@pytest.mark.parametrize(("path", "mountpoint", "why"), [
    ("/proc/x", "/proc", "only on the root file system or a tmpfs"),
    ("/proc/acpi/x", "/proc/acpi", "read-only mount"),
    ("/dev/shm/x", "/", "lies under mount '/dev/shm'"),
])  # fmt: skip
def test_a_ghost_on_another_mount_of_the_container_is_refused(
    ghost_dump: Dump, ghost_images: Path, path: str, mountpoint: str, why: str
) -> None:
    mnt = _mnt_id(ghost_images, mountpoint)
    _set_client(ghost_images, "/dev/shm/x", lambda r: (setattr(r, "name", path), setattr(r, "mnt_id", mnt)))
    text = _ghost_refused(ghost_images, ghost_dump, _ghost_of(ghost_images, path), "client path")
    assert why in text


def test_clients_of_one_ghost_on_two_mounts_are_refused(ghost_dump: Dump, ghost_images: Path) -> None:
    gone = _ghost_of(ghost_images, "/tmp/obj-deleted")
    files = _entries(ghost_images / "files.img", fdinfo_pb2.file_entry)[1]
    [shm] = [f.id for f in files if f.type == fdinfo_pb2.REG and f.reg.name == "/dev/shm/x"]

    def join(e: list[Any]) -> None:
        for r in e:
            if r.orig_id == shm:
                r.remap_id = int(gone[len("ghost-file-") : -4], 16)

    _edit(ghost_images, "remap-fpath.img", remap_file_path_pb2.remap_file_path_entry, join)
    orphan = [n for n in os.listdir(ghost_images) if n.startswith("ghost-file-") and n not in
              {_ghost_of(ghost_images, p) for p in ("/tmp/small", "/tmp/obj-deleted", "/tmp/gone")}]  # fmt: skip
    for n in orphan:
        (ghost_images / n).unlink()
    _ghost_refused(ghost_images, ghost_dump, gone, "clients' reg.mnt_id")


@pytest.mark.parametrize("kind", ["LINKED", "PROCFS", None])
def test_a_remap_other_than_a_ghost_is_refused(ghost_dump: Dump, ghost_images: Path, kind: str | None) -> None:
    def retype(e: list[Any]) -> None:
        if kind is None:
            e[0].ClearField("remap_type")  # CRIU would read the kind from remap_id's top bit
        else:
            e[0].remap_type = remap_file_path_pb2.remap_type.Value(kind)

    _edit(ghost_images, "remap-fpath.img", remap_file_path_pb2.remap_file_path_entry, retype)
    text = _ghost_refused(ghost_images, ghost_dump, "remap-fpath.img", "remap_type")
    assert (kind or "missing") in text


def test_a_ghost_image_nothing_remaps_or_a_remap_without_one_is_refused(ghost_dump: Dump, ghost_images: Path) -> None:
    shutil.copy(ghost_images / _ghost_of(ghost_images, "/tmp/small"), ghost_images / "ghost-file-63.img")
    _ghost_refused(ghost_images, ghost_dump, "ghost-file-63.img", "file name")
    (ghost_images / "ghost-file-63.img").unlink()
    (ghost_images / _ghost_of(ghost_images, "/tmp/small")).unlink()
    _ghost_refused(ghost_images, ghost_dump, "remap-fpath.img", "remap_id")


def test_a_ghost_beyond_the_size_limit_is_refused(ghost_dump: Dump, ghost_images: Path) -> None:
    small = dataclasses.replace(criu_images.Limits(), ghost_bytes=32 << 10)
    name = _ghost_of(ghost_images, "/tmp/obj-deleted")  # 64 KiB
    _ghost_refused(ghost_images, ghost_dump, name, "size", limits=small)
    _edit_ghost(ghost_images, name, lambda g: setattr(g, "size", 1 << 40))  # sparse, and huge
    _ghost_refused(ghost_images, ghost_dump, name, "size")


def test_ghost_data_not_as_its_entry_says_are_refused(ghost_dump: Dump, ghost_images: Path) -> None:
    name = _ghost_of(ghost_images, "/tmp/obj-deleted")
    _edit_ghost(ghost_images, name, lambda g: None, rest=lambda b: b[:-100])  # the last chunk cut short
    _ghost_refused(ghost_images, ghost_dump, name, "chunk at offset")
    shutil.copy(ghost_dump.images / name, ghost_images / name)
    small = _ghost_of(ghost_images, "/tmp/small")
    _edit_ghost(ghost_images, small, lambda g: None, rest=lambda b: b + b"more")  # 10 bytes for a 6-byte file
    text = _ghost_refused(ghost_images, ghost_dump, small, "size")
    assert "'/tmp/small' had 6" in text
