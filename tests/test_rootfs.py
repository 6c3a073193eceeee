"""Root file systems users have: the debian template (mmdebstrap, cached per package set),
--rootfs DIR|TARBALL and --image (OCI layout, docker-save archive), on one host (no lab)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_containers import _wait_for, kind  # noqa: F401  (the fixture)

from phaul.containers import ContainerConfig
from phaul.containers.debian import RootfsCache, cache_key, check_packages, debian_tarball
from phaul.containers.runc import DEFAULT_CACHE, RuncContainers
from phaul.containers.template import build_rootfs
from phaul.errors import InvalidInput


def test_package_names_are_checked_and_sorted() -> None:
    assert check_packages(["redis-server", " nginx ", "nginx", "libc6=2.36-9+deb12u4"]) == [
        "libc6=2.36-9+deb12u4", "nginx", "redis-server",
    ]
    for bad in ("Nginx", "-o", "a b", "nginx;rm", "x" * 200, "../etc"):
        with pytest.raises(InvalidInput, match="package"):
            check_packages([bad])
    with pytest.raises(InvalidInput, match="at most"):
        check_packages([f"p{i}" for i in range(100)])


def test_cache_key_ignores_order_and_duplicates() -> None:
    assert cache_key("bookworm", ["b", "a"]) == cache_key("bookworm", ["a", "b", "a"])
    assert cache_key("bookworm", ["a"]) != cache_key("bookworm", ["a", "b"])
    assert cache_key("bookworm", []) != cache_key("trixie", [])


def test_packages_need_the_debian_template(kind: RuncContainers) -> None:  # noqa: F811
    with pytest.raises(InvalidInput, match="debian"):
        kind.create(ContainerConfig(id="p", packages=["nginx"]))
    assert kind.list() == []


def test_cached_tarball_is_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A key present in the cache is not built again (a fake tarball proves nothing ran)."""
    cache = RootfsCache(tmp_path)
    fake = tmp_path / f"{cache_key('bookworm', ['nginx'])}.tar"
    fake.write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="phaul.containers.debian"):
        assert debian_tarball(cache, ["nginx"]) == fake
    assert "cached" in caplog.text


def test_debian_container_runs_and_checkpoints(kind: RuncContainers, tmp_path: Path) -> None:  # noqa: F811
    """The real build (minutes the first time on a machine, then cached under the default
    cache dir), a second create from the cache, the workload programs, a CRIU round trip."""
    for ct_id in ("deb1", "deb2"):
        started = time.monotonic()
        kind.create(ContainerConfig(id=ct_id, template="debian"))
        print(f"create {ct_id}: {time.monotonic() - started:.1f} s")
    assert (DEFAULT_CACHE / f"{cache_key('bookworm', [])}.tar").is_file()
    stored = json.loads((kind.container_dir("deb2") / "phaul.json").read_text())
    assert stored["template"] == "debian" and stored["packages"] == []
    info = kind.start("deb1")
    assert info.state == "running"
    r = kind.exec("deb1", ["sh", "-c", "cat /etc/debian_version; command -v apt-get; ls /usr/local/bin"])
    assert r.returncode == 0, r.stderr
    version, apt, *programs = r.stdout.decode().split()
    assert version.startswith("12."), version
    assert apt == "/usr/bin/apt-get"
    assert "memload" in programs
    kind.exec("deb1", ["sh", "-c", "echo kept > /root/mark; sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > /root/pid"])
    pid = kind.exec("deb1", ["cat", "/root/pid"]).stdout.strip()
    kind.checkpoint("deb1", tmp_path / "img", tmp_path / "work")
    assert kind.info("deb1").state == "created"  # runc forgets a checkpointed container
    assert kind.restore("deb1", tmp_path / "img", tmp_path / "work").state == "running"
    r = kind.exec("deb1", ["sh", "-c", f"cat /root/mark; kill -0 {pid.decode()} && echo alive"])
    assert r.stdout.decode().split() == ["kept", "alive"], r


# -- --rootfs and --image -------------------------------------------------------------

LOOP = "trap 'exit 0' TERM; while :; do sleep 1; done"


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _base(tmp: Path) -> Path:
    """A busybox root with a file of every kind worth keeping."""
    base = tmp / "base"
    build_rootfs(ContainerConfig(id="x"), base, RootfsCache(tmp / "cache"))
    (base / "etc" / "passwd").write_text((base / "etc" / "passwd").read_text() + "app:x:1000:1000::/data:/bin/sh\n")
    (base / "etc" / "group").write_text((base / "etc" / "group").read_text() + "app:x:1000:\nextra:x:2000:app\n")
    data = base / "data"
    data.mkdir()
    os.chown(data, 1000, 1000)
    (data / "gone").write_text("deleted in the second layer\n")
    (data / "file").write_text("x\n")
    os.link(data / "file", data / "link")
    os.setxattr(data / "file", "user.phaul", b"kept")
    os.chown(data / "file", 4321, 555)
    return base


