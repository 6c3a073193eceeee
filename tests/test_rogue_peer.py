"""A compromised peer against a real agent: every attack of issue 10 over the
real protocol and data channels (mutual TLS, rsync, the page stream, runc and
CRIU), from a client holding a real peer certificate.

The victim is a production agent (no step hook) on 127.0.0.1 with peers
`peer1` and `peer2` and admin `admin`. Each attack must be refused with a
clear error; afterwards the agent still serves, and nothing outside its state
directory changed: a canary directory (which planted symbolic links point
at), and /etc (hashed before and after the suite)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

import imagelib
from agentlib import RunningAgent, make_pki, running_agent, tree_hash
from phaul.channels import pki
from phaul.channels.fs_sync import RsyncSender
from phaul.errors import ToolFailed
from pycriu.images import core_pb2, fdinfo_pb2, inventory_pb2
from phaul.channels.transport import Credentials
from phaul.rpc import phaul_pb2 as pb

HOST = "victim"
ETC = Path("/etc")


@dataclass
class Genuine:
    victim: RunningAgent
    config: pb.ContainerConfig
    ct: Path  # the container directory (phaul.json, criu.conf, bundle/)
    images: Path  # a checkpoint of it
    dir: Path

    def copy(self, name: str) -> tuple[Path, Path]:
        """A fresh copy of the container directory and the images, to tamper with."""
        base = self.dir / name
        base.mkdir()
        subprocess.run(["cp", "-a", str(self.ct), str(base / "ct")], check=True)
        shutil.copytree(self.images, base / "images", symlinks=True)
        return base / "ct", base / "images"


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    d = tmp_path_factory.mktemp("rogue")
    creds = make_pki(d, [HOST, "peer1", "peer2", "admin"])
    # CN mallory2 with the SAN DNS name peer1: a name check that accepts SANs takes it for peer1
    cert, key = pki.issue(d / "pki", "mallory2", dns=["peer1"], force=True)
    creds["mallory2"] = Credentials("mallory2", cert, key, creds[HOST].ca)
    etc_before = tree_hash(ETC)
    with running_agent(d, HOST, creds, ["peer1", "peer2"], ["admin"]) as a:
        (a.canary / "file").write_text("canary")
        yield a
        assert a.proc.poll() is None, "the agent died"
    assert tree_hash(ETC) == etc_before, "/etc changed during the rogue-peer suite"


@pytest.fixture(autouse=True)
def unharmed(victim: RunningAgent) -> Iterator[None]:
    """After each attack: the agent serves its admin and its peers, and the canary is untouched."""
    before = victim.snapshot()
    yield
    assert victim.proc.poll() is None, "the agent died:\n" + victim.log()[-3000:]
    for who in ("admin", "peer2"):
        code, details = call(victim, who, "Info", pb.Empty())
        assert code == grpc.StatusCode.OK, (who, details)
    assert victim.snapshot() == before, "the attack reached the canary outside the state directory"
    assert (victim.canary / "sub" / "keep.txt").read_text() == "precious"


def call(agent: RunningAgent, who: str, method: str, request: Any, timeout: float = 60) -> tuple[grpc.StatusCode, str]:
    a = agent.stub(who, tcp=True)
    try:
        getattr(a.stub, method)(request, timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    finally:
        a.close()


def reply(agent: RunningAgent, who: str, method: str, request: Any) -> Any:
    a = agent.stub(who, tcp=True)
    try:
        return getattr(a.stub, method)(request, timeout=60)
    finally:
        a.close()


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def prepare_request(who: str, mid: str, ct: str, **config: Any) -> pb.PrepareRequest:
    return pb.PrepareRequest(
        migration_id=mid, source_name=who, config=pb.ContainerConfig(id=ct, **{"template": "busybox", **config}),
        criu_version="4.2", need_bytes=64 << 20,
    )


def abort(agent: RunningAgent, who: str, mid: str) -> None:
    code, details = call(agent, who, "Abort", pb.MigrationRef(migration_id=mid))
    assert code == grpc.StatusCode.OK, details


# -- identity ------------------------------------------------------------------------------------


def test_san_only_identity_is_not_a_peer(victim: RunningAgent) -> None:
    code, details = call(victim, "mallory2", "Prepare", prepare_request("peer1", new_id(), "ct-san"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "mallory2" in details


def test_a_peer_cannot_speak_for_another(victim: RunningAgent) -> None:
    code, details = call(victim, "peer1", "Prepare", prepare_request("peer2", new_id(), "ct-other"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not the source" in details


# -- every string field of Prepare, with a newline (and other shell and path tricks) ------------

INJECTIONS = ["10.77.0.9/24\nnetns exec 1 touch /tmp/pwned", "a\nb", "x;touch /tmp/pwned", "$(id)", "../../etc", "a\0b"]
CONFIG_FIELDS = ["id", "template", "ip", "gateway", "mac"]


@pytest.mark.parametrize("field", CONFIG_FIELDS)
@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_in_config_fields_is_refused(victim: RunningAgent, field: str, value: str) -> None:
    config = {"id": "ct-inj", "ip": "10.77.0.9/24", "gateway": "10.77.0.1"}
    config[field] = value
    ct = config.pop("id")
    code, details = call(victim, "peer1", "Prepare", prepare_request("peer1", new_id(), ct, **config))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, value, code, details)
    assert details.strip()


@pytest.mark.parametrize("field", ["migration_id", "criu_version", "source_address"])
def test_injection_in_request_fields_is_refused(victim: RunningAgent, field: str) -> None:
    request = prepare_request("peer1", new_id(), "ct-inj2")
    setattr(request, field, "1\nnetns exec 1 touch /tmp/pwned")
    code, details = call(victim, "peer1", "Prepare", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, details)


# -- migrations that are not the caller's ---------------------------------------------------------

PER_MIGRATION = [
    "HoldTraffic", "OpenPageStream", "ApplyPages", "KeepBasis", "Restore", "Resume", "Finish", "Abort", "MigrationStatus",
]


def test_foreign_migrations_are_refused(victim: RunningAgent) -> None:
    mid = new_id()
    code, details = call(victim, "peer2", "Prepare", prepare_request("peer2", mid, "ct-peer2"))
    assert code == grpc.StatusCode.OK, details
    try:
        for method in PER_MIGRATION:
            request = pb.ApplyPagesRequest(migration_id=mid) if method == "ApplyPages" else pb.MigrationRef(migration_id=mid)
            code, details = call(victim, "peer1", method, request)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "peer2" in details, (method, code, details)
        assert (victim.state / "incoming" / mid).is_dir(), "peer1 removed peer2's migration"
    finally:
        abort(victim, "peer2", mid)
    assert not (victim.state / "incoming" / mid).exists()


def test_abort_of_an_unknown_id_changes_nothing(victim: RunningAgent) -> None:
    """Not even this host's own outgoing migration of the same ID (its source-side directory)."""
    mid = new_id()
    mine = victim.state / "migrations" / mid
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "pages-1.img").write_bytes(b"in doubt")
    try:
        for who in ("peer1", "peer2"):
            code, details = call(victim, who, "Abort", pb.MigrationRef(migration_id=mid))
            assert code == grpc.StatusCode.OK, details
            for method in ("Restore", "Resume", "Finish", "OpenPageStream"):
                code, details = call(victim, who, method, pb.MigrationRef(migration_id=mid))
                assert code == grpc.StatusCode.NOT_FOUND, (method, code, details)
        assert (mine / "images" / "pages-1.img").read_bytes() == b"in doubt"
    finally:
        shutil.rmtree(mine)


