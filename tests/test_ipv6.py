"""IPv6 and host names end to end (phaul.endpoint).

- The parser: good and bad HOST:PORT inputs and their messages; `--listen` on a
  wildcard without `--advertise` is refused before anything changes.
- A real agent (tests/agentlib.py) on [::1]: gRPC with mutual TLS, the CLI through a
  hosts file, an rsync data channel and the page stream, all over IPv6; one on the host
  name `localhost` (resolved through this machine's /etc/hosts, which the tests do not
  edit: it names 127.0.0.1 only, so no IPv6 host name is tried); one on 0.0.0.0 that
  advertises 127.0.0.1; one whose state directory is hundreds of characters deep.
- In the lab: the IPv6 lab (`up(ipv6=True)`) with the hosts' IPv4 addresses removed, so
  the agents have nothing but IPv6 between them: a running container goes alpha -> beta
  and back with pre-copy, and alpha -> beta with post-copy; memory and counter verified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import COUNT_STEP, TEST_SUBNET, Lab, wait_for
from test_precopy import _verify_memory

from agentlib import RunningAgent, make_pki, running_agent
from phaul.channels.client import connect
from phaul.channels.fs_sync import RsyncSender
from phaul.channels.transport import rsh_env
from phaul.endpoint import HostKind, agent_endpoints, parse_endpoint
from phaul.errors import InvalidInput, Unreachable
from phaul.hosts import read_hosts
from phaul.memory.page_stream import PageStream, StreamError
from phaul.rpc import phaul_pb2 as pb
from phaul.testing import lab as lab_mod

REPO = Path(__file__).resolve().parents[1]
HOST = "hosta"

# --- the parser ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "canonical", "target", "kind"), [
    ("10.213.0.11:7473", "10.213.0.11:7473", "ipv4:10.213.0.11:7473", HostKind.IPV4),
    ("[::1]:7473", "[::1]:7473", "ipv6:[::1]:7473", HostKind.IPV6),
    ("[FD00:7068:0::11]:1", "[fd00:7068::11]:1", "ipv6:[fd00:7068::11]:1", HostKind.IPV6),
    ("localhost:65535", "localhost:65535", "dns:localhost:65535", HostKind.NAME),
    ("Alpha.Example.NET.:7473", "alpha.example.net:7473", "dns:alpha.example.net:7473", HostKind.NAME),
    ("0.0.0.0:7473", "0.0.0.0:7473", "ipv4:0.0.0.0:7473", HostKind.IPV4),
    ("[::]:7473", "[::]:7473", "ipv6:[::]:7473", HostKind.IPV6),
])
def test_parse_good(text: str, canonical: str, target: str, kind: HostKind) -> None:
    ep = parse_endpoint(text)
    assert (str(ep), ep.grpc_target, ep.kind) == (canonical, target, kind)
    assert parse_endpoint(str(ep)) == ep  # the canonical form parses to the same endpoint
    assert ep.is_wildcard == (ep.host in ("0.0.0.0", "::"))


@pytest.mark.parametrize(("text", "problem", "fix"), [
    ("", "is empty", "HOST:PORT"),
    ("fd00::11", "IPv6 address needs brackets", "[fd00:7068::11]:7473"),
    ("::1:7473", "IPv6 address needs brackets", "[ADDRESS]:PORT"),
    ("[::1", "unbalanced brackets", "[ADDRESS]:PORT"),
    ("[::1]", "has no port", "[::1]:7473"),
    ("[10.0.0.1]:80", "is not an IPv6 address", "brackets are for IPv6"),
    ("10.0.0.1", "has no port", "10.0.0.1:7473"),
    ("10.0.0.1:0", "invalid port '0'", "from 1 to 65535"),
    ("10.0.0.1:65536", "invalid port '65536'", "from 1 to 65535"),
    ("10.0.0.1:http", "invalid port 'http'", "from 1 to 65535"),
    ("1.2.3:80", "not a valid IPv4 address", "four numbers"),
    ("256.1.1.1:80", "not a valid IPv4 address", "four numbers"),
    ("a_b:80", "neither an IP address nor a valid host name", "letters, digits and '-'"),
    ("-alpha:80", "neither an IP address nor a valid host name", "letters, digits and '-'"),
    (":80", "no host before the port", "HOST:PORT"),
    (" alpha:80", "white space", "HOST:PORT"),
    ("[fe80::1%eth0]:80", "has a scope", "unique-local"),
    ("[::ffff:10.0.0.1]:80", "IPv4-mapped", "10.0.0.1"),
])
def test_parse_bad(text: str, problem: str, fix: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_endpoint(text, "--listen")
    assert problem in e.value.message and fix in e.value.hint, (e.value.message, e.value.hint)
    assert "--listen" in e.value.message


def test_agent_endpoints() -> None:
    assert agent_endpoints("[fd00:7068::11]:7473") == (parse_endpoint("[fd00:7068::11]:7473"),) * 2
    bind, told = agent_endpoints("0.0.0.0:7473", "alpha.example.net")
    assert (str(bind), str(told)) == ("0.0.0.0:7473", "alpha.example.net:7473")  # the listen port by default
    assert str(agent_endpoints("[::]:7473", "[fd00:7068::11]:8000")[1]) == "[fd00:7068::11]:8000"
    for wildcard in ("0.0.0.0:7473", "[::]:7473"):
        with pytest.raises(InvalidInput) as e:
            agent_endpoints(wildcard)
        assert "peers cannot dial back" in e.value.message and "--advertise" in e.value.hint
    with pytest.raises(InvalidInput, match="--advertise .* is a wildcard"):
        agent_endpoints("0.0.0.0:7473", "[::]")
    # a configuration file names its own keys in the messages
    with pytest.raises(InvalidInput) as e:
        agent_endpoints("0.0.0.0:1", listen_what="listen", advertise_what="advertise")
    assert e.value.message.startswith("listen 0.0.0.0:1") and "add advertise" in e.value.hint


def test_resolution() -> None:
    assert parse_endpoint("localhost:7473").resolve() == parse_endpoint("127.0.0.1:7473")
    assert parse_endpoint("[::1]:7473").resolve() == parse_endpoint("[::1]:7473")  # an address is kept
    with pytest.raises(Unreachable, match="cannot resolve host name 'no-such-host.invalid'"):
        parse_endpoint("no-such-host.invalid:7473").resolve()
    # socat is given the address, never the name
    env = rsh_env(_dummy_creds(), "localhost:7000", "beta", 5.0)
    assert env["PHAUL_PEER"] == "127.0.0.1:7000"
    assert rsh_env(_dummy_creds(), "[fd00:7068::12]:7000", "beta", 5.0)["PHAUL_PEER"] == "[fd00:7068::12]:7000"


def _dummy_creds():  # type: ignore[no-untyped-def]
    from phaul.channels.transport import Credentials

    return Credentials("alpha", Path("/nonexistent/a.crt"), Path("/nonexistent/a.key"), Path("/nonexistent/ca.crt"))


def test_hosts_file_addresses(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": {
        "alpha": {"address": "10.213.0.11:7473"},
        "beta": {"address": "[FD00:7068::12]:7474"},
        "gamma": {"address": "Gamma.Example.net:7475"},
    }}))
    hf = read_hosts(path)
    assert [(h.address, h.ip, h.port) for h in hf.hosts.values()] == [
        ("10.213.0.11:7473", "10.213.0.11", 7473),
        ("[fd00:7068::12]:7474", "fd00:7068::12", 7474),
        ("gamma.example.net:7475", "gamma.example.net", 7475),
    ]
    path.write_text(json.dumps({"hosts": {"beta": {"address": "fd00:7068::12:7474"}}}))
    with pytest.raises(InvalidInput) as e:
        read_hosts(path)
    assert f"hosts file {path}: the address of host 'beta'" in e.value.message and "needs brackets" in e.value.message


@pytest.mark.parametrize("listen", ["0.0.0.0:7473", "[::]:7473"])
def test_wildcard_listen_without_advertise_is_refused(tmp_path: Path, listen: str) -> None:
    creds = make_pki(tmp_path, [HOST, "admin"])
    me, state = creds[HOST], tmp_path / "state"
    proc = subprocess.run(
        [sys.executable, "-m", "phaul", "agent", "--name", HOST, "--listen", listen, "--state-dir", str(state),
         "--cert", str(me.cert), "--key", str(me.key), "--ca", str(me.ca), "--admins", "admin"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    assert f"--listen {listen} is every address of this host" in proc.stderr, proc.stderr
    assert "add --advertise" in proc.stderr and "Traceback" not in proc.stderr
    assert not state.exists()  # refused before anything changed


# --- a real agent on [::1], on a host name, on a wildcard -------------------------------


def _admin_cli(tmp_path: Path, agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI through a hosts file naming the agent's TCP address (no socket)."""
    path = tmp_path / "hosts.json"
    admin = agent.creds["admin"]
    path.write_text(json.dumps({
        "pki": {"ca": str(admin.ca), "cert": str(admin.cert), "key": str(admin.key)},
        "hosts": {HOST: {"address": agent.address}},
    }))
    return subprocess.run(
        [sys.executable, "-m", "phaul", "--hosts-file", str(path), "--host", HOST, *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _push_through_data_channel(tmp_path: Path, agent: RunningAgent, dial_host: str) -> None:
    """Prepare a migration as peer1 and push a file and open the page stream, dialing the
    agent's data channels at `dial_host` (the source's way: the agent's address, its port)."""
    mid = uuid.uuid4().hex[:12]
    with connect(f"{dial_host}:{agent.port}", HOST, agent.creds["peer1"]) as peer:
        reply = peer.call("Prepare", pb.PrepareRequest(
            migration_id=mid, source_name="peer1", config=pb.ContainerConfig(id=f"ct{mid[:6]}"), need_bytes=1 << 20,
        ))
        try:
            data = parse_endpoint(f"{dial_host}:{agent.port}").with_port(parse_endpoint(reply.data_address).port)
            src = tmp_path / f"src-{mid}"
            src.mkdir()
            (src / "pages-1.img").write_bytes(b"v6" * 4096)
            stats = RsyncSender(agent.creds["peer1"], str(data), HOST, 5.0, reply.secret).push(src, "images")
            assert stats.bytes_sent > 0
            received = agent.state / "incoming" / mid / "recv" / "images" / "pages-1.img"
            assert received.read_bytes() == b"v6" * 4096
            stream = peer.call("OpenPageStream", pb.MigrationRef(migration_id=mid)).address
            at = data.with_port(parse_endpoint(stream).port)
            try:
                PageStream({**os.environ, **rsh_env(agent.creds["peer1"], str(at), HOST, 5.0)}, reply.secret, timeout=10).close()
            except StreamError as e:
                endpoint_log = agent.state / "incoming" / mid / "page-stream.log"
                said = endpoint_log.read_text(errors="replace") if endpoint_log.exists() else "(no endpoint log)"
                raise AssertionError(f"{e}; the endpoint {stream} (dialed at {at}) logged: {said}") from None
        finally:
            peer.call("Abort", pb.MigrationRef(migration_id=mid))


def _listening(pid: int, port: int) -> dict[str, bool]:
    """Whether process `pid`'s network namespace has a listener on `port` in tcp and tcp6."""
    found = {}
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        found[table] = any(f[1].endswith(f":{port:04X}") and f[3] == "0A" for f in (line.split() for line in lines))
    return found


def test_agent_on_ipv6_loopback(tmp_path: Path) -> None:
    creds = make_pki(tmp_path, [HOST, "peer1", "admin"])
    with running_agent(tmp_path / "a", HOST, creds, ["peer1"], ["admin"], host="[::1]") as agent:
        assert agent.address == f"[::1]:{agent.port}"
        assert _listening(agent.proc.pid, agent.port) == {"tcp": False, "tcp6": True}
        with connect(agent.address, HOST, creds["admin"]) as a:
            assert a.call("Info", pb.Empty()).address == agent.address
        cli = _admin_cli(tmp_path, agent, "ct", "list", "--json")
        assert cli.returncode == 0 and json.loads(cli.stdout)["containers"] == [], cli.stderr
        _push_through_data_channel(tmp_path, agent, "[::1]")


def test_agent_on_a_host_name(tmp_path: Path) -> None:
    creds = make_pki(tmp_path, [HOST, "peer1", "admin"])
    with running_agent(tmp_path / "a", HOST, creds, ["peer1"], ["admin"], host="localhost") as agent:
        with connect(agent.address, HOST, creds["admin"]) as a:  # gRPC's dns: resolver
            assert a.call("Info", pb.Empty()).address == f"localhost:{agent.port}"
        cli = _admin_cli(tmp_path, agent, "ct", "list", "--json")
        assert cli.returncode == 0, cli.stderr
        _push_through_data_channel(tmp_path, agent, "localhost")  # resolved before socat dials


def test_agent_on_a_wildcard_advertises(tmp_path: Path) -> None:
    creds = make_pki(tmp_path, [HOST, "peer1", "admin"])
    with running_agent(tmp_path / "a", HOST, creds, ["peer1"], ["admin"], "--advertise", "127.0.0.1", host="0.0.0.0") as agent:
        with connect(f"127.0.0.1:{agent.port}", HOST, creds["admin"]) as a:
            assert a.call("Info", pb.Empty()).address == f"127.0.0.1:{agent.port}"  # what peers dial back
        _push_through_data_channel(tmp_path, agent, "127.0.0.1")
        assert "advertised as 127.0.0.1:" in agent.log()


def test_agent_in_a_deep_state_directory(tmp_path: Path) -> None:
    """The data channels' commands name their files relative to the migration's directory:
    socat garbles an EXEC address past about 512 characters and then fails every
    connection (a CI run's path was long enough for the page stream's)."""
    creds = make_pki(tmp_path, [HOST, "peer1", "admin"])
    deep = tmp_path / "a" / ("d" * 120) / ("e" * 120) / "state"  # the agent's socket stays in tmp_path/a
    with running_agent(tmp_path / "a", HOST, creds, ["peer1"], ["admin"], state=deep) as agent:
        _push_through_data_channel(tmp_path, agent, "127.0.0.1")


# --- the IPv6 lab --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab6(lab: Lab) -> Iterator[Lab]:
    """The lab with IPv6 agents (hosts.json with IPv6 addresses) and no IPv4 address on the
    hosts, so nothing but IPv6 joins their agents; the IPv4 lab again afterwards."""
    hosts = lab_mod.HOSTS
    try:
        lab_mod.up(TEST_SUBNET, lab_dir=lab.dir, ipv6=True)
        for name in hosts:
            subprocess.run(["ip", "-n", lab_mod.NETNS[name], "-4", "addr", "flush", "dev", lab_mod.BRIDGE], check=True)
        yield lab
    finally:
        prefix = lab_mod.parse_subnet(TEST_SUBNET).prefixlen
        for name in hosts:
            subprocess.run(["ip", "-n", lab_mod.NETNS[name], "addr", "replace",
                            f"{lab_mod.host_address(TEST_SUBNET, name)}/{prefix}", "dev", lab_mod.BRIDGE], check=False)
        lab_mod.up(TEST_SUBNET, lab_dir=lab.dir, ipv6=False)
        assert not _is_v6(read_hosts(lab.hosts_file).hosts["alpha"].address)


@pytest.fixture
def clean_lab6(lab6: Lab) -> Iterator[Lab]:
    yield lab6
    lab6.disarm_faults()
    lab6.destroy_all()


def _is_v6(address: str) -> bool:
    return parse_endpoint(address).kind is HostKind.IPV6


def _start(lab: Lab, ct: str, counter: bool = True) -> None:
    """A container with no address (its network is not the point) running memload and,
    with `counter`, a shell counter beside it."""
    lab.phaul("--host", "alpha", "ct", "create", ct, "--memory", "160M")
    loop = f"(i=0; while :; do {COUNT_STEP}; sleep 0.05; done) & " if counter else ""
    lab.phaul("--host", "alpha", "ct", "start", ct, "--", "/bin/sh", "-c", f"{loop}exec memload --size 64 --rate 4")
    wait_for(lambda: lab.exec("alpha", ct, "sh", "-c", "test -s /memload.pid && echo yes || true").strip() == "yes",
             timeout=60, what=f"memload in {ct}")
    if counter:
        wait_for(lambda: lab.counter("alpha", ct) > 3, what=f"{ct}'s counter")


def _check_ipv6_only(lab: Lab) -> None:
    hf = read_hosts(lab.hosts_file)
    for name in lab_mod.HOSTS:
        entry = hf.hosts[name]
        assert entry.address == f"[{lab_mod.host_address6(TEST_SUBNET, name)}]:{lab_mod.AGENT_PORT}"
        pid = int((lab.state_dir(name) / "agent.pid").read_text())
        assert _listening(pid, lab_mod.AGENT_PORT) == {"tcp": False, "tcp6": True}
        v4 = subprocess.run(["ip", "-n", lab_mod.NETNS[name], "-4", "-o", "addr", "show", "dev", lab_mod.BRIDGE],
                            capture_output=True, text=True, check=True).stdout
        assert v4.strip() == "", v4


def _peer_address(lab: Lab, host: str, migration_id: str) -> str:
    """The address the journal of `host` holds for the other agent (recovery dials it back)."""
    [path] = (lab.state_dir(host) / "journal").glob(f"*-{migration_id}.jsonl")
    return str(json.loads(path.read_text().splitlines()[0])["peer_address"])


@pytest.mark.lab
def test_ipv6_only_agents_migrate_a_container(clean_lab6: Lab) -> None:
    lab = clean_lab6
    _check_ipv6_only(lab)
    _start(lab, "six")
    for src, dst in (("alpha", "beta"), ("beta", "alpha")):
        before = lab.counter(src, "six")
        report = lab.migrate("six", src, dst)
        assert report["result"] == "ok" and report["bytes_sent"] > 0, report
        assert lab.counter(dst, "six") >= before  # the shell's memory came along: not restarted
        wait_for(lambda d=dst, b=before: lab.counter(d, "six") > b + 2, what=f"the counter to go on on {dst}")
        assert _verify_memory(lab, dst, "six").startswith("ok pages=16384")
        assert lab.ct_list(src) == []
        # the destination's journal holds the source's IPv6 address, for recovery's dial-back
        assert _peer_address(lab, dst, report["migration_id"]) == f"[{lab_mod.host_address6(TEST_SUBNET, src)}]:7473"
        print(f"\nIPv6 {src} -> {dst}: frozen {report['frozen_ms']:.0f} ms, total {report['total_ms']:.0f} ms")


@pytest.mark.lab
def test_ipv6_only_agents_postcopy(clean_lab6: Lab) -> None:
    lab = clean_lab6
    _check_ipv6_only(lab)
    # memload alone: a task that forks during the post-copy window hangs CRIU's lazy-pages
    # daemon ("uffd: excess message in queue"), IPv4 or IPv6 alike (see the branch's report)
    _start(lab, "six-pc", counter=False)
    report = lab.migrate("six-pc", "alpha", "beta", "--method", "postcopy")
    assert report["result"] == "ok" and report["memory_method"] == "postcopy", report
    assert report["postcopy_bytes"] > 0, report  # pages crossed the IPv6 page link after the resume
    assert _verify_memory(lab, "beta", "six-pc").startswith("ok pages=16384")
    print(f"\nIPv6 post-copy: frozen {report['frozen_ms']:.0f} ms, window {report['postcopy_ms']:.0f} ms")


def test_certificate_names_ipv6_addresses(tmp_path: Path) -> None:
    from phaul.channels import pki
    from phaul.errors import Conflict

    pki.init_ca(tmp_path, "test CA")
    pki.issue(tmp_path, "alpha", ips=["FD00:7068::11", "10.213.0.11"])
    assert set(pki.load(tmp_path, "alpha").ips) == {"fd00:7068::11", "10.213.0.11"}
    with pytest.raises(Conflict, match=r"IP fd00:7068::12 \(held by host beta in the hosts file\)"):
        pki.issue(tmp_path, "gamma", ips=["fd00:7068::12"], hosts={"beta": [parse_endpoint("[fd00:7068::12]:7473").host]})
    with pytest.raises(InvalidInput, match="invalid IP address '\\[fd00::1\\]'") as e:
        pki.issue(tmp_path, "delta", ips=["[fd00::1]"])
    assert "no brackets" in e.value.hint


def test_doctor_reports_ipv6() -> None:
    from phaul.linux import doctor

    [check] = [c for c in doctor.run_checks() if c.name == "ipv6"]
    assert check.status == "pass" and check.detail.startswith("IPv6 usable"), check  # this machine has ::1


def test_agent_toml_addresses(tmp_path: Path) -> None:
    """agent.toml's listen and advertise go through the same parser, its messages naming the key."""
    from phaul.agent.config import load_config

    path = tmp_path / "agent.toml"
    rest = f'name = "{HOST}"\nadmins = ["admin"]\n[tls]\ncert = "a.crt"\nkey = "a.key"\nca = "ca.crt"\n'
    path.write_text('listen = "[::]:7473"\nadvertise = "Alpha.Example.NET"\n' + rest)
    cfg = load_config(path)
    assert agent_endpoints(cfg.listen, cfg.advertise)[1] == parse_endpoint("alpha.example.net:7473")
    for listen, problem, fix in (
        ("[::]:7473", f"`listen` in {path} [::]:7473 is every address of this host", f"add `advertise` in {path}"),
        ("fd00::1:7473", f"`listen` in {path} 'fd00::1:7473': an IPv6 address needs brackets", "[ADDRESS]:PORT"),
    ):
        path.write_text(f'listen = "{listen}"\n' + rest)
        with pytest.raises(InvalidInput) as e:
            load_config(path)
        assert e.value.message.startswith(problem) and fix in e.value.hint, (e.value.message, e.value.hint)
