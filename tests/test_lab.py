"""The lab in real network namespaces (no agents) and the PKI it uses.

Needs root, iproute2 and nsenter. Uses its own LAB_DIR and subnet 10.213.7.0/24 and
takes the lab lock (namespace names are fixed) and fails when another lab is up.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import lab_lock, take_down_any_lab
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from phaul import hosts
from phaul.testing import lab
from phaul.channels import pki
from phaul.linux import procfs
from phaul.errors import Conflict, InvalidInput, NotFound

SUBNET = "10.213.7.0/24"
ALPHA, BETA, CLIENT = "10.213.7.11", "10.213.7.12", "10.213.7.100"



def _ping_cmd(addr: str) -> list[str]:
    if shutil.which("ping"):
        return ["ping", "-c1", "-W1", addr]
    if shutil.which("busybox"):
        return ["busybox", "ping", "-c1", "-W1", addr]
    pytest.fail("no ping (install iputils-ping or busybox-static: `make setup`)")


def ping(ns: str, addr: str) -> bool:
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", *_ping_cmd(addr)], capture_output=True, timeout=10)
    return r.returncode == 0


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {n["name"] for n in json.loads(out)} if out.strip() else set()


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def ns_link(ns: str, ifname: str) -> dict:
    out = subprocess.run(["ip", "-j", "-n", ns, "link", "show", ifname], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


def mounts_under(d: Path) -> list[str]:
    base = os.path.realpath(d)
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == base or line.split()[1].startswith(base + "/")]


def assert_all_gone(d: Path) -> None:
    assert not netns_names() & set(lab.ALL_NAMESPACES)
    assert not {n for n in root_links() if n.startswith(lab.VETH_PREFIX)}
    assert not mounts_under(d)
    assert not d.exists()
    assert not [p for root in ("/sys/fs/cgroup",) for p in Path(root).glob("*/phaul-alpha")]
    assert not [p for p in Path("/sys/fs/cgroup").glob("*/phaul-beta")]
    assert not [p for p in Path("/sys/fs/cgroup").glob("*/phaul-gamma")]


@pytest.fixture
def lab_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A test-only LAB_DIR; the lab is torn down afterwards whatever happened."""
    with lab_lock():
        take_down_any_lab()
        d = tmp_path / "lab"
        monkeypatch.setenv(hosts.LAB_DIR_ENV, str(d))
        monkeypatch.delenv(hosts.HOSTS_FILE_ENV, raising=False)
        try:
            yield d
        finally:
            lab.down(d)


# --- pki ------------------------------------------------------------------------------