# -- bounds -------------------------------------------------------------------------------------


def test_prepare_flood_is_bounded_per_peer(victim: RunningAgent) -> None:
    taken: list[str] = []
    refused = ""
    try:
        for i in range(25):
            mid = new_id()
            code, details = call(victim, "peer1", "Prepare", prepare_request("peer1", mid, f"ct-flood{i}"))
            if code == grpc.StatusCode.OK:
                taken.append(mid)
                continue
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            refused = details
            break
        assert refused and "peer1" in refused and len(taken) == 4, (len(taken), refused)
        # the other peer still gets its share
        mid = new_id()
        code, details = call(victim, "peer2", "Prepare", prepare_request("peer2", mid, "ct-flood-other"))
        assert code == grpc.StatusCode.OK, details
        abort(victim, "peer2", mid)
    finally:
        for mid in taken:
            abort(victim, "peer1", mid)
    assert not any((victim.state / "incoming").iterdir())


def test_a_source_must_declare_its_size(victim: RunningAgent) -> None:
    request = prepare_request("peer1", new_id(), "ct-nosize")
    request.need_bytes = 0
    code, details = call(victim, "peer1", "Prepare", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "size" in details, details
    request.need_bytes = 1 << 62
    code, details = call(victim, "peer1", "Prepare", request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "free" in details, details


# ------------------------------------------------------------------------------------------------


# -- a genuine container to push: real images, real bundle ---------------------------------------


@pytest.fixture(scope="module")
def genuine(victim: RunningAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Genuine]:
    """A real busybox container checkpointed on the victim and then destroyed there: its
    directory and images are what an honest source would push."""
    d = tmp_path_factory.mktemp("genuine")
    ct = "ct-real"
    config = pb.ContainerConfig(id=ct, template="busybox", memory=64 << 20)
    assert call(victim, "admin", "CreateContainer", config)[0] == grpc.StatusCode.OK
    try:
        assert call(victim, "admin", "StartContainer", pb.StartRequest(id=ct))[0] == grpc.StatusCode.OK
        runc = ["runc", "--root", str(victim.state / "runc")]
        images, work = d / "images", d / "work"
        subprocess.run(
            [*runc, "checkpoint", "--leave-running", "--image-path", str(images), "--work-path", str(work), ct],
            check=True, stdin=subprocess.DEVNULL, capture_output=True,
        )
        subprocess.run(["cp", "-a", str(victim.state / "containers" / ct), str(d / "ct")], check=True)
    finally:
        assert call(victim, "admin", "DestroyContainer", pb.ContainerRef(id=ct))[0] == grpc.StatusCode.OK
    yield Genuine(victim, config, d / "ct", images, d)


@dataclass
class Rogue:
    """One migration a rogue peer prepared on the victim, with its data channel."""

    victim: RunningAgent
    who: str
    mid: str
    address: str
    secret: str

    def push(self, src: Path, area: str) -> None:
        RsyncSender(self.victim.creds[self.who], self.address, HOST, 10.0, self.secret).push(src, area)

    def call(self, method: str) -> tuple[grpc.StatusCode, str]:
        return call(self.victim, self.who, method, pb.MigrationRef(migration_id=self.mid), timeout=120)


@contextmanager
def prepared(victim: RunningAgent, config: pb.ContainerConfig, need_bytes: int = 64 << 20) -> Iterator[Rogue]:
    """Prepare as peer1; afterwards Abort, and nothing of the migration may be left."""
    mid = new_id()
    request = pb.PrepareRequest(migration_id=mid, source_name="peer1", config=config, criu_version="4.2", need_bytes=need_bytes)
    r = reply(victim, "peer1", "Prepare", request)
    rogue = Rogue(victim, "peer1", mid, r.data_address, r.secret)
    try:
        yield rogue
    finally:
        abort(victim, "peer1", mid)
        assert not (victim.state / "incoming" / mid).exists()
        assert not (victim.state / "containers" / config.id).exists(), "the aborted container was left"


def restore(genuine: Genuine, ct: Path, images: Path) -> tuple[grpc.StatusCode, str, Path]:
    """Push `ct` and `images` as the genuine container's migration and ask for the restore;
    the container's bundle as the victim placed it is returned (before the abort)."""
    with prepared(genuine.victim, genuine.config) as rogue:
        rogue.push(ct, "ct")
        rogue.push(images, "images")
        code, details = rogue.call("Restore")
        placed = genuine.dir / f"placed-{rogue.mid}"
        bundle = genuine.victim.state / "containers" / genuine.config.id / "bundle"
        if bundle.is_dir():
            placed.mkdir()
            shutil.copy(bundle / "config.json", placed / "config.json")
            shutil.copy(bundle.parent / "phaul.json", placed / "phaul.json")
    return code, details, placed


def test_the_genuine_container_restores(genuine: Genuine) -> None:
    """What every attack below is measured against: pushed as it is, it restores."""
    ct, images = genuine.copy("as-is")
    code, details, placed = restore(genuine, ct, images)
    assert code == grpc.StatusCode.OK, details
    assert json.loads((placed / "phaul.json").read_text())["id"] == genuine.config.id


def _hooks(spec: dict[str, Any], key: str, canary: Path) -> None:
    spec[key] = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", f"touch {canary}/pwned-hook"]}],
                 "createRuntime": [{"path": "/usr/bin/touch", "args": ["touch", f"{canary}/pwned-hook2"]}]}


BUNDLE_ATTACKS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "hooks": lambda s, c: _hooks(s, "hooks", c),
    "Hooks": lambda s, c: _hooks(s, "Hooks", c),
    "HOOKS": lambda s, c: _hooks(s, "HOOKS", c),
    "rbind-tmpfs": lambda s, c: s["mounts"].append(
        {"destination": "/host", "type": "tmpfs", "source": "/", "options": ["rbind", "rw"]}),
    "bind-etc": lambda s, c: s["mounts"].append({"destination": "/host-etc", "type": "bind", "source": "/etc", "options": ["bind"]}),
    "host-netns": lambda s, c: s["linux"]["namespaces"].__setitem__(1, {"type": "network", "path": "/proc/1/ns/net"}),
    "Linux-host-netns": lambda s, c: s.__setitem__("Linux", {"namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]}),
    "no-pid-mount-net-ns": lambda s, c: s["linux"].__setitem__("namespaces", [{"type": "uts"}]),
    "all-capabilities": lambda s, c: s["process"].__setitem__(
        "capabilities", {k: ["CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE"] for k in ("bounding", "effective", "permitted")}),
    "host-block-device": lambda s, c: (
        s["linux"].__setitem__("devices", [{"path": "/dev/hostdisk", "type": "b", "major": 254, "minor": 0}]),
        s["linux"]["resources"].__setitem__("devices", [{"allow": True, "access": "rwm"}])),
    "no-masked-paths": lambda s, c: (s["linux"].pop("maskedPaths", None), s["linux"].pop("readonlyPaths", None)),
    "no-seccomp": lambda s, c: s["linux"].pop("seccomp", None),
    "no-limits": lambda s, c: s["linux"].__setitem__("resources", {}),
    "root-elsewhere": lambda s, c: s["root"].__setitem__("path", "/"),
}


@pytest.mark.parametrize("attack", list(BUNDLE_ATTACKS))
def test_the_pushed_bundle_configuration_is_never_used(genuine: Genuine, attack: str) -> None:
    """runc gets the victim's own spec, rebuilt from the Prepare configuration: the
    hostile one is ignored (the restore goes ahead with the container's own)."""
    ct, images = genuine.copy(f"bundle-{attack}")
    config = ct / "bundle" / "config.json"
    spec = json.loads(config.read_text())
    BUNDLE_ATTACKS[attack](spec, genuine.victim.canary)
    config.write_text(json.dumps(spec))
    phaul_json = json.loads((ct / "phaul.json").read_text())
    phaul_json.update(gateway="10.0.0.1\nnetns exec 1 touch /tmp/pwned", memory=None, args=["/bin/sh", "-c", "touch /pwned"])
    (ct / "phaul.json").write_text(json.dumps(phaul_json))
    (ct / "criu.conf").write_text(f"action-script {genuine.victim.canary}/pwned.sh\n")
    code, details, placed = restore(genuine, ct, images)
    assert code == grpc.StatusCode.OK, details
    assert json.loads((placed / "config.json").read_text()) == _own_spec(genuine)
    assert json.loads((placed / "phaul.json").read_text())["gateway"] is None


def _own_spec(genuine: Genuine) -> dict[str, Any]:
    return json.loads((genuine.ct / "bundle" / "config.json").read_text())


CT_LINKS = {
    "bundle": ("bundle", "{canary}"),
    "rootfs": ("bundle/rootfs", "/"),
    "config.json": ("bundle/config.json", "{canary}/file"),
    "phaul.json": ("phaul.json", "{canary}/file"),
    "criu.conf": ("criu.conf", "{canary}/file"),
}


@pytest.mark.parametrize("where", list(CT_LINKS))
def test_symbolic_links_in_the_container_directory_are_not_followed(genuine: Genuine, where: str) -> None:
    ct, images = genuine.copy(f"link-{where}")
    rel, target = CT_LINKS[where]
    path = ct / rel
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.symlink_to(target.format(canary=genuine.victim.canary))
    code, details, _ = restore(genuine, ct, images)
    if where in ("bundle", "rootfs"):  # the directories the container is: refused
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a directory" in details, (code, details)
    else:  # files the victim writes itself: the link is removed, never followed
        assert code == grpc.StatusCode.OK, details
    assert (genuine.victim.canary / "file").read_text() == "canary"


def _all_caps(messages: list[Any]) -> None:
    creds = messages[0].thread_core.creds
    for name in ("cap_eff", "cap_prm", "cap_bnd"):
        del getattr(creds, name)[:]
        getattr(creds, name).extend([0xFFFFFFFF, 0x1FF])


def _host_netns(d: Path) -> Callable[[list[Any]], None]:
    root = imagelib.entries(d / "inventory.img", inventory_pb2.inventory_entry)[1][0].root_ids
    return lambda messages: setattr(messages[0], "net_ns_id", root.net_ns_id)


def _outside_file(messages: list[Any]) -> None:
    regs = [m for m in messages if m.HasField("reg")]
    regs[0].reg.name = "/../../etc/shadow"


IMAGE_ATTACKS: dict[str, tuple[str, Any, Callable[[Path], Callable[[list[Any]], None]], str]] = {
    "all-capabilities": ("core-1.img", core_pb2.core_entry, lambda d: _all_caps, "cap_"),
    "host-net-namespace": ("ids-1.img", core_pb2.task_kobj_ids_entry, _host_netns, "net_ns_id"),
    "file-outside-the-root": ("files.img", fdinfo_pb2.file_entry, lambda d: _outside_file, "reg.name"),
}


@pytest.mark.parametrize("attack", list(IMAGE_ATTACKS))
def test_crafted_images_are_refused(genuine: Genuine, attack: str) -> None:
    ct, images = genuine.copy(f"images-{attack}")
    name, cls, change, fld = IMAGE_ATTACKS[attack]
    imagelib.edit(images, name, cls, change(images))
    code, details, _ = restore(genuine, ct, images)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert f"CRIU image {name}" in details and fld in details, details


def test_keep_basis_of_a_migration_without_a_page_link_is_refused(genuine: Genuine) -> None:
    """KeepBasis (hybrid) links received images into the migration's own directory: only for a
    post-copy migration, whose keeper reads them; any other is refused and nothing is made."""
    _, images = genuine.copy("keep-basis")
    with prepared(genuine.victim, genuine.config) as rogue:
        rogue.push(images, "images")
        code, details = rogue.call("KeepBasis")
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not post-copy" in details, (code, details)
        assert not (genuine.victim.state / "incoming" / rogue.mid / "basis").exists()


def test_a_quota_overrun_cuts_the_migration_off(genuine: Genuine, tmp_path: Path) -> None:
    """Declared 1 MiB, the quota is 2 MiB + 512 MiB: 600 MiB pushed are cut off."""
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "pages-1.img", "wb") as f:
        for _ in range(600):
            f.write(os.urandom(1 << 20))
    with prepared(genuine.victim, genuine.config, need_bytes=1 << 20) as rogue:
        try:
            rogue.push(big, "images")
        except ToolFailed:
            pass  # cut off while it pushed
        code, details = rogue.call("ApplyPages")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "over its quota" in details, (code, details)
        code, details = rogue.call("Restore")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "over its quota" in details, (code, details)
        left = genuine.victim.state / "incoming" / rogue.mid / "recv"
        deadline = time.monotonic() + 30
        while left.exists() and time.monotonic() < deadline:  # removed by the cut, which answers no call meanwhile
            time.sleep(0.1)
        assert not left.exists(), "what arrived was kept"


# ------------------------------------------------------------------------------------------------


def test_zz_nothing_left_behind(victim: RunningAgent) -> None:
    """Every refused migration left nothing on the victim: no directory, no data channel."""
    incoming = victim.state / "incoming"
    assert not incoming.exists() or not any(incoming.iterdir())
    out = subprocess.run(["pgrep", "-af", str(victim.state)], capture_output=True, text=True).stdout
    assert "socat" not in out and "rsync" not in out, out
