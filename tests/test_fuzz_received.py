"""What a hostile source pushes, generated: container directories and the data channel.

Property-based tests (hypothesis), beside tests/test_agent_hardening.py's random
gRPC requests:

- Container directories as a source could push them (random config.json,
  phaul.json and criu.conf documents, random file types for ct/, ct/bundle,
  ct/bundle/rootfs and their siblings, links into a canary directory) go
  through the destination's own code path, `strip_container_dir` then
  `RuncContainers.adopt`: either a clear InvalidInput, or the bundle holds
  exactly the destination's own spec and configuration; the canary is never
  touched and no link is followed.
- Page stream sessions (right, wrong, empty and huge secrets; random headers
  and bodies) over the real TLS endpoint of a real agent: each is answered
  with `ready`, ok or an error line, or closed; the agent lives on; nothing is
  written outside recv/delta and recv/images (nothing at all after a wrong
  secret).
- rsync pushes with random trees (links, FIFOs, hard links) and random options
  into every module, with and without the secret: the data areas hold only
  regular files and directories, and nothing outside recv/ changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentlib import RunningAgent, make_pki, running_agent, tree_hash
from phaul.channels.transport import TLS_RSH, rsh_env
from phaul.containers import ContainerConfig
from phaul.containers.inbound import strip_container_dir
from phaul.containers.runc import CRIU_CONF, EXTRA_CAPS, SECCOMP_MODES, RuncContainers, _check_config
from phaul.errors import InvalidInput
from phaul.rpc import phaul_pb2 as pb

HOST = "hosta"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)

# -- 1. generated bundle configurations ------------------------------------------------------

_OCI_KEYS = [
    "ociVersion", "hooks", "prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop",
    "path", "args", "env", "timeout", "process", "user", "uid", "gid", "additionalGids", "capabilities", "bounding",
    "effective", "permitted", "ambient", "rlimits", "type", "hard", "soft", "noNewPrivileges", "root", "readonly",
    "mounts", "destination", "source", "options", "linux", "namespaces", "devices", "major", "minor", "maskedPaths",
    "readonlyPaths", "seccomp", "resources", "memory", "limit", "cgroupsPath", "annotations", "org.criu.config",
    "hostname", "sysctl", "uidMappings", "apparmorProfile", "selinuxLabel", "rootfsPropagation", "unknownKey",
]  # fmt: skip
_HOSTILE_VALUES = [
    "/", "/etc", "/proc/1/ns/net", "/proc/1/ns/mnt", "/dev/sda", "bind", "rbind", "rshared", "CAP_SYS_ADMIN",
    "CAP_SYS_MODULE", "/bin/sh", "../../canary", "unconfined", "SCMP_ACT_ALLOW", 0, -1, 2**63, 1e308, True, None,
    "x" * 5000, "a\0b", "10.0.0.1\nnetns exec x sh",
]  # fmt: skip


def _case(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name.capitalize(), name.swapcase()])


_json_leaf = st.one_of(
    st.sampled_from(_HOSTILE_VALUES), st.integers(-(2**64), 2**64), st.text(max_size=20), st.floats(allow_nan=False),
)
_json_doc = st.recursive(
    _json_leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(_OCI_KEYS).flatmap(_case), st.text(max_size=8)), kids, max_size=5),
    ),
    max_leaves=30,
)
_hook = st.fixed_dictionaries({"path": st.sampled_from(["/bin/sh", "/usr/bin/touch"])},
                              optional={"args": st.just(["sh", "-c", "touch /tmp/phaul-fuzz-owned"])})
_mount = st.fixed_dictionaries({
    "destination": st.sampled_from(["/host", "/etc2", "/proc"]), "source": st.sampled_from(["/", "/etc", "/root"]),
    "type": st.sampled_from(["bind", "tmpfs", "none"]), "options": st.lists(st.sampled_from(["bind", "rbind", "rw", "rshared"]), max_size=3),
})
_spec_like = st.fixed_dictionaries({}, optional={
    **{k: st.dictionaries(st.sampled_from(["prestart", "createRuntime", "poststart"]).flatmap(_case), st.lists(_hook, max_size=2), max_size=3)
       for k in ("hooks", "Hooks", "HOOKS")},
    "mounts": st.lists(_mount, max_size=3),
    "process": st.fixed_dictionaries({}, optional={
        "user": st.just({"uid": 0, "gid": 0}), "args": st.just(["/bin/sh"]),
        "capabilities": st.just({"bounding": ["CAP_SYS_ADMIN", "CAP_SYS_MODULE"]}),
        "rlimits": st.just([{"type": "RLIMIT_NOFILE", "hard": 2**62, "soft": 2**62}]), "noNewPrivileges": st.just(False),
    }),
    "linux": st.fixed_dictionaries({}, optional={
        "namespaces": st.just([{"type": "network", "path": "/proc/1/ns/net"}, {"type": "mount", "path": "/proc/1/ns/mnt"}]),
        "devices": st.just([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]),
        "maskedPaths": st.just([]), "readonlyPaths": st.just([]), "seccomp": st.none(),
        "resources": st.just({"devices": [{"allow": True, "access": "rwm"}]}),
    }),
    "annotations": st.dictionaries(st.sampled_from(["org.criu.config", "x"]), st.sampled_from(["/etc/passwd", "../../canary/file"]), max_size=2),
    "root": st.just({"path": "/"}),
    "unknown": _json_doc,
})
_config_json = st.one_of(_json_doc, _spec_like, st.tuples(_spec_like, _json_doc).map(lambda t: {**t[0], "Linux": t[1]}))

_ct_ids = st.sampled_from(["web", "ct1", "db-2"])


@st.composite
def _configs(draw: Any, ct_id: str) -> ContainerConfig:
    net = draw(st.integers(0, 255))
    ip = draw(st.one_of(st.none(), st.just(f"10.{net}.0.{draw(st.integers(2, 250))}/24")))
    return ContainerConfig(
        id=ct_id,
        memory=draw(st.one_of(st.none(), st.integers(4 << 20, 1 << 40))),
        cpus=draw(st.one_of(st.none(), st.floats(0.01, 1024))),
        pids=draw(st.one_of(st.none(), st.integers(1, 1 << 22))),
        ip=ip,
        gateway=draw(st.one_of(st.none(), st.just(f"10.{net}.0.1"))) if ip else None,
        mac=draw(st.one_of(st.none(), st.just("02:00:00:00:00:%02x" % draw(st.integers(0, 255))))),
        args=draw(st.lists(st.text(max_size=20), max_size=4)),
        cap_add=sorted(draw(st.sets(st.sampled_from(EXTRA_CAPS)))),
        seccomp=draw(st.sampled_from(SECCOMP_MODES)),
    )


_phaul_json = st.one_of(
    st.builds(lambda c: dataclasses.asdict(c), _ct_ids.flatmap(_configs)),
    st.builds(lambda i: {"id": i, "gateway": "10.0.0.1\nnetns exec x sh", "ip": "10.0.0.5/24"}, _ct_ids),
    st.builds(lambda: {"id": "other", "args": ["x" * 100_000] * 3}),
    _json_doc,
)
_criu_conf = st.one_of(st.text(max_size=200), st.just("action-script /bin/sh\nexec-cmd\n"), st.just("x" * 100_000))
# What an entry may be: its own content, or a link to the canary (directory or file), a hard
# link to the canary's file, a FIFO, or absent.
_KINDS = ["dir", "file", "symlink-dir", "symlink-file", "hardlink", "fifo", "missing"]
_entry_kind = st.sampled_from(_KINDS)
_main_kind = st.sampled_from(["dir"] * 8 + _KINDS)  # ct, bundle, rootfs: mostly real directories
_sibling_names = st.sampled_from(["config.json", "phaul.json", "criu.conf", "rootfs2", ".hidden", "junk", "work", "x" * 200])


@dataclass
class Layout:
    ct: str
    bundle: str
    rootfs: str
    config_json: tuple[str, Any]
    phaul_json: tuple[str, Any]
    criu_conf: tuple[str, str]
    ct_siblings: list[tuple[str, str]]
    bundle_siblings: list[tuple[str, str]]
    rootfs_links: bool
    ct_id: str
    config: ContainerConfig


@st.composite
def _layouts(draw: Any) -> Layout:
    ct_id = draw(_ct_ids)
    config = draw(_configs(draw(st.one_of(st.just(ct_id), st.just(ct_id), st.just(ct_id), _ct_ids))))
    return Layout(
        draw(_main_kind), draw(_main_kind), draw(_main_kind),
        (draw(_entry_kind), draw(_config_json)), (draw(_entry_kind), draw(_phaul_json)), (draw(_entry_kind), draw(_criu_conf)),
        draw(st.lists(st.tuples(_sibling_names, _entry_kind), max_size=4, unique_by=lambda t: t[0])),
        draw(st.lists(st.tuples(_sibling_names, _entry_kind), max_size=4, unique_by=lambda t: t[0])),
        draw(st.booleans()), ct_id, config,
    )


def _make(path: Path, kind: str, canary: Path, content: bytes = b"pushed") -> None:
    """An entry of `kind` at `path` (its parent exists)."""
    if kind == "dir":
        path.mkdir()
        (path / "inner").write_bytes(content)
        (path / "out").symlink_to(canary)
    elif kind == "file":
        path.write_bytes(content)
    elif kind == "symlink-dir":
        path.symlink_to(canary)
    elif kind == "symlink-file":
        path.symlink_to(canary / "file")
    elif kind == "hardlink":
        os.link(canary / "file", path)
    elif kind == "fifo":
        os.mkfifo(path)


def _dump(doc: Any) -> bytes:
    return doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()


def _push(root: Path, lay: Layout, canary: Path) -> Path:
    ct = root / "recv" / "ct"
    ct.parent.mkdir()
    _make(ct, lay.ct, canary)
    if lay.ct != "dir":
        return ct
    for name, kind in lay.ct_siblings:
        if name not in ("bundle", "phaul.json", "criu.conf"):
            _make(ct / name, kind, canary)
    _make(ct / "phaul.json", lay.phaul_json[0], canary, _dump(lay.phaul_json[1]))
    _make(ct / "criu.conf", lay.criu_conf[0], canary, _dump(lay.criu_conf[1]))
    bundle = ct / "bundle"
    _make(bundle, lay.bundle, canary)
    if lay.bundle != "dir":
        return ct
    (bundle / "inner").unlink()
    (bundle / "out").unlink()
    for name, kind in lay.bundle_siblings:
        if name not in ("rootfs", "config.json"):
            _make(bundle / name, kind, canary)
    _make(bundle / "config.json", lay.config_json[0], canary, _dump(lay.config_json[1]))
    _make(bundle / "rootfs", lay.rootfs, canary)
    if lay.rootfs == "dir" and lay.rootfs_links:  # the container's own business: kept as it came
        (bundle / "rootfs" / "etc").symlink_to("/etc")
        (bundle / "rootfs" / "canary").symlink_to(canary)
        os.mkfifo(bundle / "rootfs" / "fifo")
    return ct


def _canary(root: Path) -> Path:
    c = root / "canary"
    (c / "sub").mkdir(parents=True)
    (c / "file").write_bytes(b"precious")
    (c / "sub" / "keep.txt").write_bytes(b"precious")
    (c / "config.json").write_text('{"hooks": {}}')
    return c


def _shape(root: Path) -> list[tuple[str, int, str]]:
    """Every entry under `root` by relative name, with its mode and link target (nothing followed)."""
    out = []
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        out.append((str(p.relative_to(root)), st_.st_mode, os.readlink(p) if p.is_symlink() else ""))
    return out


@SETTINGS
@given(lay=_layouts())
def test_generated_pushed_bundles_are_refused_or_replaced_by_the_destinations_own(lay: Layout) -> None:
    root = Path(tempfile.mkdtemp(prefix="phaul-fuzz-bundle."))
    try:
        canary = _canary(root)
        before = tree_hash(canary)
        kind = RuncContainers(root / "state", "beta")
        ct = _push(root, lay, canary)
        rootfs = ct / "bundle" / "rootfs"
        rootfs_before = _shape(rootfs) if lay.ct == lay.bundle == lay.rootfs == "dir" else None
        try:
            strip_container_dir(ct)
            kind.containers_dir.mkdir(parents=True)
            ct.rename(kind.container_dir(lay.ct_id))
            strip_container_dir(kind.container_dir(lay.ct_id))
            kind.adopt(lay.ct_id, lay.config)
        except InvalidInput as e:
            assert e.message.strip(), "an InvalidInput without a message"
            ok = lay.config.id == lay.ct_id and lay.ct == lay.bundle == lay.rootfs == "dir"
            assert not ok, f"refused a well-formed push: {e.message}"
        else:
            assert lay.ct == lay.bundle == lay.rootfs == "dir" and lay.config.id == lay.ct_id
            ct_dir = kind.container_dir(lay.ct_id)
            expected = dataclasses.replace(lay.config, args=list(lay.config.args))
            _check_config(expected)  # what adopt validates and fills in (the MAC)
            for f in ("id", "memory", "cpus", "pids", "ip", "gateway", "args", "cap_add", "seccomp"):
                assert getattr(expected, f) == getattr(lay.config, f), f
            assert sorted(os.listdir(ct_dir)) == ["bundle", "criu.conf", "phaul.json"]
            assert sorted(os.listdir(ct_dir / "bundle")) == ["config.json", "rootfs"]
            for p in (ct_dir / "bundle", ct_dir / "bundle" / "rootfs", ct_dir / "bundle" / "config.json",
                      ct_dir / "phaul.json", ct_dir / "criu.conf"):
                mode = p.lstat().st_mode
                assert stat.S_ISDIR(mode) or (stat.S_ISREG(mode) and p.lstat().st_nlink == 1), p
            assert json.loads((ct_dir / "bundle" / "config.json").read_text()) == kind._spec(expected, ct_dir)
            assert json.loads((ct_dir / "phaul.json").read_text()) == dataclasses.asdict(expected)
            assert (ct_dir / "criu.conf").read_text() == CRIU_CONF
            assert kind.config(lay.ct_id) == expected
            assert _shape(ct_dir / "bundle" / "rootfs") == rootfs_before, "the rootfs is the container's: left as it came"
        assert tree_hash(canary) == before, "the canary changed: a link was followed"
        assert (canary / "file").read_bytes() == b"precious"
    finally:
        shutil.rmtree(root)


# -- 2. the data channel of a real agent ------------------------------------------------------


@dataclass
class Channel:
    """A real agent, and the migration (prepared by peer1) the examples push into; a new one every few examples."""

    agent: RunningAgent
    id: str = ""
    address: str = ""
    stream: str = ""
    secret: str = ""
    uses: int = 0
    ids: list[str] = field(default_factory=list)

    def call(self, method: str, request: object) -> Any:
        a = self.agent.stub("peer1", tcp=True)
        try:
            return a.call(method, request, timeout=30)
        finally:
            a.close()

    def current(self) -> Channel:
        if not self.id or self.uses >= 10:
            self.abort()
            self.id = uuid.uuid4().hex[:12]
            reply = self.call("Prepare", pb.PrepareRequest(
                migration_id=self.id, source_name="peer1", config=pb.ContainerConfig(id=f"ct{self.id[:6]}"),
                need_bytes=256 << 20,
            ))
            self.address, self.secret, self.uses = reply.data_address, reply.secret, 0
            self.stream = self.call("OpenPageStream", pb.MigrationRef(migration_id=self.id)).address
        self.uses += 1
        return self

    def abort(self) -> None:
        if self.id:
            self.call("Abort", pb.MigrationRef(migration_id=self.id))
            assert not self.dir.exists()
            self.id = ""

    @property
    def dir(self) -> Path:
        return self.agent.state / "incoming" / self.id

    @property
    def recv(self) -> Path:
        return self.dir / "recv"

    def outside(self, areas: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
        """The agent's state directory minus `areas` of recv/: name, mode, size and mtime (logs: name and mode)."""
        skip = {str(self.recv / a) for a in areas}
        out = []
        for dirpath, dirs, files in os.walk(self.agent.state):
            dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in skip]
            for name in dirs + files:
                p = os.path.join(dirpath, name)
                st_ = os.lstat(p)
                log = name.endswith(".log") or name == "journal"
                out.append((p, st_.st_mode, 0 if log else st_.st_size, 0 if log or stat.S_ISDIR(st_.st_mode) else st_.st_mtime_ns))
        return sorted(out)

    def alive(self) -> None:
        assert self.agent.proc.poll() is None, "the agent died"
        a = self.agent.stub("peer1", tcp=True)
        try:
            a.call("Info", pb.Empty(), timeout=30)
        finally:
            a.close()


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Channel]:
    d = tmp_path_factory.mktemp("fuzzchannel")
    creds = make_pki(d, [HOST, "peer1"])
    with running_agent(d, HOST, creds, ["peer1"], ["admin"]) as a:
        c = Channel(a)
        try:
            yield c
        finally:
            c.abort()
            assert sorted(p.name for p in a.canary.rglob("*")) == ["keep.txt", "sub"]
            assert "Traceback" not in a.log(), a.log()[-3000:]