def test_issue_and_load(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    ca = pki.init_ca(d)
    assert ca == d / "ca.crt"
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    crt, key = pki.issue(d, "beta", ips=["10.213.7.12"], dns=["beta.lab"])
    assert (crt, key) == (d / "beta.crt", d / "beta.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    cred = pki.load(d, "beta")
    assert (cred.ca, cred.cert, cred.key) == (ca, crt, key)
    assert cred.cert_pem == crt.read_bytes() and cred.key_pem == key.read_bytes() and cred.ca_pem == ca.read_bytes()
    assert cred.dns == ("beta", "beta.lab") and cred.ips == ("10.213.7.12",)

    cert = x509.load_pem_x509_certificate(cred.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "beta"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 364 <= days <= 366


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init_ca(d)
    first = (d / "ca.crt").read_bytes()
    with pytest.raises(Conflict):
        pki.init_ca(d)
    assert (d / "ca.crt").read_bytes() == first
    pki.init_ca(d, force=True)
    assert (d / "ca.crt").read_bytes() != first


def test_load_ca_mismatch(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "beta")
    pki.init_ca(d, force=True)  # a new CA: beta's certificate is no longer trusted
    with pytest.raises(pki.BadCredentials) as e:
        pki.load(d, "beta")
    assert "not signed by the CA" in str(e.value) and "phaul pki issue beta" in str(e.value)


def test_load_missing_and_bad_names(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init_ca(d)
    with pytest.raises(NotFound) as e:
        pki.load(d, "beta")
    assert f"no certificate for host beta in {d}" in str(e.value)
    assert "run `phaul pki issue beta`" in str(e.value)
    for bad in ("Beta", "-x", "a/b", "ca"):
        with pytest.raises(InvalidInput):
            pki.issue(d, bad)
    with pytest.raises(InvalidInput):
        pki.issue(d, "beta", ips=["10.213.7.300"])
    with pytest.raises(NotFound):
        pki.issue(tmp_path / "nowhere", "beta")


def test_key_of_another_cert(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "alpha")
    pki.issue(d, "beta")
    shutil.copy(d / "alpha.key", d / "beta.key")
    with pytest.raises(pki.BadCredentials, match="does not belong"):
        pki.load(d, "beta")


# --- addresses, commands, hosts file ------------------------------------------------


def test_subnets_and_addresses() -> None:
    assert str(lab.parse_subnet(SUBNET)) == SUBNET
    for bad in ("10.213.7.0/15", "10.213.7.0/29", "10.213.7.5/24", "fd00::/64", "10.213.7.0", "nonsense"):
        with pytest.raises(InvalidInput):
            lab.parse_subnet(bad)
    assert [lab.host_address(SUBNET, n) for n in ("alpha", "beta", "client")] == [ALPHA, BETA, CLIENT]
    assert lab.container_address(SUBNET, 0) == "10.213.7.50"
    assert lab.container_address(SUBNET, 49) == "10.213.7.99"
    assert lab.container_address(SUBNET, 50) == "10.213.7.101"  # skips the client
    assert lab.container_address("10.213.0.0/16", 0) == "10.213.0.50"
    small = "10.213.7.16/28"
    assert [lab.host_address(small, n) for n in ("alpha", "beta", "client")] == ["10.213.7.27", "10.213.7.28", "10.213.7.30"]
    assert lab.container_address(small, 0) == "10.213.7.29"
    with pytest.raises(Conflict):
        lab.container_address(small, 1)


def test_agent_command() -> None:
    s = Path("/x/hosts/alpha")
    cmd = lab.agent_command("alpha", "10.213.7.11:7473", s / "agent.sock", s, Path("a.crt"), Path("a.key"), Path("ca.crt"))
    assert cmd[:4] == [sys.executable, "-m", "phaul", "agent"]
    args = dict(zip(cmd[4::2], cmd[5::2], strict=True))
    assert args == {
        "--name": "alpha", "--listen": "10.213.7.11:7473", "--socket": "/x/hosts/alpha/agent.sock",
        "--state-dir": "/x/hosts/alpha", "--cert": "a.crt", "--key": "a.key", "--ca": "ca.crt",
        "--peers": "alpha,beta", "--admins": "admin",
        "--link-timeout": "5", "--gate-timeout": "120", "--resolve-interval": "5", "--build-netns": f"/run/netns/{lab.OUTSIDE_NETNS}",
    }
    # under the tests (PHAUL_LAB_FAULT_INJECTION=1): the test agent, same arguments, fault injection on
    test = lab.agent_command("alpha", "10.213.7.11:7473", s / "agent.sock", s, Path("a.crt"), Path("a.key"), Path("ca.crt"),
                             fault_injection=True)
    assert test[:3] == [sys.executable, "-m", "phaul.testing.agent"]
    assert test[3:] == [*cmd[4:], "--enable-fault-injection"]


def test_read_hosts_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts, "ETC_HOSTS_FILE", tmp_path / "etc" / "hosts.json")
    monkeypatch.setenv(hosts.LAB_DIR_ENV, str(tmp_path / "lab"))
    monkeypatch.delenv(hosts.HOSTS_FILE_ENV, raising=False)
    with pytest.raises(NotFound, match="no hosts file") as e:
        hosts.read_hosts()
    assert "phaul lab up" in str(e.value)

    def write(path: Path, port: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"hosts": {"alpha": {"address": f"10.213.7.11:{port}", "socket": "a.sock"}}}))
        return path

    write(tmp_path / "etc" / "hosts.json", 1)
    assert hosts.read_hosts().host("alpha").port == 1
    write(tmp_path / "lab" / "hosts.json", 2)
    assert hosts.read_hosts().host("alpha").port == 2
    monkeypatch.setenv(hosts.HOSTS_FILE_ENV, str(write(tmp_path / "env.json", 3)))
    hf = hosts.read_hosts()
    assert hf.host("alpha").port == 3 and hf.host("alpha").socket == tmp_path / "a.sock"
    assert hf.pki.cert == pki.DEFAULT_PKI_DIR / "admin.crt"
    assert hosts.read_hosts(write(tmp_path / "explicit.json", 4)).host("alpha").port == 4
    with pytest.raises(NotFound, match="known hosts: alpha"):
        hf.host("gamma")
    with pytest.raises(NotFound):
        hosts.read_hosts(tmp_path / "missing.json")


# --- the lab in namespaces ---------------------------------------------------------------


def test_up_status_down(lab_dir: Path) -> None:
    st = lab.up(SUBNET, start_agents=False)
    assert set(lab.LAB_NAMESPACES) <= netns_names()
    assert st.network_up and st.problems == [] and not st.healthy  # no agents
    assert st.subnet == SUBNET
    assert {n: h.address for n, h in st.hosts.items()} == {"alpha": f"{ALPHA}:7473", "beta": f"{BETA}:7473"}
    assert all(h.netns_present and not h.agent_alive and not h.socket_present for h in st.hosts.values())
    assert json.loads(st.to_json())["hosts"]["beta"]["netns"] == "phaul-beta"

    assert ping("phaul-client", ALPHA)
    assert ping("phaul-client", BETA)
    assert ping("phaul-alpha", BETA)
    assert ping("phaul-beta", CLIENT)
    assert lab.exec_in("client", ["true"]) == 0
    assert lab.exec_in("sw", ["false"]) == 1
    # the agents' build namespace is the one the lab was brought up from (it reaches the mirror)
    assert os.stat(f"/run/netns/{lab.OUTSIDE_NETNS}").st_ino == os.stat("/proc/self/ns/net").st_ino
    assert subprocess.run(["nsenter", f"--net=/run/netns/{lab.OUTSIDE_NETNS}", "--", "true"]).returncode == 0

    hf = hosts.read_hosts()
    assert hf.path == lab_dir / "hosts.json" and hf.subnet == SUBNET
    assert hf.host("beta").address == f"{BETA}:7473" and hf.host("beta").netns == "phaul-beta"
    assert hf.host("alpha").socket == lab_dir / "hosts" / "alpha" / "agent.sock"
    assert hf.client is not None and hf.client.address == CLIENT
    for name in ("alpha", "beta", "admin"):
        cred = pki.load(lab_dir / "pki", name)
        assert cred.ca == hf.pki.ca
    assert pki.load(lab_dir / "pki", "beta").ips == (BETA,)

    # The bridge MAC stays pinned when a port with a lower MAC joins.
    mac = ns_link("phaul-alpha", "br0")["address"]
    assert mac == lab.BRIDGE_MAC["alpha"]
    subprocess.run(["ip", "-n", "phaul-alpha", "link", "add", "phl-t0", "address", "00:00:00:00:00:01",
                    "type", "veth", "peer", "name", "phl-t1"], check=True)
    subprocess.run(["ip", "-n", "phaul-alpha", "link", "set", "phl-t0", "master", "br0", "up"], check=True)
    assert ns_link("phaul-alpha", "br0")["address"] == mac

    mount = lab_dir / "hosts" / "alpha" / "scratch"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "phaul-test", str(mount)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "phaul-test", str(mount)], check=True)  # stacked
    assert mounts_under(lab_dir)

    removed = lab.down()
    assert "netns phaul-alpha" in removed and f"directory {lab_dir}" in removed
    assert f"netns {lab.OUTSIDE_NETNS}" in removed and lab.OUTSIDE_NETNS not in netns_names()
    assert os.path.exists("/proc/self/ns/net")  # the host's namespace itself lives on
    assert_all_gone(lab_dir)
    assert lab.down() == []  # nothing left: nothing to do, no error


