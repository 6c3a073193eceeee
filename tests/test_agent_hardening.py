"""A running agent against malformed, oversized and hostile requests.

The agent runs as in production (mutual TLS, a unix socket and TCP on
127.0.0.1, its own PKI and state directory, peers and admins configured). A
property-based test sends it random requests to every method from an admin,
a peer and a stranger: it never crashes, answers each with a clear error,
and never touches a path outside its state directory (symbolic links into a
canary directory are planted inside it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentlib import RunningAgent, make_pki, running_agent
from phaul.channels import pki
from phaul.channels.transport import Credentials
from phaul.rpc import phaul_pb2 as pb
from phaul.testing import faults
HOST = "hosta"
OK_CODES = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SERVICE = pb.DESCRIPTOR.services_by_name["Agent"]
PEER_ONLY = {"Prepare", "HoldTraffic", "ApplyPages", "KeepBasis", "OpenPageStream", "Restore", "Resume", "Abort", "Finish", "MigrationStatus",
             "MigrationDecision", "PeerCheck", "KeepStandby", "DropStandby", "FenceStandby"}
ANY = {"Info", "StandbyList"}  # admins and peers (a peer sees only what concerns it)
# Values that reach deeper than random text: names the agent knows, paths that try to escape.
HOSTILE = [
    "", ".", "..", "../..", "../../canary", "/etc/passwd", "a/b", "evil", "evilm", "ct1", "ct2", "peer1", HOST,
    "admin", "x" * 63, "x" * 64, "x" * 5000, "a\0b", "\u00e9t\u00e9", "-rf", "--help", "$(touch /tmp/pwned)",
    "`id`", "; rm -rf /", "127.0.0.1:1", "127.0.0.1:99999", "10.213.99.5/24", "02:00:00:00:00:01", "ct1\n",
    "/bin/true", "echo", "busybox", "4.2.1", "restore:fail", "commit:kill-agent", "keep", "auto", "off",
]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    d = tmp_path_factory.mktemp("hardening")
    creds = make_pki(d, [HOST, "peer1", "admin", "stranger"])
    other = d / "other-pki"  # a certificate from another CA, with an allowed name
    pki.init_ca(other, "mallory CA")
    cert, key = pki.issue(other, "admin")
    creds["mallory"] = Credentials("admin", cert, key, creds[HOST].ca)
    state, canary = d / "state", d / "canary"
    for p in (state / "containers", state / "migrations", state / "incoming", canary / "sub"):
        p.mkdir(parents=True)
    (canary / "phaul.json").write_text('{"id": "evil"}')
    (state / "containers" / "evil").symlink_to(canary)
    (state / "migrations" / "evilm").symlink_to(canary)
    (state / "incoming" / "evilm").symlink_to(canary)
    with running_agent(d, HOST, creds, ["peer1"], ["admin"]) as a:
        yield a


# -- requests --------------------------------------------------------------------------

_INT_RANGES = {
    3: (-(2**63), 2**63 - 1), 18: (-(2**63), 2**63 - 1), 5: (-(2**31), 2**31 - 1),
    4: (0, 2**64 - 1), 13: (0, 2**32 - 1),
}
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
_strings = st.one_of(st.sampled_from(HOSTILE), _text)


def _field_strategy(fd: Any, depth: int) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == fd.TYPE_STRING:
        s: st.SearchStrategy[Any] = _strings
    elif t == fd.TYPE_BYTES:
        s = st.one_of(st.binary(max_size=64), st.just(b"\x00" * 70_000))
    elif t == fd.TYPE_BOOL:
        s = st.booleans()
    elif t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        s = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32 if t == fd.TYPE_FLOAT else 64),
                      st.sampled_from([0.0, 1.0, 1e9, -1.0]))
    elif t == fd.TYPE_MESSAGE:
        if fd.message_type.GetOptions().map_entry:
            return st.dictionaries(_strings, st.floats(allow_nan=False), max_size=3)
        s = _message_strategy(fd.message_type, depth + 1)
    else:
        lo, hi = _INT_RANGES.get(t, (0, 2**32 - 1))
        s = st.one_of(st.integers(lo, hi), st.sampled_from([0, 1, lo, hi]))
    if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:
        return st.one_of(st.lists(s, max_size=4), st.lists(s, min_size=300, max_size=300)) if t != fd.TYPE_MESSAGE else st.lists(s, max_size=2)
    return s


def _message_strategy(desc: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = getattr(pb, desc.name)
    if depth > 2:
        return st.just(cls())
    fields = {fd.name: _field_strategy(fd, depth) for fd in desc.fields}
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: cls(**kw))


_calls = st.sampled_from(list(SERVICE.methods)).flatmap(
    lambda m: st.tuples(st.just(m), _message_strategy(m.input_type), st.sampled_from(["admin", "peer1", "stranger", "mallory"]))
)


def _call(agent: RunningAgent, method: Any, request: Any, who: str) -> tuple[grpc.StatusCode, str]:
    a = agent.stub(who)
    try:
        fn = getattr(a.stub, method.name)
        if method.server_streaming:
            for _ in fn(request, timeout=60):
                pass
        else:
            fn(request, timeout=60)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    finally:
        a.close()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(call=_calls)
def test_hostile_requests_get_clear_errors_and_nothing_escapes(agent: RunningAgent, call: tuple[Any, Any, str]) -> None:
    method, request, who = call
    before = agent.snapshot()
    code, details = _call(agent, method, request, who)
    if method.name == "SetPeers" and code == grpc.StatusCode.OK:  # an admin changed the fixture's peers: put them back
        assert _call(agent, method, pb.SetPeersRequest(peers=["peer1"]), "admin")[0] == grpc.StatusCode.OK
    assert agent.proc.poll() is None, "the agent died"
    if who == "stranger":
        assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, code, details)
    elif who == "mallory":  # another CA: the TLS handshake fails
        assert code == grpc.StatusCode.UNAVAILABLE, (method.name, code, details)
        return
    assert code in OK_CODES, f"{method.name} from {who}: {code} {details}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{method.name} from {who}: {code} without a message"
    if who == "peer1" and method.name not in PEER_ONLY | ANY:
        assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, code, details)
    if who == "admin" and method.name in PEER_ONLY:
        assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, code, details)
    assert agent.snapshot() == before, "the agent touched the canary outside its state directory"
    assert list(agent.cwd.iterdir()) == [], "the agent wrote into its working directory"


def test_certificate_from_another_ca_is_refused(agent: RunningAgent) -> None:
    code, details = _call(agent, SERVICE.methods_by_name["Info"], pb.Empty(), "mallory")
    assert code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no call reaches the agent


def test_roles_are_kept_apart(agent: RunningAgent) -> None:
    info = SERVICE.methods_by_name["Info"]
    assert _call(agent, info, pb.Empty(), "admin")[0] == grpc.StatusCode.OK
    assert _call(agent, info, pb.Empty(), "peer1")[0] == grpc.StatusCode.OK
    code, details = _call(agent, info, pb.Empty(), "stranger")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "stranger" in details
    code, details = _call(agent, SERVICE.methods_by_name["ExecContainer"], pb.ExecRequest(id="ct1", args=["id"]), "peer1")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    code, _ = _call(agent, SERVICE.methods_by_name["Abort"], pb.MigrationRef(migration_id="m1"), "admin")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # aborting and following migrations are the admins': a peer is refused, an unknown ID named
    code, details = _call(agent, SERVICE.methods_by_name["AbortMigration"], pb.AbortRequest(migration_id="m1"), "peer1")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    code, details = _call(agent, SERVICE.methods_by_name["AbortMigration"], pb.AbortRequest(migration_id="m1"), "admin")
    assert code == grpc.StatusCode.NOT_FOUND and "no migration m1" in details
    code, details = _call(agent, SERVICE.methods_by_name["FollowMigration"], pb.FollowRequest(), "admin")
    assert code == grpc.StatusCode.NOT_FOUND and "no migration runs" in details
    # a peer may only act on the migrations it takes part in, and only as the source it claims to be
    prep = pb.PrepareRequest(migration_id="m1", source_name=HOST, config=pb.ContainerConfig(id="ct9"))
    code, details = _call(agent, SERVICE.methods_by_name["Prepare"], prep, "peer1")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not the source" in details
    migrate = pb.MigrateRequest(ct_id="ct1", dest_name="elsewhere", dest_address="127.0.0.1:1")
    code, details = _call(agent, SERVICE.methods_by_name["Migrate"], migrate, "admin")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "--peers" in details
    # fault injection is for tests only: no request can name a fault, and the production agent
    # (no step hook) leaves a fault armed in its state directory alone
    assert "fault" not in pb.MigrateRequest.DESCRIPTOR.fields_by_name
    armed = faults.arm(agent.state, "preflight:fail")
    try:
        migrate = pb.MigrateRequest(ct_id="ct1", dest_name="peer1", dest_address="127.0.0.1:1")
        code, details = _call(agent, SERVICE.methods_by_name["Migrate"], migrate, "admin")
        assert code != grpc.StatusCode.OK and "injected fault" not in details and armed.exists(), (code, details)
    finally:
        armed.unlink()


def test_paths_from_the_wire_stay_in_the_state_directory(agent: RunningAgent) -> None:
    before = agent.snapshot()
    for method, request in (
        ("DestroyContainer", pb.ContainerRef(id="evil")),
        ("StopContainer", pb.ContainerRef(id="evil")),
        ("CreateContainer", pb.ContainerConfig(id="evil")),
        ("ExecContainer", pb.ExecRequest(id="evil", args=["true"])),
        ("DestroyContainer", pb.ContainerRef(id="../canary")),
        ("Recover", pb.RecoverRequest(migration_id="../../canary")),
    ):
        code, details = _call(agent, SERVICE.methods_by_name[method], request, "admin")
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
    for method in ("Abort", "Finish", "MigrationStatus", "Restore"):
        code, details = _call(agent, SERVICE.methods_by_name[method], pb.MigrationRef(migration_id="evilm"), "peer1")
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
    assert agent.snapshot() == before
    assert (agent.canary / "sub" / "keep.txt").read_text() == "precious"


def test_oversized_and_malformed_messages(agent: RunningAgent) -> None:
    code, details = _call(agent, SERVICE.methods_by_name["ExecContainer"], pb.ExecRequest(id="ct1", args=["x" * 2_000_000]), "admin")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    code, details = _call(agent, SERVICE.methods_by_name["ExecContainer"], pb.ExecRequest(id="ct1", args=["a"] * 1000), "admin")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "entries" in details
    # raw bytes that are not a protobuf message at all
    a = agent.stub("admin")
    try:
        raw = a.channel.unary_unary("/phaul.v1.Agent/CreateContainer", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff\xff garbage", timeout=10)
        assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)  # refused by gRPC itself
    finally:
        a.close()
    assert agent.proc.poll() is None
    assert _call(agent, SERVICE.methods_by_name["Info"], pb.Empty(), "admin")[0] == grpc.StatusCode.OK


def test_well_formed_requests_still_work(agent: RunningAgent) -> None:
    """The same agent serves its admin: the checks refuse the hostile, not the ordinary."""
    m = SERVICE.methods_by_name
    assert _call(agent, m["CreateContainer"], pb.ContainerConfig(id="okct", memory=64 << 20), "admin")[0] == grpc.StatusCode.OK
    try:
        assert _call(agent, m["StartContainer"], pb.StartRequest(id="okct"), "admin")[0] == grpc.StatusCode.OK
        a = agent.stub("admin")
        try:
            r = a.call("ExecContainer", pb.ExecRequest(id="okct", args=["echo", "hello"], timeout=10))
        finally:
            a.close()
        assert r.returncode == 0 and r.stdout == b"hello\n"
        code, details = _call(agent, m["Check"], pb.CheckRequest(ct_id="okct", dest_name="peer1", dest_address="127.0.0.1:1"), "admin")
        assert code == grpc.StatusCode.OK, details
    finally:
        assert _call(agent, m["DestroyContainer"], pb.ContainerRef(id="okct"), "admin")[0] == grpc.StatusCode.OK


def test_revoked_certificates_are_refused_without_a_restart(agent: RunningAgent) -> None:
    """The agent's certificate lives beside its CA, so it checks that directory's revoked.txt
    on every call; `phaul pki revoke` takes effect at once, and only for the revoked."""
    info, pki_dir = SERVICE.methods_by_name["Info"], agent.dir / "pki"
    revoked = pki_dir / "revoked.txt"
    try:
        assert _call(agent, info, pb.Empty(), "admin")[0] == grpc.StatusCode.OK
        admin_serial = x509.load_pem_x509_certificate(agent.creds["admin"].cert.read_bytes()).serial_number
        assert pki.revoke(pki_dir, f"{admin_serial:x}") == [f"{admin_serial:X}"]
        code, details = _call(agent, info, pb.Empty(), "admin")
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details and f"{admin_serial:X}" in details
        assert _call(agent, info, pb.Empty(), "peer1")[0] == grpc.StatusCode.OK  # not revoked: still served
        assert pki.revoke(pki_dir, "peer1")  # by name: every certificate issued to peer1
        code, details = _call(agent, SERVICE.methods_by_name["MigrationStatus"], pb.MigrationRef(migration_id="m1"), "peer1")
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details
        pki.issue(pki_dir, "admin")  # a new certificate, a new serial: the admin is back
        assert _call(agent, info, pb.Empty(), "admin")[0] == grpc.StatusCode.OK
        assert _call(agent, info, pb.Empty(), "peer1")[0] == grpc.StatusCode.PERMISSION_DENIED
    finally:
        revoked.unlink(missing_ok=True)
    assert _call(agent, info, pb.Empty(), "peer1")[0] == grpc.StatusCode.OK  # the list is gone: re-read, empty
    assert agent.proc.poll() is None
