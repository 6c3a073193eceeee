"""Real runc containers (no mocks): lifecycle, errors, and a CRIU round trip on one host."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlib import remove_host_cgroups
from conftest import COUNT_STEP

from phaul.containers import ContainerConfig, workloads
from phaul.containers.runc import DEFAULT_ARGS, RuncContainers, _cgroup_mounts
from phaul.errors import Conflict, InvalidInput, NotFound, PhaulError
from phaul.linux import freezer, procfs

COUNTER = ["sh", "-c", f"i=0; while :; do {COUNT_STEP}; sleep 0.1; done"]


@pytest.fixture
def kind() -> Iterator[RuncContainers]:
    """A RuncContainers on a fresh state dir and host name; everything of it is removed afterwards."""
    state_dir = Path(tempfile.mkdtemp(prefix="phaul-test-", dir="/tmp"))
    host = f"t{uuid.uuid4().hex[:10]}"
    k = RuncContainers(state_dir, host)
    try:
        yield k
    finally:
        for info in k.list():
            try:
                k.destroy(info.id, timeout=1)
            except PhaulError:
                pass
        runc = [str(k.runc_path), "--root", str(k.runc_root)]
        listed = subprocess.run(runc + ["list", "-q"], check=False, capture_output=True, text=True).stdout.split()
        for ct_id in listed:
            subprocess.run(runc + ["delete", "--force", ct_id], check=False, capture_output=True)
        remove_host_cgroups(host, kill=True)
        shutil.rmtree(state_dir, ignore_errors=True)


def _wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _counter(k: RuncContainers, ct_id: str) -> int:
    return int((k.bundle_dir(ct_id) / "rootfs" / "counter").read_text())


def test_create_start_exec(kind: RuncContainers) -> None:
    info = kind.create(ContainerConfig(id="web1"))
    assert info.state == "created" and info.pid is None
    d = kind.container_dir("web1")
    assert (d / "phaul.json").is_file() and (d / "criu.conf").is_file()
    rootfs_bin = d / "bundle" / "rootfs" / "bin"
    assert (rootfs_bin / "busybox").is_file() and (rootfs_bin / "sh").resolve() == rootfs_bin / "busybox"
    for name in workloads.find().present():  # the project's static programs, when built
        assert (rootfs_bin / name).is_file() and not (rootfs_bin / name).is_symlink()
    spec = json.loads((d / "bundle" / "config.json").read_text())
    assert spec["process"]["args"] == DEFAULT_ARGS
    assert spec["linux"]["cgroupsPath"] == f"/phaul-{kind.host}/web1"
    assert spec["annotations"]["org.criu.config"] == str(d / "criu.conf")
    assert {n["type"] for n in spec["linux"]["namespaces"]} == {"pid", "network", "ipc", "uts", "mount"}

    info = kind.start("web1")
    assert info.state == "running" and info.pid and procfs.alive(info.pid)
    res = kind.exec("web1", ["echo", "hello"])
    assert (res.returncode, res.stdout, res.stderr) == (0, b"hello\n", b"")
    assert kind.exec("web1", ["hostname"]).stdout == b"web1\n"
    with pytest.raises(Conflict, match="already running"):
        kind.start("web1")


def test_exec_exit_code(kind: RuncContainers) -> None:
    kind.create(ContainerConfig(id="rc"))
    kind.start("rc")
    res = kind.exec("rc", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.returncode, res.stdout, res.stderr) == (3, b"out\n", b"err\n")


def test_list_info_limits(kind: RuncContainers) -> None:
    kind.create(ContainerConfig(id="a", memory=64 << 20, cpus=0.5, pids=100))
    kind.create(ContainerConfig(id="b"))
    kind.start("a")
    infos = {i.id: i for i in kind.list()}
    assert set(infos) == {"a", "b"}
    assert infos["b"].state == "created" and infos["b"].pid is None and infos["b"].memory_limit is None
    a = kind.info("a")
    assert a.state == "running" and a.pid and a.ip is None
    assert a.memory_limit == 64 << 20
    assert a.memory_used and 0 < a.memory_used < 64 << 20
    for m in _cgroup_mounts():  # the limits reached the cgroups
        cg = m / kind.cgroup_path("a").lstrip("/")
        if (cg / "cpu.cfs_quota_us").exists():
            assert (cg / "cpu.cfs_quota_us").read_text().strip() == "50000"
        if (cg / "pids.max").exists() and m.name == "pids":
            assert (cg / "pids.max").read_text().strip() == "100"


def test_stop_and_start_again(kind: RuncContainers) -> None:
    kind.create(ContainerConfig(id="s"))
    pid = kind.start("s").pid
    assert pid is not None
    t = time.monotonic()
    info = kind.stop("s")
    assert time.monotonic() - t < 3, "the default command must exit on SIGTERM"
    assert info.state == "created" and info.pid is None
    assert _wait_for(lambda: not procfs.alive(pid))
    with pytest.raises(Conflict, match="not running") as e:
        kind.exec("s", ["true"])
    assert "phaul ct start s" in e.value.hint
    info = kind.start("s", ["sh", "-c", "trap 'exit 0' TERM; echo second > /started; while :; do sleep 1 & wait; done"])
    assert info.state == "running" and info.pid != pid
    assert kind.exec("s", ["cat", "/started"]).stdout == b"second\n"
    assert kind.config("s").args[0] == "sh"


def test_stop_kills_after_timeout(kind: RuncContainers) -> None:
    kind.create(ContainerConfig(id="stubborn", args=["sleep", "1000"]))  # PID 1 ignores SIGTERM
    pid = kind.start("stubborn").pid
    assert pid is not None
    t = time.monotonic()
    assert kind.stop("stubborn", timeout=0.5).state == "created"
    assert 0.5 <= time.monotonic() - t < 5
    assert _wait_for(lambda: not procfs.alive(pid))


def test_kill_ends_even_a_frozen_container(kind: RuncContainers) -> None:
    """What a commit does when the CRIU holding the frozen source copy has died."""
    kind.create(ContainerConfig(id="frosty", args=["sh", "-c", "sleep 1000 & wait"]))
    pid = kind.start("frosty").pid
    assert pid is not None
    state = kind.freezer_state("frosty")
    if state is not None:  # cgroup v1: freeze it as the commit gate does
        freezer.freeze(state)
    kind.kill("frosty")
    assert _wait_for(lambda: not procfs.alive(pid))
    assert not freezer.is_frozen(state)


def test_destroy_leaves_nothing(kind: RuncContainers) -> None:
    kind.create(ContainerConfig(id="gone", memory=32 << 20))
    pid = kind.start("gone").pid
    assert pid is not None
    assert kind.cgroup_dirs("gone")
    kind.destroy("gone")
    assert not kind.container_dir("gone").exists()
    assert kind.cgroup_dirs("gone") == []
    assert not (kind.runc_root / "gone").exists()
    assert kind._runc_state("gone") is None
    assert _wait_for(lambda: not procfs.alive(pid))
    assert kind.list() == []
    with pytest.raises(NotFound):
        kind.info("gone")


def test_errors(kind: RuncContainers) -> None:
    for bad in ["Bad", "-x", "a/b", "..", "", "x" * 64]:
        with pytest.raises(InvalidInput):
            kind.create(ContainerConfig(id=bad))
    with pytest.raises(InvalidInput, match="template"):
        kind.create(ContainerConfig(id="t", template="ubuntu"))
    with pytest.raises(InvalidInput):
        kind.create(ContainerConfig(id="t", ip="10.0.0.300/24"))
    with pytest.raises(InvalidInput, match="needs an address"):
        kind.create(ContainerConfig(id="t", gateway="10.0.0.1"))
    with pytest.raises(InvalidInput, match="outside"):
        kind.create(ContainerConfig(id="t", ip="10.0.0.30/24", gateway="10.0.1.1"))
    with pytest.raises(Conflict, match="no bridge") as e:  # addresses live on a bridge (tests/test_network.py)
        kind.create(ContainerConfig(id="t", ip="10.0.0.30/24"))
    assert "--bridge" in e.value.hint
    assert not kind.containers_dir.exists() or list(kind.containers_dir.iterdir()) == []  # failed creates leave nothing

    kind.create(ContainerConfig(id="dup"))
    with pytest.raises(Conflict) as e:
        kind.create(ContainerConfig(id="dup"))
    assert e.value.exit_code == 2 and e.value.hint

    for call in (
        lambda: kind.info("nope"),
        lambda: kind.start("nope"),
        lambda: kind.exec("nope", ["true"]),
        lambda: kind.stop("nope"),
        lambda: kind.destroy("nope"),
        lambda: kind.config("nope"),
    ):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(Conflict, match="not running"):
        kind.exec("dup", ["true"])  # created, never started


def test_checkpoint_restore_round_trip(kind: RuncContainers, tmp_path: Path) -> None:
    if kind.criu_path is None:
        pytest.fail("criu not installed: run `make setup`")
    kind.create(ContainerConfig(id="cnt", memory=64 << 20, args=COUNTER))
    kind.start("cnt")
    assert _wait_for(lambda: _counter(kind, "cnt") >= 15)

    images, work = tmp_path / "img", tmp_path / "work"
    images.mkdir()
    work.mkdir()
    cmd = kind.checkpoint_cmd("cnt", images, work)
    assert "--tcp-established" in cmd and cmd[-1] == "cnt"
    proc = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode:
        raise kind.criu_error("cnt", "checkpoint", work, proc.returncode, proc.stderr)
    assert (images / "inventory.img").is_file()
    assert kind.info("cnt").state == "created"  # runc killed and forgot it
    before = _counter(kind, "cnt")
    time.sleep(0.3)
    assert _counter(kind, "cnt") == before, "the checkpointed container must not run"

    rwork = tmp_path / "rwork"
    rwork.mkdir()
    cmd = kind.restore_cmd("cnt", images, rwork)
    rc = subprocess.run(
        cmd, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ).returncode
    if rc:
        raise kind.criu_error("cnt", "restore", rwork, rc)
    info = kind.info("cnt")
    assert info.state == "running" and info.memory_limit == 64 << 20
    assert _wait_for(lambda: _counter(kind, "cnt") >= before + 3)
    after = _counter(kind, "cnt")
    assert after > before >= 15, f"counter restarted: {before} -> {after}"
    # CRIU restored the default seccomp filter with the task (mode 2: filter)
    assert _seccomp_mode(info.pid) == 2
    # The restored container is an ordinary one again: exec, stop, destroy.
    assert kind.exec("cnt", ["cat", "/counter"]).returncode == 0
    kind.destroy("cnt", timeout=0.5)
    assert kind.cgroup_dirs("cnt") == []


def _objects(kind: RuncContainers, ct: str) -> dict[str, tuple[str, int]]:
    """workloads/objects.c's status file: object -> (ok|FAIL, checks passed)."""
    try:
        lines = (kind.bundle_dir(ct) / "rootfs" / "objects.status").read_text().splitlines()[1:]
    except FileNotFoundError:
        return {}
    return {f[0]: (f[1], int(f[2])) for f in (line.split(" ", 3) for line in lines)}


