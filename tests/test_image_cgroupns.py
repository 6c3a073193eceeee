"""The image check for a container in a cgroup namespace (systemd containers get one,
phaul.containers.runc): a real dump is accepted; a cgroup namespace rooted above the
container's cgroup, or a v1 hierarchy mounted with options this host does not use
(a release_agent of its own), is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imagelib import dumped, edit
from pycriu.images import cgroup_pb2, mnt_pb2
from test_image_validation import Dump, _linked_copy, _mount_image, _refused

from phaul.containers import ContainerConfig
from phaul.linux.criu_images import expectation_from_spec, read_spec, validate_images


@pytest.fixture(scope="module")
def cgns() -> Iterator[Dump]:
    """A busybox container whose spec adds a cgroup namespace, dumped with --leave-running."""
    def cgroupns(spec: dict[str, Any]) -> None:
        spec["linux"]["namespaces"].append({"type": "cgroup"})

    with dumped(ContainerConfig(id="cgns", memory=64 << 20, pids=64), cgroupns) as (images, bundle):
        yield Dump(images, read_spec(bundle / "config.json"), 0)


def test_a_dump_in_a_cgroup_namespace_is_accepted(cgns: Dump) -> None:
    expect = expectation_from_spec(cgns.spec)
    assert "cgroup" in expect.namespaces and expect.cgroup_hierarchies  # this host's v1 hierarchies
    validate_images(cgns.images, expect)


def test_without_a_cgroup_namespace_in_the_spec_it_is_refused(cgns: Dump) -> None:
    spec = json.loads(json.dumps(cgns.spec))
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "cgroup"]
    _refused(cgns.images, spec, "ids-1.img", "cgroup_ns_id")


@pytest.mark.parametrize("prefix", [0, 1])  # no namespace root / the host's root
def test_a_cgroup_namespace_rooted_elsewhere_is_refused(cgns: Dump, tmp_path: Path, prefix: int) -> None:
    d = _linked_copy(cgns.images, tmp_path / "images")

    def widen(e: list[Any]) -> None:
        for s in e[0].sets:
            for c in s.ctls:
                c.cgns_prefix = prefix

    edit(d, "cgroup.img", cgroup_pb2.cgroup_entry, widen)
    _refused(d, cgns.spec, "cgroup.img", "cgns_prefix")


@pytest.mark.parametrize("options", ["memory,release_agent=/tmp/x", "memory,cpu", "name=evil", "nosuchcontroller"])
def test_a_hierarchy_mounted_with_other_options_is_refused(cgns: Dump, tmp_path: Path, options: str) -> None:
    d = _linked_copy(cgns.images, tmp_path / "images")
    name = _mount_image(d)

    def agent(e: list[Any]) -> None:
        [m] = [m for m in e if m.mountpoint == "/sys/fs/cgroup/memory"]
        m.options = options

    edit(d, name, mnt_pb2.mnt_entry, agent)
    assert "not one of this host's cgroup hierarchies" in _refused(d, cgns.spec, name, "options")