def _layout(tmp: Path, base: Path) -> Path:
    """An OCI layout made with umoci: v1 from `base` with a configuration, v2 = v1 with
    /data/gone deleted (a whiteout in a second layer)."""
    layout = tmp / "layout"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:v1")
    _run("umoci", "unpack", "--image", f"{layout}:v1", str(tmp / "b1"))
    _run("cp", "-a", f"{base}/.", str(tmp / "b1" / "rootfs"))
    _run("umoci", "repack", "--image", f"{layout}:v1", str(tmp / "b1"))
    cmd = f"id -u > id; id -G > groups; pwd > pwd; echo $GREETING > env; {LOOP}"
    _run("umoci", "config", "--image", f"{layout}:v1", "--config.cmd", "/bin/sh", "--config.cmd", "-c",
         "--config.cmd", cmd, "--config.env", "GREETING=hello", "--config.user", "app", "--config.workingdir", "/data")
    _run("umoci", "unpack", "--image", f"{layout}:v1", str(tmp / "b2"))
    (tmp / "b2" / "rootfs" / "data" / "gone").unlink()
    _run("umoci", "repack", "--image", f"{layout}:v2", str(tmp / "b2"))
    return layout


def test_rootfs_directory_and_tarball(kind: RuncContainers, tmp_path: Path) -> None:  # noqa: F811
    base = _base(tmp_path)
    tarball = tmp_path / "root.tar.gz"
    _run("tar", "--create", "--gzip", "--file", str(tarball), "--directory", str(base), "--numeric-owner",
         "--acls", "--xattrs", "--xattrs-include=*", ".")
    for ct_id, src in (("fromdir", base), ("fromtar", tarball)):
        kind.create(ContainerConfig(id=ct_id, template="rootfs", rootfs=str(src)))
        root = kind.bundle_dir(ct_id) / "rootfs"
        st = os.stat(root / "data" / "file")
        assert (st.st_uid, st.st_gid, st.st_nlink) == (4321, 555, 2), ct_id
        assert st.st_ino == os.stat(root / "data" / "link").st_ino
        assert os.getxattr(root / "data" / "file", "user.phaul") == b"kept"
        kind.start(ct_id, ["sh", "-c", LOOP])
        assert kind.exec(ct_id, ["cat", "/data/gone"]).returncode == 0
    for bad, match in ((tmp_path / "nope", "does not exist"), (tmp_path / "cache", "empty|neither"),
                       (base / "etc" / "passwd", "tar archive"), (Path("relative"), "absolute")):
        if bad.name == "cache":
            bad.mkdir(exist_ok=True)
            for p in bad.iterdir():
                p.unlink()
        with pytest.raises(InvalidInput, match=match):
            kind.create(ContainerConfig(id="bad", template="rootfs", rootfs=str(bad)))
    assert [i.id for i in kind.list()] == ["fromdir", "fromtar"]


def test_image_layout_and_docker_archive(kind: RuncContainers, tmp_path: Path) -> None:  # noqa: F811
    base = _base(tmp_path)
    layout = _layout(tmp_path, base)
    with pytest.raises(InvalidInput, match="holds 2 images") as e:
        kind.create(ContainerConfig(id="img", template="image", image=str(layout)))
    assert "--image-ref" in e.value.hint and "v1, v2" in e.value.hint
    with pytest.raises(InvalidInput, match="no tag 'v3'"):
        kind.create(ContainerConfig(id="img", template="image", image=str(layout), image_ref="v3"))
    with pytest.raises(InvalidInput, match="not an OCI image layout"):
        kind.create(ContainerConfig(id="img", template="image", image=str(base)))
    with pytest.raises(InvalidInput, match="not an image"):
        kind.create(ContainerConfig(id="img", template="image", image=str(base / "etc" / "passwd")))

    archive = tmp_path / "saved.tar"  # what `docker save` writes
    _run("skopeo", "--insecure-policy", "copy", f"oci:{layout}:v2", f"docker-archive:{archive}:phaul/test:v2")
    kind.create(ContainerConfig(id="v1", template="image", image=str(layout), image_ref="v1"))
    kind.create(ContainerConfig(id="v2", template="image", image=str(layout), image_ref="v2"))
    kind.create(ContainerConfig(id="saved", template="image", image=str(archive)))
    assert (kind.bundle_dir("v1") / "rootfs" / "data" / "gone").exists()
    for ct_id in ("v2", "saved"):
        root = kind.bundle_dir(ct_id) / "rootfs"
        assert not (root / "data" / "gone").exists(), f"{ct_id}: the whiteout was not applied"
        assert not list((root / "data").glob(".wh.*"))
        st = os.stat(root / "data" / "file")
        assert (st.st_uid, st.st_gid, st.st_nlink) == (4321, 555, 2)
        config = kind.config(ct_id)
        assert (config.uid, config.gid, config.groups, config.cwd) == (1000, 1000, [2000], "/data"), config
        assert "GREETING=hello" in config.env and config.args[:2] == ["/bin/sh", "-c"]
        kind.start(ct_id)  # no command: the image's
        assert _wait_for(timeout=10.0, cond=lambda r=root: (r / "data" / "env").exists())
        assert (root / "data" / "id").read_text().split() == ["1000"]
        assert (root / "data" / "pwd").read_text().split() == ["/data"]
        assert (root / "data" / "groups").read_text().split() == ["1000", "2000"]
        assert (root / "data" / "env").read_text().split() == ["hello"]
        assert kind.stop(ct_id, timeout=5).state == "created"