def test_locks_and_loopback_sockets_survive_checkpoint_and_restore(kind: RuncContainers, tmp_path: Path) -> None:
    """flock/POSIX/OFD locks (CRIU needs --file-locks on dump and restore) and TCP over 127.0.0.1
    and ::1 (the restore brings the new namespace's lo up first: phaul.linux.network)."""
    from phaul.linux import network

    objs = ["file-locks", "tcp4-loopback", "tcp6-loopback"]
    kind.create(ContainerConfig(id="locks", args=["/bin/objects", "run", "--interval-ms", "100", *objs]))
    kind.start("locks")
    assert _wait_for(lambda: len(_objects(kind, "locks")) == 3 and min(n for _s, n in _objects(kind, "locks").values()) >= 2)
    cmd = kind.checkpoint_cmd("locks", tmp_path / "img", tmp_path / "work")
    assert "--file-locks" in cmd and "--file-locks" in kind.restore_cmd("locks", tmp_path / "img", tmp_path / "rwork")
    kind.checkpoint("locks", tmp_path / "img", tmp_path / "work")
    before = _objects(kind, "locks")
    kind.criu_config_path("locks").write_text(network.restore_criu_options(None, tmp_path))
    kind.restore("locks", tmp_path / "img", tmp_path / "rwork")
    assert _wait_for(lambda: all(_objects(kind, "locks")[o][1] >= before[o][1] + 3 for o in objs)), _objects(kind, "locks")
    assert {o: s for o, (s, _n) in _objects(kind, "locks").items()} == dict.fromkeys(objs, "ok"), _objects(kind, "locks")
    for path, how in (("/tmp/obj-flock", "flock"), ("/tmp/obj-posix", "posix"), ("/tmp/obj-ofd", "ofd")):
        r = kind.exec("locks", ["objects", "trylock", path, how])
        assert r.returncode == 0 and b"held by another" in r.stdout, (how, r)
    locks = kind.exec("locks", ["cat", "/proc/locks"]).stdout.decode()
    assert "FLOCK" in locks and "OFDLCK" in locks and " POSIX  ADVISORY  WRITE 1 " in locks, locks
    kind.destroy("locks", timeout=0.5)


