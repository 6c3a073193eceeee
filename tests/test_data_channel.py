"""The per-migration data channel against a real agent: real TLS (socat and
gRPC), real rsync daemons, the real page stream.

One agent runs on 127.0.0.1 with its own PKI and state directory (as in
tests/test_agent_hardening.py); `peer1` is its one peer. Each test prepares
a migration as peer1 over gRPC and pushes through the data channel it opened:
identity is the exact common name (a certificate naming peer1 in a SAN only is
refused), every channel wants the migration's secret, the data areas take
regular files and directories only, TLS is 1.2+ with AEAD ciphers, at most
`MAX_CHILDREN` connections are served at a time, and a sealed migration
serves nobody."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentlib import make_pki, running_agent
from phaul.channels import pki
from phaul.channels.client import connect
from phaul.channels.fs_sync import RsyncSender
from phaul.channels.transport import MAX_CHILDREN, TLS_RSH, Credentials, TlsEndpoint, rsh_env
from phaul.errors import InvalidInput, PhaulError, ToolFailed
from phaul.memory.page_stream import PageStream, StreamError
from phaul.migration.copies import kill_data_channel, procs_using, wait_until
from phaul.rpc import phaul_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
HOST = "hosta"


@dataclass
class Agent:
    dir: Path
    state: Path
    canary: Path
    port: int
    creds: dict[str, Credentials]

    def call(self, method: str, request: object, who: str = "peer1") -> object:
        with connect(f"127.0.0.1:{self.port}", HOST, self.creds[who]) as a:
            return a.call(method, request, timeout=30)


@dataclass
class Prepared:
    id: str
    address: str
    secret: str
    dir: Path  # STATE/incoming/<id>

    @property
    def recv(self) -> Path:
        return self.dir / "recv"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    d = tmp_path_factory.mktemp("datachannel")
    creds = make_pki(d, [HOST, "peer1"])
    cert, key = pki.issue(d / "pki", "mallory", dns=["peer1"], force=True)  # peer1 in a SAN only
    creds["mallory"] = Credentials("mallory", cert, key, creds[HOST].ca)
    with running_agent(d, HOST, creds, ["peer1"], ["admin"]) as a:
        yield Agent(d, a.state, a.canary, a.port, creds)


@pytest.fixture
def mig(agent: Agent) -> Iterator[Prepared]:
    mid = uuid.uuid4().hex[:12]
    reply = agent.call("Prepare", pb.PrepareRequest(
        migration_id=mid, source_name="peer1", config=pb.ContainerConfig(id=f"ct{mid[:6]}"), need_bytes=1 << 20,
    ))
    m = Prepared(mid, reply.data_address, reply.secret, agent.state / "incoming" / mid)  # type: ignore[attr-defined]
    try:
        yield m
    finally:
        agent.call("Abort", pb.MigrationRef(migration_id=mid))
        assert not m.dir.exists()
        assert not procs_using(m.dir)
        assert sorted(p.name for p in agent.canary.rglob("*")) == ["keep.txt", "sub"]
        assert (agent.canary / "sub" / "keep.txt").read_text() == "precious"


def _sender(agent: Agent, m: Prepared, who: str = "peer1", secret: str | None = None, bwlimit: int = 0) -> RsyncSender:
    return RsyncSender(agent.creds[who], m.address, HOST, 5.0, m.secret if secret is None else secret, bwlimit)


def _tree(tmp: Path, agent: Agent) -> Path:
    """A source directory with a file, a subdirectory, a symbolic link out to the canary and a FIFO."""
    src = tmp / "src"
    (src / "sub").mkdir(parents=True)
    (src / "pages-1.img").write_bytes(b"p" * 8192)
    (src / "sub" / "core.img").write_bytes(b"c")
    (src / "out").symlink_to(agent.canary)
    os.mkfifo(src / "fifo")
    return src


def _rsync_raw(agent: Agent, m: Prepared, flags: list[str], src: Path, area: str) -> subprocess.CompletedProcess[str]:
    """rsync as a rogue source would run it: any options, the right identity and secret."""
    env = {**os.environ, **rsh_env(agent.creds["peer1"], m.address, HOST, 5.0), "RSYNC_PASSWORD": m.secret}
    return subprocess.run(
        ["rsync", *flags, "-e", f"sh {TLS_RSH}", f"{src}/", f"phaul@peer::{area}/"], env=env, capture_output=True, text=True,
    )


def test_prepare_gives_a_secret_and_the_agent_owned_layout(agent: Agent, mig: Prepared) -> None:
    assert len(mig.secret) == 64 and int(mig.secret, 16)
    assert stat.S_IMODE(mig.dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in mig.recv.iterdir()) == ["ct", "delta", "images", "rounds"]
    assert stat.S_IMODE((mig.dir / "secret").stat().st_mode) == 0o600
    assert (mig.dir / "rsyncd.conf").exists() and not (mig.recv / "rsyncd.conf").exists()
    for pid in os.listdir("/proc"):  # never in an argument list
        try:
            assert mig.secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            pass


def test_each_area_receives_and_the_data_areas_take_only_files_and_directories(
    agent: Agent, mig: Prepared, tmp_path: Path,
) -> None:
    src = _tree(tmp_path, agent)
    for area in ("images", "delta", "rounds"):
        _sender(agent, mig).push(src, area)
        got = sorted(str(p.relative_to(mig.recv / area)) for p in (mig.recv / area).rglob("*"))
        assert got == ["pages-1.img", "sub", "sub/core.img"], area
        # the options that would make links, devices or FIFOs are refused, whatever the client sends
        for flags in (["-a"], ["-rl"], ["-rD"], ["-r", "--specials"], ["-rH"], ["-rX"], ["-rK"]):
            proc = _rsync_raw(agent, mig, flags, src, area)
            assert proc.returncode == 4, (area, flags, proc)  # rsync: "requested action not supported"
        assert not [p for p in (mig.recv / area).rglob("*") if p.is_symlink() or not (p.is_file() or p.is_dir())]
    # the container's directory keeps what a root file system needs
    proc = _rsync_raw(agent, mig, ["-aH", "--numeric-ids"], src, "ct")
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(mig.recv / "ct" / "out") == str(agent.canary)
    assert stat.S_ISFIFO((mig.recv / "ct" / "fifo").lstat().st_mode)


def test_a_certificate_naming_the_peer_in_a_san_only_is_refused(agent: Agent, mig: Prepared, tmp_path: Path) -> None:
    src = _tree(tmp_path, agent)
    with pytest.raises(ToolFailed):
        _sender(agent, mig, who="mallory").push(src, "images")
    assert not list((mig.recv / "images").iterdir())
    assert "refused a certificate with CN 'mallory'" in (mig.dir / "data-channel.log").read_text()
    _sender(agent, mig).push(src, "images")  # the real peer still can
    assert (mig.recv / "images" / "pages-1.img").exists()


@pytest.mark.parametrize("secret", ["", "0" * 64, "wrong"])
def test_rsync_needs_the_migration_secret(agent: Agent, mig: Prepared, tmp_path: Path, secret: str) -> None:
    src = _tree(tmp_path, agent)
    for area in ("ct", "images", "delta"):
        with pytest.raises(ToolFailed, match=r"exit 5\)"):  # rsync's daemon authentication failed
            _sender(agent, mig, secret=secret).push(src, area)
        assert not list((mig.recv / area).iterdir())
    _sender(agent, mig).push(src, "images")  # with it, the push goes through
    assert (mig.recv / "images" / "pages-1.img").exists()


def _page_stream_env(agent: Agent, mig: Prepared) -> dict[str, str]:
    reply = agent.call("OpenPageStream", pb.MigrationRef(migration_id=mig.id))
    return {**os.environ, **rsh_env(agent.creds["peer1"], reply.address, HOST, 5.0)}  # type: ignore[attr-defined]


@pytest.mark.parametrize("secret", ["", "0" * 64])
def test_the_page_stream_needs_the_migration_secret(agent: Agent, mig: Prepared, secret: str) -> None:
    env = _page_stream_env(agent, mig)
    with pytest.raises(StreamError, match="wrong or missing migration secret"):
        PageStream(env, secret, timeout=10)
    assert not list((mig.recv / "delta").iterdir())
    PageStream(env, mig.secret, timeout=10).close()  # with it, the stream is ready


def _tls_context(agent: Agent, who: str = "peer1") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(agent.creds[who].cert, agent.creds[who].key)
    ctx.load_verify_locations(agent.creds[who].ca)
    ctx.check_hostname = False
    return ctx


def _s_client(agent: Agent, address: str, *opts: str) -> tuple[bool, str]:
    c = agent.creds["peer1"]
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", address, "-cert", str(c.cert), "-key", str(c.key), "-CAfile", str(c.ca), *opts],
        input="", capture_output=True, text=True, timeout=30,
    )
    out = proc.stdout + proc.stderr
    line = next((x for x in out.splitlines() if x.startswith("New, ")), "")
    return "Cipher is (NONE)" not in line and bool(line), line


def test_only_tls12_or_later_with_aead_ciphers(agent: Agent, mig: Prepared) -> None:
    stream = agent.call("OpenPageStream", pb.MigrationRef(migration_id=mig.id)).address  # type: ignore[attr-defined]
    for address in (f"127.0.0.1:{agent.port}", mig.address, stream):
        assert _s_client(agent, address, "-tls1_1", "-cipher", "ALL:@SECLEVEL=0")[0] is False, address
        for cbc in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256"):
            ok, line = _s_client(agent, address, "-tls1_2", "-cipher", cbc)
            assert not ok, (address, cbc, line)
        grpc_port = address.endswith(f":{agent.port}")  # gRPC's own TLS 1.2 suites: ECDHE with AES-GCM only
        for aead in ("ECDHE-ECDSA-AES128-GCM-SHA256", *(() if grpc_port else ("ECDHE-ECDSA-CHACHA20-POLY1305",))):
            ok, line = _s_client(agent, address, "-tls1_2", "-cipher", aead)
            assert ok and aead in line, (address, aead, line)
        ok, line = _s_client(agent, address)
        assert ok and "TLSv1.3" in line, (address, line)


def _connect(agent: Agent, address: str, timeout: float) -> ssl.SSLSocket | None:
    """A TLS connection to the rsync endpoint that got the daemon's greeting within `timeout`, else None."""
    host, _, port = address.rpartition(":")
    raw = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        s = _tls_context(agent).wrap_socket(raw)
        if s.recv(64).startswith(b"@RSYNCD:"):
            return s
        s.close()
    except (TimeoutError, OSError):
        raw.close()
    return None