def _session(c: Channel, data: bytes) -> tuple[bytes, float]:
    """Send `data` to the page stream endpoint over TLS as the peer (socat, like TLS_RSH, but
    waiting up to 20 s for answers after our end of the stream); what came back and how long it took."""
    e = rsh_env(c.agent.creds["peer1"], c.stream, HOST, 5.0)
    address = (f"OPENSSL:{e['PHAUL_PEER']},cert={e['PHAUL_CERT']},key={e['PHAUL_KEY']},cafile={e['PHAUL_CA']},"
               f"commonname={HOST},verify=1,{e['PHAUL_TLS_OPTIONS']},nodelay")
    t0 = time.monotonic()
    proc = subprocess.run(["socat", "-t", "20", "-", address], input=data, capture_output=True, timeout=60)
    return proc.stdout, time.monotonic() - t0


_NAMES = st.one_of(
    st.sampled_from(["..", ".", "/", "a/b", "../x", "/etc/passwd", "a\0b", "a\nb", "x" * 300, "page-delta.json", "pages-1.img", ""]),
    st.text(max_size=12),
)
_SIZES = st.one_of(st.integers(0, 4096), st.sampled_from([-1, -(2**63), 2**40, 2**39, 2**64, 10**30]), st.floats(), st.text(max_size=4))
_manifest = st.one_of(
    _json_doc,
    st.builds(lambda files, recipes: {"format": 1, "files": files, "recipes": recipes},
              st.dictionaries(_NAMES, _SIZES, max_size=3),
              st.lists(st.fixed_dictionaries({"name": _NAMES, "pages": _SIZES, "basis": _NAMES, "data": _NAMES,
                                               "segments": st.lists(st.lists(_SIZES, max_size=5), max_size=3)}), max_size=2)),
)


