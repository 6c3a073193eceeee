"""What an agent accepts from the wire: pushed container directories, request
fields, paths (no lab needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phaul.errors import InvalidInput
from phaul.containers.inbound import check_container_dir
from phaul.rpc import phaul_pb2 as pb
from phaul.validate import check_args, check_message, confined

SPEC = {
    "root": {"path": "rootfs"},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}, {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
    "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]},
}


def _ct(tmp_path: Path, spec: dict | None = None, ct_id: str = "web") -> Path:
    d = tmp_path / "ct"
    (d / "bundle" / "rootfs").mkdir(parents=True)
    (d / "phaul.json").write_text(json.dumps({"id": ct_id}))
    (d / "bundle" / "config.json").write_text(json.dumps(spec or SPEC))
    return d


def test_a_plain_container_directory_is_accepted(tmp_path: Path) -> None:
    check_container_dir(_ct(tmp_path), "web")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(root={"path": "/"}), "root"),
        (lambda s: s["mounts"].append({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind"]}), "mounts"),
        (lambda s: s["mounts"].append({"destination": "/x", "type": "tmpfs", "source": "/etc", "options": ["bind"]}), "mounts"),
        (lambda s: s.update(hooks={"prestart": [{"path": "/bin/sh"}]}), "hooks"),
        (lambda s: s["linux"]["namespaces"].append({"type": "mount", "path": "/proc/1/ns/mnt"}), "namespace"),
    ],
)
def test_a_bundle_that_reaches_the_host_is_refused(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    spec = json.loads(json.dumps(SPEC))
    change(spec)
    with pytest.raises(InvalidInput, match=message):
        check_container_dir(_ct(tmp_path, spec), "web")


def test_links_and_strangers_are_refused(tmp_path: Path) -> None:
    d = _ct(tmp_path)
    with pytest.raises(InvalidInput, match="does not describe"):
        check_container_dir(d, "other")
    (d / "bundle" / "config.json").unlink()
    (d / "bundle" / "config.json").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput, match="symbolic link"):
        check_container_dir(d, "web")
    link = tmp_path / "linked"
    link.symlink_to(d)
    with pytest.raises(InvalidInput, match="symbolic link"):
        check_container_dir(link, "web")
    (d / "bundle" / "config.json").unlink()
    (d / "bundle" / "config.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        check_container_dir(d, "web")


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