def test_up_twice_is_harmless(lab_dir: Path) -> None:
    lab.up(SUBNET, start_agents=False)
    index = ns_link("phaul-beta", "br0")["ifindex"]
    ca = (lab_dir / "pki" / "ca.crt").read_bytes()
    hosts = (lab_dir / "hosts.json").stat().st_mtime_ns
    st = lab.up(start_agents=False)  # subnet taken from the running lab
    assert st.network_up and st.subnet == SUBNET
    assert ns_link("phaul-beta", "br0")["ifindex"] == index
    assert (lab_dir / "pki" / "ca.crt").read_bytes() == ca
    assert (lab_dir / "hosts.json").stat().st_mtime_ns == hosts
    assert ping("phaul-client", BETA)

    with pytest.raises(Conflict, match="subnet"):
        lab.up("10.213.8.0/24", start_agents=False)
    other = lab_dir.parent / "other-lab"
    other.mkdir()
    with pytest.raises(Conflict, match="belong to the lab in"):
        lab.up(SUBNET, lab_dir=other, start_agents=False)


def test_up_repairs_a_partial_lab(lab_dir: Path) -> None:
    lab.up(SUBNET, start_agents=False)
    subprocess.run(["ip", "-n", "phaul-sw", "link", "delete", "phl-beta-sw"], check=True)
    subprocess.run(["ip", "netns", "delete", "phaul-client"], check=True)
    st = lab.status()
    assert not st.network_up and st.problems
    assert not st.namespaces["phaul-client"]
    st = lab.up(start_agents=False)
    assert st.network_up and st.subnet == SUBNET
    assert ping("phaul-client", BETA) and ping("phaul-alpha", BETA)