@st.composite
def _message(draw: Any) -> bytes:
    """One page stream message: a header (mostly JSON, random names and sizes) and body bytes
    shorter, as long as or longer than declared."""
    how = draw(st.sampled_from(["json"] * 6 + ["garbage", "nested", "huge"]))
    if how == "garbage":
        return draw(st.binary(max_size=200))
    if how == "nested":
        return b'{"files": ' + b"[" * 100_000 + b"\n"
    if how == "huge":
        return b'{"files": [["' + b"a" * 300_000 + b'", 1]]}\n'
    files = draw(st.lists(st.tuples(_NAMES, _SIZES), max_size=4))
    if files and draw(st.booleans()):
        files.append(files[0])  # a duplicate
    header = json.dumps({"files": files}).encode() + b"\n"
    body = b""
    for name, size in files:
        n = size if isinstance(size, int) and 0 <= size <= 4096 else draw(st.integers(0, 64))
        if name == "page-delta.json":
            part = json.dumps(draw(_manifest)).encode()
        else:
            part = draw(st.binary(min_size=0, max_size=64)) * (n // 64 + 1)
        body += part[:n]
    cut = draw(st.sampled_from(["exact", "short", "long"]))
    if cut == "short":
        body = body[: max(0, len(body) - draw(st.integers(1, 100)))]
    elif cut == "long":
        body += draw(st.binary(min_size=1, max_size=100))
    return header + body


@settings(SETTINGS, max_examples=50)
@given(first=st.sampled_from(["right"] * 4 + ["wrong", "empty", "huge", "prefix"]), messages=st.lists(_message(), min_size=0, max_size=3))
def test_generated_page_stream_sessions_get_answers_and_write_only_the_data_areas(
    channel: Channel, first: str, messages: list[bytes],
) -> None:
    c = channel.current()
    line = {"right": c.secret, "wrong": uuid.uuid4().hex * 2, "empty": "", "huge": "a" * 100_000, "prefix": c.secret[:-1]}[first]
    outside, areas = c.outside(("delta", "images")), tree_hash(c.recv)
    canary = tree_hash(c.agent.canary)
    data, took = _session(c, line.encode() + b"\n" + b"".join(messages))
    assert took < 15, f"the page stream neither answered nor closed at the end of its input: {data[:200]!r}"
    lines = data.splitlines()
    if first != "right":
        assert all(json.loads(x) == {"ok": False, "error": "wrong or missing migration secret"} for x in lines), data[:300]
        assert tree_hash(c.recv) == areas, "a wrong secret wrote something"
    else:
        if lines:
            assert lines[0] == b"ready", data[:300]
        for x in lines[1:]:
            answer = json.loads(x)
            assert answer["ok"] is True or (answer["ok"] is False and str(answer["error"]).strip()), answer
    assert c.outside(("delta", "images")) == outside, "something outside recv/delta and recv/images changed"
    assert tree_hash(c.agent.canary) == canary
    c.alive()


@st.composite
def _source_tree(draw: Any, canary: Path) -> Path:
    src = Path(tempfile.mkdtemp(prefix="phaul-fuzz-src."))
    dirs = [src]
    for i in range(draw(st.integers(0, 8))):
        where = draw(st.sampled_from(dirs))
        name = f"{draw(st.sampled_from(['f', 'd', 'pages-', 'parent', '.x']))}{i}"
        what = draw(st.sampled_from(["file", "file", "dir", "symlink-out", "symlink-rel", "fifo", "hardlink", "dangling"]))
        p = where / name
        if what == "file":
            p.write_bytes(draw(st.binary(max_size=2048)))
        elif what == "dir":
            p.mkdir()
            dirs.append(p)
        elif what == "symlink-out":
            # not "/": with --copy-links that pushes the whole host, which the quota cuts off (tests/test_bounds.py)
            p.symlink_to(draw(st.sampled_from([canary, canary / "sub" / "keep.txt", Path("/etc")])))
        elif what == "symlink-rel":
            p.symlink_to("../" * draw(st.integers(1, 6)) + "canary")
        elif what == "fifo":
            os.mkfifo(p)
        elif what == "hardlink":
            files = [f for f in src.rglob("*") if f.is_file() and not f.is_symlink()]
            if files:
                os.link(draw(st.sampled_from(sorted(files))), p)
        elif what == "dangling":
            p.symlink_to("/nonexistent/phaul")
    return src


_RSYNC_OPTS = st.lists(
    st.sampled_from(["-a", "-r", "-l", "-D", "--specials", "--devices", "-H", "-X", "-A", "-K", "-L", "--copy-links",
                     "--delete", "-p", "-o", "-g", "--numeric-ids", "--inplace", "-c", "--safe-links", "--munge-links"]),
    min_size=1, max_size=4, unique=True,
).map(lambda o: o if any(x in o for x in ("-a", "-r")) else ["-r", *o])


def _only_files_and_dirs(area: Path) -> list[str]:
    bad = []
    for dirpath, dirs, files in os.walk(area):
        for name in dirs + files:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                bad.append(os.path.join(dirpath, name))
    return bad


@settings(SETTINGS, max_examples=40)
@given(data=st.data(), area=st.sampled_from(["images", "delta", "rounds", "ct"]), opts=_RSYNC_OPTS,
       secret=st.sampled_from(["right", "right", "right", "wrong", "none"]))
def test_generated_rsync_pushes_leave_only_files_and_directories_in_the_data_areas(
    channel: Channel, data: st.DataObject, area: str, opts: list[str], secret: str,
) -> None:
    c = channel.current()
    src = data.draw(_source_tree(c.agent.canary))
    try:
        outside, received = c.outside(("ct", "images", "delta", "rounds")), tree_hash(c.recv)
        canary = tree_hash(c.agent.canary)
        env = {**os.environ, **rsh_env(c.agent.creds["peer1"], c.address, HOST, 5.0)}
        if secret != "none":
            env["RSYNC_PASSWORD"] = c.secret if secret == "right" else "0" * 64
        proc = subprocess.run(["rsync", *opts, "-e", f"sh {TLS_RSH}", f"{src}/", f"phaul@peer::{area}/"],
                              env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if secret != "right":
            assert proc.returncode != 0 and tree_hash(c.recv) == received, (opts, proc.stderr)
        for a in ("images", "delta", "rounds"):
            assert not _only_files_and_dirs(c.recv / a), (area, opts, proc.stderr)
        assert c.outside(("ct", "images", "delta", "rounds")) == outside, "something outside recv/ changed"
        assert tree_hash(c.agent.canary) == canary
        c.alive()
    finally:
        shutil.rmtree(src)