def _seccomp_mode(pid: int | None) -> int:
    """The Seccomp: field of /proc/PID/status: 0 none, 2 a filter."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Seccomp:"))
    return int(line.split()[1])


def test_default_capabilities_and_seccomp_profile(kind: RuncContainers) -> None:
    """No CAP_NET_RAW or CAP_MKNOD unless asked for; the Docker/Podman seccomp profile unless unconfined."""
    kind.create(ContainerConfig(id="dflt"))
    kind.create(ContainerConfig(id="raw", cap_add=["net_raw", "CAP_MKNOD", "NET_RAW"]))
    kind.create(ContainerConfig(id="open", seccomp="unconfined"))
    specs = {c: json.loads((kind.bundle_dir(c) / "config.json").read_text()) for c in ("dflt", "raw", "open")}
    assert kind.config("raw").cap_add == ["CAP_MKNOD", "CAP_NET_RAW"]  # normalized, stored in phaul.json
    caps = specs["dflt"]["process"]["capabilities"]["bounding"]
    assert "CAP_NET_RAW" not in caps and "CAP_MKNOD" not in caps and "CAP_CHOWN" in caps
    assert {"CAP_NET_RAW", "CAP_MKNOD"} <= set(specs["raw"]["process"]["capabilities"]["effective"])
    seccomp = specs["dflt"]["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO" and seccomp["defaultErrnoRet"] == 38
    assert "SCMP_ARCH_X86_64" in seccomp["architectures"]  # this machine's (the lab VM is x86-64)
    assert "seccomp" not in specs["open"]["linux"]
    denied = {n for r in seccomp["syscalls"] if r["action"] == "SCMP_ACT_ERRNO" for n in r["names"]}
    assert {"setns", "kexec_load", "vmsplice"} <= denied  # setns: only with CAP_SYS_ADMIN, which it lacks
    for ct in ("dflt", "raw", "open"):
        kind.start(ct)

    def run(ct: str, *cmd: str) -> tuple[int, str]:
        r = kind.exec(ct, list(cmd))
        return r.returncode, (r.stdout + r.stderr).decode()

    assert _seccomp_mode(kind.info("dflt").pid) == 2 and _seccomp_mode(kind.info("open").pid) == 0
    # vmsplice(-1, ...): the profile answers EPERM; the kernel alone says EBADF
    assert run("dflt", "syscall-probe", "vmsplice") == (1, "vmsplice errno=1 (Operation not permitted)\n")
    assert run("open", "syscall-probe", "vmsplice") == (1, "vmsplice errno=9 (Bad file descriptor)\n")
    assert run("dflt", "syscall-probe", "personality")[1] == "personality errno=38 (Function not implemented)\n"
    assert run("open", "syscall-probe", "personality") == (0, "personality ok\n")
    # ping needs a raw socket
    rc, out = run("dflt", "ping", "-c1", "-W1", "127.0.0.1")
    assert rc != 0 and "permission denied" in out, out
    assert run("raw", "ping", "-c1", "-W1", "127.0.0.1")[0] == 0
    assert run("dflt", "mknod", "/tmp/null", "c", "1", "3")[0] != 0
    assert run("raw", "mknod", "/tmp/null", "c", "1", "3")[0] == 0  # made; the devices cgroup still denies opening it


def test_capabilities_and_seccomp_are_validated(kind: RuncContainers) -> None:
    for bad in (["SYS_ADMIN"], ["CAP_NET_ADMIN"], ["all"], [""]):
        with pytest.raises(InvalidInput, match="may not be added") as e:
            kind.create(ContainerConfig(id="bad", cap_add=bad))
        assert "MKNOD, NET_RAW, SYS_PTRACE" in str(e.value)
    with pytest.raises(InvalidInput, match="unknown seccomp mode"):
        kind.create(ContainerConfig(id="bad", seccomp="off"))
    assert kind.list() == []


def test_seccomp_profile_follows_capabilities() -> None:
    """Docker's includes/excludes: a rule needing CAP_SYS_PTRACE appears only with it; arch rules by arch."""
    from phaul.containers.seccomp import oci_seccomp

    def rules(caps: list[str], arch: str = "amd64") -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for r in oci_seccomp(caps, arch)["syscalls"]:
            for n in r["names"]:
                out.setdefault(n, set()).add(r["action"])
        return out

    plain, traced = rules(["CAP_CHOWN"]), rules(["CAP_CHOWN", "CAP_SYS_PTRACE"])
    assert plain["kcmp"] == {"SCMP_ACT_ERRNO"} and traced["kcmp"] == {"SCMP_ACT_ALLOW"}
    assert "arch_prctl" in plain and "arch_prctl" not in rules(["CAP_CHOWN"], "arm64")
    assert oci_seccomp([], "arm64")["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


def test_restore_held_stopped_then_resume(kind: RuncContainers, tmp_path: Path) -> None:
    """CRIU options through criu.conf reach CRIU: leave-stopped holds the restored copy until resume()."""
    if kind.criu_path is None:
        pytest.fail("criu not installed: run `make setup`")
    kind.create(ContainerConfig(id="held", args=COUNTER))
    kind.start("held")
    assert _wait_for(lambda: _counter(kind, "held") >= 3)
    kind.checkpoint("held", tmp_path / "img", tmp_path / "work")
    before = _counter(kind, "held")
    kind.criu_config_path("held").write_text("leave-stopped\n")
    try:
        info = kind.restore("held", tmp_path / "img", tmp_path / "rwork")
    finally:
        kind.criu_config_path("held").write_text("")
    assert info.state == "running" and info.pid
    assert Path(f"/proc/{info.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    time.sleep(0.3)
    assert _counter(kind, "held") == before, "a copy restored with leave-stopped must not run"
    kind.resume("held")
    assert _wait_for(lambda: _counter(kind, "held") >= before + 3)


def test_criu_error_names_the_cause(kind: RuncContainers, tmp_path: Path) -> None:
    if kind.criu_path is None:
        pytest.fail("criu not installed: run `make setup`")
    kind.create(ContainerConfig(id="idle"))  # never started: runc has nothing to checkpoint
    with pytest.raises(PhaulError, match="checkpoint of 'idle' failed"):
        kind.checkpoint("idle", tmp_path / "img", tmp_path / "work")


def test_adopt(kind: RuncContainers, tmp_path: Path) -> None:
    kind.create(ContainerConfig(id="mover"))
    other = RuncContainers(tmp_path / "hostb", f"{kind.host}b")
    other.containers_dir.mkdir(parents=True)
    shutil.copytree(kind.container_dir("mover") / "bundle" / "rootfs", other.bundle_dir("mover") / "rootfs", symlinks=True)
    other.adopt("mover", kind.config("mover"))
    spec = json.loads((other.bundle_dir("mover") / "config.json").read_text())
    assert spec["linux"]["cgroupsPath"] == f"/phaul-{kind.host}b/mover"
    assert spec["annotations"]["org.criu.config"] == str(other.container_dir("mover") / "criu.conf")
    assert other.info("mover").state == "created"


def cgroup_mount_roots(pid: int | None) -> set[str]:
    """The roots of the container's /sys/fs/cgroup/* mounts (cgroup v1 binds), from its mountinfo."""
    lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    return {f[3] for f in map(str.split, lines) if f[4].startswith("/sys/fs/cgroup/")}


def test_a_restored_container_sees_only_its_own_cgroups(kind: RuncContainers, tmp_path: Path) -> None:
    """runc 1.1 binds a restored cgroup v1 container's /sys/fs/cgroup/* from the cgroups runc runs in;
    restore runs it from the container's own, or the container would see the host's whole hierarchies."""
    kind.create(ContainerConfig(id="cgv", args=["/bin/sleep", "1000"]))
    before = cgroup_mount_roots(kind.start("cgv").pid)
    kind.checkpoint("cgv", tmp_path / "img", tmp_path / "work")
    after = cgroup_mount_roots(kind.restore("cgv", tmp_path / "img", tmp_path / "rwork").pid)
    own = kind.cgroup_path("cgv")
    assert before == after == ({own} if before else set()), (before, after)
    kind.destroy("cgv", timeout=0.5)


def test_a_periodic_timerfd_keeps_firing_after_restore(kind: RuncContainers, tmp_path: Path) -> None:
    """A 10 ms timerfd read every 100 ms has almost always expired unread when CRIU dumps it;
    CRIU 4.2.1 restored such a timer disarmed (patches/criu/0002 arms it one interval on)."""
    kind.create(ContainerConfig(id="tfd", args=["/bin/objects", "run", "--interval-ms", "100", "timerfd"]))
    kind.start("tfd")
    assert _wait_for(lambda: _objects(kind, "tfd").get("timerfd", ("", 0))[1] >= 3)
    kind.checkpoint("tfd", tmp_path / "img", tmp_path / "work")
    before = _objects(kind, "tfd")["timerfd"][1]
    kind.restore("tfd", tmp_path / "img", tmp_path / "rwork")
    assert _wait_for(lambda: _objects(kind, "tfd")["timerfd"][1] >= before + 5 or _objects(kind, "tfd")["timerfd"][0] != "ok")
    state, checks = _objects(kind, "tfd")["timerfd"]
    assert state == "ok" and checks >= before + 5, _objects(kind, "tfd")
    kind.destroy("tfd", timeout=0.5)


def test_cgroup_mounts_skip_a_restores_yard_and_bind_mounts(tmp_path: Path) -> None:
    """A CI run lost a migration: while beta's CRIU restored with its cgroup yard mounted
    (visible to every lab host), gamma made the next container's cgroups in that yard as it
    went away. One mount point per hierarchy, the first whole one."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "30 25 0:26 / /sys/fs/cgroup/blkio rw,relatime shared:9 - cgroup cgroup rw,blkio\n"
        "31 25 0:27 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate\n"
        "32 25 0:28 /phaul-x /mnt/bound rw,relatime - cgroup cgroup rw,pids\n"
        "40 99 0:26 / /var/lib/x/work/.criu.cgyard.ZN0Nfg/blkio rw,relatime - cgroup cgroup rw,blkio\n"
        "41 25 0:29 / /sys/fs/cgroup/name\\040with\\040space rw - cgroup cgroup rw,name=systemd\n"
    )
    assert _cgroup_mounts(info) == [
        Path("/sys/fs/cgroup/blkio"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/name with space"),
    ]
    assert _cgroup_mounts(tmp_path / "missing") == []
