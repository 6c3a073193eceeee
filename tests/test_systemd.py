"""systemd as PID 1 of a debian container (--init systemd): it boots to "running", a unit
it started keeps its PID across a CRIU dump and restore (here on one host, and alpha -> beta
in the lab), and `stop` halts it with SIGRTMIN+3."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_containers import kind  # noqa: F401  (the fixture)

from conftest import Lab, wait_for
from phaul.containers import ContainerConfig, console
from phaul.containers.runc import RuncContainers
from phaul.errors import InvalidInput

PROBE = ["systemd-run", "--unit=probe", "--property=Restart=no", "/bin/sleep", "infinity"]


def _state(run) -> str:  # type: ignore[no-untyped-def]
    """`systemctl is-system-running --wait` (running, degraded, ...) and the failed units, if any."""
    state = run("systemctl", "is-system-running", "--wait").strip()
    failed = run("systemctl", "--failed", "--no-legend", "--plain", "--no-pager").strip()
    return state + (f" (failed: {failed})" if failed else "")


def _main_pid(run) -> int:  # type: ignore[no-untyped-def]
    return int(run("systemctl", "show", "--property=MainPID", "--value", "probe").strip())


def test_systemd_boots_keeps_units_across_restore_and_halts(kind: RuncContainers, tmp_path: Path) -> None:  # noqa: F811
    config = kind.config(kind.create(ContainerConfig(id="sd", template="debian", init="systemd")).id)
    assert "systemd" in config.packages  # added for --init systemd
    spec = json.loads((kind.bundle_dir("sd") / "config.json").read_text())
    assert spec["process"]["args"] == ["/lib/systemd/systemd"] and "container=oci" in spec["process"]["env"]
    assert {m["destination"] for m in spec["mounts"]} >= {"/run", "/run/lock", "/tmp"}
    kind.start("sd")

    def run(*cmd: str) -> str:
        return kind.exec("sd", list(cmd), timeout=120).stdout.decode()

    assert _state(run) == "running"
    run(*PROBE)
    pid = _main_pid(run)
    assert pid > 1
    kind.checkpoint("sd", tmp_path / "img", tmp_path / "work")
    kind.restore("sd", tmp_path / "img", tmp_path / "work")
    assert _main_pid(run) == pid and run("systemctl", "is-active", "probe").strip() == "active"
    assert _state(run) == "running"
    run("systemd-run", "--unit=after", "/bin/sleep", "infinity")  # systemd still manages its cgroups
    assert run("systemctl", "is-active", "after").strip() == "active"
    started = time.monotonic()
    kind.stop("sd", timeout=30)
    print(f"systemd halted in {time.monotonic() - started:.2f} s")
    assert console.exit_status(kind.log_dir("sd")) == "exit 0", "systemd did not halt on SIGRTMIN+3"


def test_systemd_needs_systemd_in_the_root(kind: RuncContainers) -> None:  # noqa: F811
    with pytest.raises(InvalidInput, match="systemd"):
        kind.create(ContainerConfig(id="nosd", init="systemd"))  # busybox
    with pytest.raises(InvalidInput, match="init"):
        kind.create(ContainerConfig(id="nosd", init="upstart"))
    assert kind.list() == []


@pytest.mark.lab
def test_systemd_container_migrates_with_its_services(clean_lab: Lab) -> None:
    """alpha -> beta -> alpha with systemd running, its unit on the same PID, new units
    started after each move, the container's cgroup namespace showing only its own
    cgroups, and `ct stop` halting it."""
    lab = clean_lab
    lab.phaul("--host", "alpha", "ct", "create", "sd1", "--template", "debian", "--init", "systemd", timeout=900)
    lab.phaul("--host", "alpha", "ct", "start", "sd1")

    def on(host: str):  # type: ignore[no-untyped-def]
        return lambda *cmd: lab.exec(host, "sd1", *cmd)

    wait_for(lambda: on("alpha")("systemctl", "is-system-running").strip() in ("running", "degraded"), 60,
             "systemd to boot")
    print("alpha:", _state(on("alpha")))
    on("alpha")(*PROBE)
    pid = _main_pid(on("alpha"))
    for n, (src, dst) in enumerate((("alpha", "beta"), ("beta", "alpha"))):
        report = lab.migrate("sd1", src, dst)
        assert report["result"] == "ok", report
        print(f"{src} -> {dst}: frozen {report['frozen_ms']:.0f} ms, total {report['total_ms']:.0f} ms")
        state = _state(on(dst))
        print(f"{dst}: {state}")
        assert state.startswith("running"), state
        assert _main_pid(on(dst)) == pid
        assert on(dst)("systemctl", "is-active", "probe").strip() == "active"
        on(dst)("systemd-run", f"--unit=after{n}", "/bin/sleep", "infinity")
        assert on(dst)("systemctl", "is-active", f"after{n}").strip() == "active"
        # its cgroup namespace: /proc/1/cgroup says "/init.scope", no host path, in every hierarchy
        lines = on(dst)("cat", "/proc/1/cgroup").split()
        assert lines and all(ln.split(":", 2)[2] in ("/init.scope", "/") for ln in lines), lines
        # and each hierarchy it mounts is rooted at its own cgroup: it lists systemd's slices, no host's
        cgroup_roots = [ln.split()[3] for ln in on(dst)("cat", "/proc/self/mountinfo").splitlines() if " - cgroup " in ln]
        assert cgroup_roots and set(cgroup_roots) == {"/"}, cgroup_roots
        assert set(on(dst)("ls", "/sys/fs/cgroup/systemd").split()) >= {"init.scope", "system.slice"}
        assert not [d for d in on(dst)("ls", "/sys/fs/cgroup/memory").split() if d.startswith("phaul-")]
    lab.phaul("--host", "alpha", "ct", "stop", "sd1")
    [info] = lab.ct_list("alpha")
    assert info["state"] == "created"


def test_tmpfs_archive_may_hold_fifos_not_devices() -> None:
    """systemd's /run holds FIFOs (/run/initctl) and a 0:0 character node (the whiteout
    device, /run/systemd/inaccessible/chr); CRIU archives /run with them and the
    destination's image check lets them through, while real device nodes stay refused."""
    import tarfile

    from phaul.linux import criu_images

    fifo = tarfile.TarInfo("./initctl")
    fifo.type = tarfile.FIFOTYPE
    criu_images._member("tmpfs-dev-46.tar.gz.img", fifo, {}, set())
    whiteout = tarfile.TarInfo("./systemd/inaccessible/chr")
    whiteout.type = tarfile.CHRTYPE  # 0:0
    criu_images._member("tmpfs-dev-46.tar.gz.img", whiteout, {}, set())
    null = tarfile.TarInfo("./null")
    null.type, null.devmajor, null.devminor = tarfile.CHRTYPE, 1, 3
    with pytest.raises(criu_images.ImageRefused, match="device"):
        criu_images._member("tmpfs-dev-46.tar.gz.img", null, {}, set())
    disk = tarfile.TarInfo("./sda")
    disk.type, disk.devmajor = tarfile.BLKTYPE, 8
    with pytest.raises(criu_images.ImageRefused, match="device"):
        criu_images._member("tmpfs-dev-46.tar.gz.img", disk, {}, set())
