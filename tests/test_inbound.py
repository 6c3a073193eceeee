"""What an agent accepts from the wire: pushed container directories, request
fields, paths (no lab needed)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from phaul.containers import ContainerConfig
from phaul.containers.inbound import strip_container_dir
from phaul.containers.runc import CRIU_CONF, RuncContainers
from phaul.errors import InvalidInput
from phaul.linux import network
from phaul.linux.datatree import check_data_tree
from phaul.rpc import phaul_pb2 as pb
from phaul.validate import check_args, check_message, confined

CANARY = b"canary"


def _canary(tmp_path: Path) -> Path:
    d = tmp_path / "canary"
    d.mkdir()
    (d / "file").write_bytes(CANARY)
    return d


def _untouched(canary: Path) -> None:
    assert sorted(os.listdir(canary)) == ["file"] and (canary / "file").read_bytes() == CANARY


# Everything the review of issue 10 pushed in a config.json, and more: hooks in any letter
# case, host bind mounts, host namespaces, all capabilities, no masked or read-only paths.
HOSTILE_SPEC = {
    "ociVersion": "1.0.2",
    "Hooks": {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "touch /tmp/owned"]}]},
    "hooks": {"createRuntime": [{"path": "/bin/sh"}]},
    "HOOKS": {"poststart": [{"path": "/bin/sh"}]},
    "process": {"args": ["/bin/sh"], "capabilities": {"bounding": ["CAP_SYS_ADMIN", "CAP_SYS_MODULE"]}},
    "root": {"path": "/"},
    "mounts": [
        {"destination": "/host", "type": "tmpfs", "source": "/", "options": ["rbind"]},
        {"destination": "/etc2", "type": "bind", "source": "/etc", "options": ["bind"]},
    ],
    "Linux": {"namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]},
    "linux": {
        "namespaces": [{"type": "mount", "path": "/proc/1/ns/mnt"}],
        "resources": {"devices": [{"allow": True, "access": "rwm"}], "memory": {"limit": 1 << 40}},
        "devices": [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}],
        "maskedPaths": [], "readonlyPaths": [],
    },
}


def _pushed(tmp_path: Path, canary: Path, ct_id: str = "web") -> Path:
    """A container directory as a hostile source pushes it."""
    d = tmp_path / "recv" / "ct"
    (d / "bundle" / "rootfs" / "bin").mkdir(parents=True)
    (d / "bundle" / "rootfs" / "bin" / "sh").symlink_to("/bin/busybox")  # the container's own business
    (d / "bundle" / "rootfs" / "etc").symlink_to("/etc")
    (d / "phaul.json").write_text(json.dumps({"id": ct_id, "gateway": "10.0.0.1\nnetns exec x sh", "ip": "10.0.0.5/24"}))
    (d / "bundle" / "config.json").write_text(json.dumps(HOSTILE_SPEC))
    (d / "criu.conf").symlink_to(canary / "file")
    (d / "bundle" / "extra.json").symlink_to(canary / "file")
    (d / "junk").mkdir()
    (d / "junk" / "link").symlink_to(canary)
    os.mkfifo(d / "fifo")
    return d


def test_the_pushed_configuration_is_replaced_by_the_destinations_own(tmp_path: Path) -> None:
    canary = _canary(tmp_path)
    kind = RuncContainers(tmp_path / "state", "beta")
    pushed = _pushed(tmp_path, canary)
    strip_container_dir(pushed)
    assert sorted(os.listdir(pushed)) == ["bundle"] and os.listdir(pushed / "bundle") == ["rootfs"]
    assert (pushed / "bundle" / "rootfs" / "etc").is_symlink()  # the rootfs is left as it came
    kind.containers_dir.mkdir(parents=True)
    pushed.rename(kind.container_dir("web"))
    config = ContainerConfig(id="web", memory=64 << 20, pids=100, args=["/bin/memload", "--size", "8"])
    kind.adopt("web", config)
    ct_dir = kind.container_dir("web")
    written = json.loads((ct_dir / "bundle" / "config.json").read_text())
    assert written == kind._spec(config, ct_dir)  # exactly what runc gets: nothing pushed survives
    assert written["process"]["args"] == ["/bin/memload", "--size", "8"]
    assert not any(k.lower() == "hooks" for k in written) and "Linux" not in written
    assert json.loads((ct_dir / "phaul.json").read_text()) == dataclasses.asdict(config)
    assert (ct_dir / "criu.conf").read_text() == CRIU_CONF and not (ct_dir / "criu.conf").is_symlink()
    assert kind.config("web") == config
    _untouched(canary)


def test_adopt_validates_the_configuration(tmp_path: Path) -> None:
    kind = RuncContainers(tmp_path / "state", "beta")
    (kind.bundle_dir("web") / "rootfs").mkdir(parents=True)
    with pytest.raises(InvalidInput, match="gateway"):
        kind.adopt("web", ContainerConfig(id="web", ip="10.0.0.5/24", gateway="10.0.0.1\nnetns exec x sh"))
    with pytest.raises(InvalidInput, match="not 'web'"):
        kind.adopt("web", ContainerConfig(id="other"))
    assert os.listdir(kind.bundle_dir("web")) == ["rootfs"]


@pytest.mark.parametrize("where", ["ct", "ct/bundle", "ct/bundle/rootfs"])
@pytest.mark.parametrize("what", ["symlink", "file", "missing"])
def test_a_container_dir_that_is_not_made_of_directories_is_refused(tmp_path: Path, where: str, what: str) -> None:
    canary = _canary(tmp_path)
    pushed = _pushed(tmp_path, canary)
    target = tmp_path / "recv" / where
    shutil.rmtree(target)
    if what == "symlink":
        target.symlink_to(canary)
    elif what == "file":
        target.write_bytes(b"x")
    with pytest.raises(InvalidInput, match="symbolic link|not a directory|has no|cannot open"):
        strip_container_dir(pushed)
    _untouched(canary)


def test_a_stored_configuration_is_validated_on_read(tmp_path: Path) -> None:
    kind = RuncContainers(tmp_path / "state", "beta")
    kind.container_dir("web").mkdir(parents=True)
    good = {"id": "web", "ip": "10.0.0.5/24", "gateway": "10.0.0.1"}
    for bad in (
        {"gateway": "10.0.0.1\nnetns exec x sh"}, {"ip": "10.0.0.5/24 dev lo"}, {"mac": "02:00:00:00:00:01\nx"},
        {"memory": 5}, {"pids": 0}, {"args": "sh"}, {"args": [1]}, {"id": "other"}, {"cpus": "x"},
    ):
        (kind.container_dir("web") / "phaul.json").write_text(json.dumps({**good, **bad}))
        with pytest.raises(InvalidInput, match="phaul.json is not a valid configuration"):
            kind.config("web")
    (kind.container_dir("web") / "phaul.json").write_text(json.dumps(good))
    assert kind.config("web").gateway == "10.0.0.1"


def test_ip_lines_refuse_anything_but_plain_words() -> None:
    ident = network.Identity("web", ipaddress.ip_interface("10.0.0.5/24"), "02:00:00:00:00:01", "10.0.0.1\nnetns exec x sh")
    with pytest.raises(InvalidInput, match="plain address"):
        network._inside_commands(ident)
    ident = network.Identity("web", ipaddress.ip_interface("10.0.0.5/24"), "02:00:00:00:00:01 $(x)", "10.0.0.1")
    with pytest.raises(InvalidInput, match="plain address"):
        network._veth_command(ident, "1")
    assert network._inside_commands(dataclasses.replace(ident, mac="02:00:00:00:00:01"))[-1].endswith("via 10.0.0.1 dev eth0")


def test_check_data_tree(tmp_path: Path) -> None:
    import socket

    canary = _canary(tmp_path)
    area = tmp_path / "images"
    (area / "sub" / "deeper").mkdir(parents=True)
    (area / "pages-1.img").write_bytes(b"x")
    (area / "sub" / "deeper" / "core.img").write_bytes(b"y")
    assert check_data_tree(area) == 4
    for name, plant in (
        ("link", lambda p: p.symlink_to(canary / "file")),
        ("dirlink", lambda p: p.symlink_to(canary)),
        ("fifo", os.mkfifo),
        ("dev", lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))),
        ("sock", lambda p: socket.socket(socket.AF_UNIX).bind(str(p))),
    ):
        p = area / "sub" / "deeper" / name
        plant(p)
        with pytest.raises(InvalidInput, match=f"deeper/{name} is a"):
            check_data_tree(area)
        p.unlink()
    with pytest.raises(InvalidInput, match="more than 3 entries"):
        check_data_tree(area, max_entries=3)
    with pytest.raises(InvalidInput, match="deeper than 2"):
        check_data_tree(area, max_depth=2)
    link = tmp_path / "linked"
    link.symlink_to(area)
    with pytest.raises(InvalidInput, match="linked is a symbolic link"):
        check_data_tree(link)
    _untouched(canary)


def test_confined_paths(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "containers").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "containers" / "evil").symlink_to(outside)
    assert confined(root / "containers" / "web", root) == root / "containers" / "web"  # need not exist
    for bad in (root / ".." / "outside", Path("/etc/passwd"), root / "containers" / "evil", root / "containers" / "evil" / "x"):
        with pytest.raises(InvalidInput):
            confined(bad, root)


def test_message_bounds() -> None:
    check_message(pb.PrepareRequest(migration_id="m1", config=pb.ContainerConfig(id="web", args=["sh", "-c", "true"])))
    for msg in (
        pb.PrepareRequest(config=pb.ContainerConfig(args=["x"] * 257)),
        pb.ExecRequest(id="a" * 4097),
        pb.ExecRequest(args=["a\0b"]),
        pb.ExecRequest(timeout=float("inf")),
        pb.PeerCheckRequest(cpuinfo=b"\0" * (65 << 10)),
    ):
        with pytest.raises(InvalidInput):
            check_message(msg)
    with pytest.raises(InvalidInput):
        check_args([])
    with pytest.raises(InvalidInput):
        check_args(["x" * 70_000])
