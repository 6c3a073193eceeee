"""Real runc containers (no mocks): lifecycle, errors, and a CRIU round trip on one host."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import COUNT_STEP

from phaul.linux import freezer
from phaul.linux import procfs
from phaul.containers import ContainerConfig
from phaul.containers.runc import DEFAULT_ARGS, RuncContainers, _cgroup_mounts
from phaul.containers.template import WORKLOAD_DIR, WORKLOADS
from phaul.errors import Conflict, InvalidInput, NotFound, PhaulError

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
        for mount in _cgroup_mounts():
            host_cg = mount / f"phaul-{host}"
            if host_cg.is_dir():
                for procs in host_cg.rglob("cgroup.procs"):
                    for pid in procs.read_text().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                for d, _, _ in sorted(os.walk(host_cg), key=lambda w: -len(w[0])):
                    try:
                        os.rmdir(d)
                    except OSError:
                        pass
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
    for name in WORKLOADS:  # the project's static programs, when built
        if (WORKLOAD_DIR / name).is_file():
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
    assert list(kind.containers_dir.iterdir()) == []  # failed creates leave nothing behind

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
    # The restored container is an ordinary one again: exec, stop, destroy.
    assert kind.exec("cnt", ["cat", "/counter"]).returncode == 0
    kind.destroy("cnt", timeout=0.5)
    assert kind.cgroup_dirs("cnt") == []


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


def test_rewrite_for_host(kind: RuncContainers, tmp_path: Path) -> None:
    kind.create(ContainerConfig(id="mover"))
    other = RuncContainers(tmp_path / "hostb", f"{kind.host}b")
    other.containers_dir.mkdir(parents=True)
    shutil.copytree(kind.container_dir("mover"), other.container_dir("mover"), symlinks=True)
    other.rewrite_for_host("mover")
    spec = json.loads((other.bundle_dir("mover") / "config.json").read_text())
    assert spec["linux"]["cgroupsPath"] == f"/phaul-{kind.host}b/mover"
    assert spec["annotations"]["org.criu.config"] == str(other.container_dir("mover") / "criu.conf")
    assert other.info("mover").state == "created"