def test_down_half_built(lab_dir: Path) -> None:
    """Pieces a crashed `up` or a crashed test could leave; down removes them all."""
    for ns in ("phaul-sw", "phaul-alpha"):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", "phl-beta-sw", "type", "veth", "peer", "name", "phl-beta-up"], check=True)
    sleeper = subprocess.Popen(["nsenter", "--net=/run/netns/phaul-alpha", "--", "sleep", "600"], start_new_session=True)
    (lab_dir / "hosts" / "beta").mkdir(parents=True)
    (lab_dir / "hosts" / "beta" / "agent.pid").write_text("999999\n")  # stale
    (lab_dir / lab.MARKER).touch()
    scratch = lab_dir / "scratch"
    scratch.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "phaul-test", str(scratch)], check=True)
    cgroup = Path("/sys/fs/cgroup/pids/phaul-beta/leftover")
    if Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
        cgroup.mkdir(parents=True)

    removed = lab.down()
    sleeper.wait(timeout=5)
    assert sleeper.returncode == -9
    assert "netns phaul-sw" in removed and any(r.startswith("link phl-beta-") for r in removed)
    assert_all_gone(lab_dir)
    assert lab.down() == []


def test_down_deletes_runc_containers(lab_dir: Path, tmp_path: Path) -> None:
    """A running runc container on alpha (in cgroup phaul-alpha) is deleted with its cgroups."""
    lab.up(SUBNET, start_agents=False)
    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox"), bundle / "rootfs" / "bin" / "busybox")  # type: ignore[arg-type]
    (bundle / "rootfs" / "bin" / "sleep").symlink_to("busybox")
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"].update(terminal=False, args=["sleep", "600"])
    config["linux"]["cgroupsPath"] = "/phaul-alpha/t1"
    (bundle / "config.json").write_text(json.dumps(config))
    root = lab_dir / "hosts" / "alpha" / "runc"
    subprocess.run(["nsenter", "--net=/run/netns/phaul-alpha", "--", "runc", "--root", str(root), "run", "-d",
                    "--bundle", str(bundle), "t1"], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    assert list(Path("/sys/fs/cgroup").glob("*/phaul-alpha/t1"))

    removed = lab.down()
    assert "runc container t1 on alpha" in removed
    assert_all_gone(lab_dir)



def test_up_starts_agents_and_down_stops_them(lab_dir: Path) -> None:
    st = lab.up(SUBNET)
    assert st.healthy, st.to_text()
    pids = {n: h.agent_pid for n, h in st.hosts.items()}
    assert all(pids.values())
    again = lab.up()
    assert {n: h.agent_pid for n, h in again.hosts.items()} == pids  # nothing restarted
    lab.down()
    for pid in pids.values():
        assert procfs.state(pid) in (None, "Z")
    assert_all_gone(lab_dir)


# --- the third host, gamma -------------------------------------------------------------------

GAMMA = "10.213.7.13"


def test_gamma_address_and_shape() -> None:
    assert lab.host_address(SUBNET, "gamma") == GAMMA
    assert lab.container_address(SUBNET, 0) == "10.213.7.50"  # containers stay from .50
    with pytest.raises(Conflict, match="no room for gamma"):
        lab.host_address("10.213.7.16/28", "gamma")
    with pytest.raises(InvalidInput, match="delta"):
        lab.up(SUBNET, hosts=("alpha", "beta", "delta"), start_agents=False)
    with pytest.raises(InvalidInput, match="both full and bare"):
        lab.up(SUBNET, hosts=("alpha", "beta", "gamma"), bare=("gamma",), start_agents=False)
    with pytest.raises(InvalidInput, match="always has beta"):
        lab.up(SUBNET, hosts=("alpha",), start_agents=False)


def test_bare_gamma_added_and_removed(lab_dir: Path) -> None:
    """A bare gamma joins a running default lab without rebuilding it: network, address and
    state directory, no certificate, no agent, not in hosts.json; `up()` without it removes it."""
    lab.up(SUBNET, start_agents=False)
    assert "phaul-gamma" not in netns_names()  # the default lab is as before
    index = ns_link("phaul-beta", "br0")["ifindex"]
    st = lab.up(SUBNET, bare=("gamma",), start_agents=False)
    assert st.network_up and st.bare == ["gamma"] and "gamma" not in st.hosts, st.to_text()
    assert ns_link("phaul-beta", "br0")["ifindex"] == index  # alpha and beta were not rebuilt
    assert ns_link("phaul-gamma", "br0")["address"] == lab.BRIDGE_MAC["gamma"]
    assert ping("phaul-gamma", ALPHA) and ping("phaul-client", GAMMA)
    assert (lab_dir / "hosts" / "gamma").is_dir()
    assert not (lab_dir / "pki" / "gamma.crt").exists()
    assert "gamma" not in hosts.read_hosts().hosts
    assert lab.exec_in("gamma", ["true"]) == 0

    sleeper = subprocess.Popen(["nsenter", "--net=/run/netns/phaul-gamma", "--", "sleep", "600"], start_new_session=True)
    st = lab.up(SUBNET, start_agents=False)  # gamma not asked for: removed, the rest kept
    sleeper.wait(timeout=5)
    assert sleeper.returncode == -9
    assert st.network_up and st.bare == [] and "phaul-gamma" not in netns_names()
    assert "phl-gamma-sw" not in {link["ifname"] for link in json.loads(subprocess.run(
        ["ip", "-j", "-n", "phaul-sw", "link", "show"], capture_output=True, text=True, check=True).stdout)}
    assert not (lab_dir / "hosts" / "gamma").exists()
    assert ns_link("phaul-beta", "br0")["ifindex"] == index

    lab.up(SUBNET, bare=("gamma",), start_agents=False)
    lab.down()
    assert "phaul-gamma" not in netns_names()
    assert_all_gone(lab_dir)


def test_full_gamma_has_an_agent_and_peers(lab_dir: Path) -> None:
    """gamma as a full host: certificate, hosts.json entry, agent; every agent's peers are
    the three hosts (alpha and beta restarted for it), and `down` stops them all."""
    lab.up(SUBNET)
    before = {n: h.agent_pid for n, h in lab.status().hosts.items()}
    st = lab.up(SUBNET, hosts=lab.ALL_HOSTS)
    assert st.healthy and set(st.hosts) == {"alpha", "beta", "gamma"}, st.to_text()
    assert st.hosts["gamma"].address == f"{GAMMA}:7473"
    assert pki.load(lab_dir / "pki", "gamma").ips == (GAMMA,)
    assert hosts.read_hosts().host("gamma").netns == "phaul-gamma"
    pids = {n: h.agent_pid for n, h in st.hosts.items()}
    assert all(pids[n] != before[n] for n in ("alpha", "beta"))  # restarted with the new peers
    for pid in pids.values():
        assert pid is not None
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert args[args.index(b"--peers") + 1] == b"alpha,beta,gamma"
    assert {n: h.agent_pid for n, h in lab.up(hosts=lab.ALL_HOSTS).hosts.items()} == pids  # nothing restarted
    lab.down()
    for pid in pids.values():
        assert procfs.state(pid) in (None, "Z")
    assert_all_gone(lab_dir)