def test_no_more_than_max_children_connections_are_served_at_once(agent: Agent, mig: Prepared) -> None:
    served = [c for c in (_connect(agent, mig.address, 3.0) for _ in range(MAX_CHILDREN + 2)) if c is not None]
    try:
        assert len(served) == MAX_CHILDREN
        served.pop().close()  # one ends: the next is served
        late = _connect(agent, mig.address, 5.0)
        assert late is not None
        served.append(late)
    finally:
        for c in served:
            c.close()


def test_a_sealed_migration_refuses_pushes_and_sealing_ends_live_connections(
    agent: Agent, mig: Prepared, tmp_path: Path,
) -> None:
    src = _tree(tmp_path, agent)
    (mig.dir / "sealed").touch()  # as Destination.seal does
    with pytest.raises(ToolFailed):
        _sender(agent, mig).push(src, "images")
    assert not list((mig.recv / "images").iterdir())
    assert "the migration is sealed" in (mig.dir / "data-channel.log").read_text()
    (mig.dir / "sealed").unlink()

    # ApplyPages seals: a connection held open meanwhile is ended; it unseals after
    held = _connect(agent, mig.address, 3.0)
    assert held is not None
    try:
        agent.call("ApplyPages", pb.ApplyPagesRequest(migration_id=mig.id))
    except PhaulError:
        pass  # nothing to apply: the seal came first all the same
    held.settimeout(5)
    assert held.recv(64) == b""
    held.close()
    assert not (mig.dir / "sealed").exists()
    _sender(agent, mig).push(src, "images")

    # ... except a push already writing the container's directory (a pre-copy round's file
    # system sync runs beside the memory transfer): it goes on, while one into images/ ends
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(3 << 20))
    with ThreadPoolExecutor(2) as pool:
        slow = {area: pool.submit(_sender(agent, mig, bwlimit=1 << 20).push, big, area) for area in ("ct", "images")}
        deadline = time.monotonic() + 10
        while len([p for p in procs_using(mig.dir) if Path(f"/proc/{p}/root").resolve() == mig.recv / "ct"]) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        try:
            agent.call("ApplyPages", pb.ApplyPagesRequest(migration_id=mig.id))
        except PhaulError:
            pass
        assert slow["ct"].result().bytes_sent > 3 << 20
        with pytest.raises(ToolFailed):
            slow["images"].result()
    assert (mig.recv / "ct" / "blob").read_bytes() == (big / "blob").read_bytes()

    # Restore seals for good and closes both endpoints before it reads anything
    env = _page_stream_env(agent, mig)
    stream = PageStream(env, mig.secret, timeout=10)
    with pytest.raises(PhaulError, match="never arrived"):
        agent.call("Restore", pb.MigrationRef(migration_id=mig.id))
    assert (mig.dir / "sealed").exists()
    assert stream.proc.wait(10) is not None
    stream.close()
    with pytest.raises(ToolFailed):
        _sender(agent, mig).push(src, "images")
    with pytest.raises(StreamError):
        PageStream(env, mig.secret, timeout=5)


def test_the_destination_makes_the_soft_dirty_parent_links(tmp_path: Path) -> None:
    """CRIU's `parent` links are never received (the data areas take none): Restore makes them."""
    from phaul.migration import dest

    m = dest.Incoming("m1", "ct1", "peer1", tmp_path)
    for d in (m.images_dir, *(m.rounds_dir / str(k) for k in (1, 2, 3))):
        d.mkdir(parents=True)
    dest._link_parents(m)
    assert os.readlink(m.images_dir / "parent") == "../rounds/3"
    assert [os.readlink(m.rounds_dir / k / "parent") for k in ("2", "3")] == ["../1", "../2"]
    assert not (m.rounds_dir / "1" / "parent").exists()
    assert (m.images_dir / "parent").resolve() == (m.rounds_dir / "3").resolve()
    (m.images_dir / "parent").unlink()
    (m.images_dir / "parent").write_text("pushed")  # a source that sends one anyway
    for k in ("2", "3"):
        (m.rounds_dir / k / "parent").unlink()
    with pytest.raises(ToolFailed, match="parent"):
        dest._link_parents(m)


def test_a_dead_agents_data_channel_is_found_by_its_directory(tmp_path: Path) -> None:
    """An endpoint's commands name their files relative to the migration directory they
    run in (socat's address must stay short), so recovery finds the listener of a dead
    agent's migration by its working directory, not by its command line."""
    creds = make_pki(tmp_path / "pki", ["hosta", "peer1"])
    mdir = tmp_path / "incoming" / "m1"
    mdir.mkdir(parents=True)
    endpoint = TlsEndpoint(creds["hosta"], "127.0.0.1", "peer1", ["cat", mdir / "nothing"], 5.0, mdir / "sealed", mdir)
    endpoint.open(mdir / "data-channel.log")
    try:
        assert str(mdir).encode() not in Path(f"/proc/{endpoint.pid}/cmdline").read_bytes()
        assert procs_using(mdir) == [endpoint.pid]
        (mdir / "data-channel.pid").write_text(f"{endpoint.pid}\n")  # as Prepare does
        kill_data_channel(mdir)
        assert wait_until(lambda: not procs_using(mdir), 5.0)
    finally:
        endpoint.close()
    with pytest.raises(InvalidInput, match="outside its working directory"):
        TlsEndpoint(creds["hosta"], "127.0.0.1", "peer1", ["cat", tmp_path / "x"], 5.0, mdir / "sealed", mdir)
    with pytest.raises(InvalidInput, match="longer than socat"):
        TlsEndpoint(creds["hosta"], "127.0.0.1", "peer1", ["cat", "x" * 600], 5.0, mdir / "sealed", mdir)
