"""The lab: hosts alpha and beta (and on request gamma), a switch and a client in network namespaces.

Topology (all addresses inside one subnet, default 10.213.0.0/24)::

    phaul-sw      br0: ports phl-alpha-sw, phl-beta-sw, phl-client-sw
    phaul-alpha   br0 .11: port phl-alpha-up (peer of phl-alpha-sw)
    phaul-beta    br0 .12: port phl-beta-up  (peer of phl-beta-sw)
    phaul-client  phl-client-up .100         (peer of phl-client-sw)
    phaul-gamma   br0 .13: port phl-gamma-up (only when asked for: `up(hosts=...)` or `bare=`)

The default lab is alpha and beta. A test that needs a third host asks `up` for it:
`hosts=("alpha", "beta", "gamma")` makes gamma a full host like the others (certificate,
agent, entry in hosts.json; every agent's peers are the full hosts), `bare=("gamma",)` makes
only its namespace, bridge, address and state directory (no certificate, no agent, not in
hosts.json): a new machine for `phaul host add` to bootstrap. An extra host is added to (and
with `remove_host` taken from) a running lab without rebuilding it; `down` removes it too.

Every bridge has a pinned MAC, so plugging container veths into a host bridge
never changes the address its peers have cached. Each host runs `phaul agent`
under LAB_DIR/hosts/NAME with TLS material from LAB_DIR/pki, and the CLI finds
them through LAB_DIR/hosts.json (phaul.hosts). Tools are run in a host with
`nsenter --net=/run/netns/NS`, never `ip netns exec` (which remounts /sys and
breaks runc).
"""

from __future__ import annotations

import datetime
import errno
import functools
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import phaul
from phaul.channels import pki
from phaul.errors import Conflict, InvalidInput, NotFound, PhaulError, ToolFailed
from phaul.hosts import (
    ADMIN,
    LAB_DIR,
    LAB_DIR_ENV,
    ClientEntry,
    HostEntry,
    HostsFile,
    PkiFiles,
    default_lab_dir,
    try_hosts,
)
from phaul.linux import procfs
from phaul.linux.fsutil import write_atomic

log = logging.getLogger(__name__)

DEFAULT_SUBNET = "10.213.0.0/24"
AGENT_PORT = 7473
HOSTS = ("alpha", "beta")  # the default lab's hosts
EXTRA_HOSTS = ("gamma",)  # hosts built only when `up` is asked for them
ALL_HOSTS = (*HOSTS, *EXTRA_HOSTS)
BRIDGE = "br0"
NETNS = {"sw": "phaul-sw", "alpha": "phaul-alpha", "beta": "phaul-beta", "client": "phaul-client",
         "gamma": "phaul-gamma"}
LAB_NAMESPACES = tuple(NETNS[n] for n in ("sw", *HOSTS, "client"))  # the default lab's namespaces
ALL_NAMESPACES = (*LAB_NAMESPACES, *(NETNS[n] for n in EXTRA_HOSTS))  # all `down` removes
# A name for the network namespace of the process that brings the lab up (it reaches the
# outside; the lab's do not): agents build debian roots in it. Only a name: `down` removes
# the name, never kills in it. Not /proc/1/ns/net: without CAP_SYS_RESOURCE (this project's
# machines) root may not open PID 1's namespaces (its capabilities are not a subset of ours).
OUTSIDE_NETNS = "phaul-outside"
CGROUP_NAMES = tuple(NETNS[h] for h in ALL_HOSTS)
VETH_PREFIX = "phl-"  # every veth the lab creates starts with this; all are <= 15 characters
BRIDGE_MAC = {"sw": "02:70:68:6c:00:01", "alpha": "02:70:68:6c:00:11", "beta": "02:70:68:6c:00:12",
              "gamma": "02:70:68:6c:00:13"}
OWNER_ALIAS = "phaul-lab:"  # alias of the switch bridge: the LAB_DIR that owns the namespaces
MARKER = ".phaul-lab"
AGENT_START_TIMEOUT = 15.0
AGENT_STOP_TIMEOUT = 5.0

# The IPv6 lab (`up(ipv6=True)`, `phaul lab up --ipv6`): every node also has an address of
# this unique-local /64 (added `nodad`, usable at once), the same last number as its IPv4
# address (fd00:7068::11 for .11), and the agents listen and advertise on it only.
IPV6_PREFIX = ipaddress.IPv6Network("fd00:7068::/64")

# Host offsets inside the subnet; small subnets put the client on the last usable address
# and containers right after beta.
ALPHA_OFFSET, BETA_OFFSET, CLIENT_OFFSET, CONTAINER_OFFSET = 11, 12, 100, 50
GAMMA_OFFSET = 13  # only in subnets with room for the client at .100 (a /25 or larger)


# --- addresses -----------------------------------------------------------------------


def parse_subnet(text: str | ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """Parse and check a lab subnet: an IPv4 network CIDR with a /16 to /28 prefix."""
    if isinstance(text, ipaddress.IPv4Network):
        net = text
    else:
        try:
            net = ipaddress.IPv4Network(str(text).strip(), strict=True)
        except ValueError as e:
            raise InvalidInput(
                f"invalid lab subnet {text!r}: {e}",
                f"give an IPv4 network in CIDR form with no host bits, e.g. {DEFAULT_SUBNET}",
            ) from e
        if "/" not in str(text):
            raise InvalidInput(f"invalid lab subnet {text!r}: no prefix length", f"write it as CIDR, e.g. {DEFAULT_SUBNET}")
    if not 16 <= net.prefixlen <= 28:
        raise InvalidInput(f"lab subnet {net} is a /{net.prefixlen}", "use a prefix length from /16 to /28")
    return net


def _offsets(net: ipaddress.IPv4Network) -> tuple[int, int, int, int]:
    """(alpha, beta, client, first container) offsets for `net`."""
    if net.num_addresses > CLIENT_OFFSET + 1:
        return ALPHA_OFFSET, BETA_OFFSET, CLIENT_OFFSET, CONTAINER_OFFSET
    return ALPHA_OFFSET, BETA_OFFSET, net.num_addresses - 2, BETA_OFFSET + 1


def host_address(subnet: str | ipaddress.IPv4Network, name: str) -> str:
    """The address of lab node `name` ("alpha", "beta", "gamma" or "client") in `subnet`."""
    net = parse_subnet(subnet)
    a, b, c, _ = _offsets(net)
    if name == "gamma" and c != CLIENT_OFFSET:
        raise Conflict(f"lab subnet {net} has no room for gamma (its containers start at .{b + 1})",
                       "use a /25 or larger subnet for a lab with gamma")
    try:
        return str(net[{"alpha": a, "beta": b, "gamma": GAMMA_OFFSET, "client": c}[name]])
    except KeyError:
        raise NotFound(f"no lab node {name!r}", "use alpha, beta, gamma or client") from None


def host_address6(subnet: str | ipaddress.IPv4Network, name: str) -> str:
    """The IPv6 address of lab node `name` in IPV6_PREFIX (fd00:7068::11 for alpha's .11)."""
    net = parse_subnet(subnet)
    offset = int(ipaddress.IPv4Address(host_address(net, name))) - int(net.network_address)
    return str(ipaddress.IPv6Address(f"{IPV6_PREFIX.network_address}{offset}"))


def _node_link(name: str) -> str:
    """The interface that holds node `name`'s address in its namespace."""
    return f"{VETH_PREFIX}client-up" if name == "client" else BRIDGE


def _set_ipv6(net: ipaddress.IPv4Network, hosts: Sequence[str], on: bool) -> None:
    """Give lab hosts `hosts` and the client their IPV6_PREFIX address (`on`), or remove it."""
    for name in (*dict.fromkeys(hosts), "client"):
        addr = f"{host_address6(net, name)}/{IPV6_PREFIX.prefixlen}"
        if on:
            _ip("-6", "addr", "replace", addr, "dev", _node_link(name), "nodad", ns=NETNS[name])
        else:
            _ip("-6", "addr", "del", addr, "dev", _node_link(name), ns=NETNS[name], check=False)


def _is_ipv6_lab(hosts: HostsFile | None) -> bool:
    """Whether the hosts file is the IPv6 lab's (its agents' addresses are IPv6)."""
    if hosts is None or not hosts.hosts:
        return False
    return all(":" in h.ip for h in hosts.hosts.values())


def container_address(subnet: str | ipaddress.IPv4Network, n: int) -> str:
    """The address of the n-th lab container (n from 0): .50 upward in a /24, skipping the client."""
    net = parse_subnet(subnet)
    _, _, client, first = _offsets(net)
    if n < 0:
        raise InvalidInput(f"invalid container index {n}", "use 0 or more")
    off = first + n
    if off >= client and client >= first:
        off += 1
    if off >= net.num_addresses - 1:
        raise Conflict(f"lab subnet {net} has no address for container number {n}", "use a larger --subnet")
    return str(net[off])


def _hosts_for(net: ipaddress.IPv4Network, d: Path, names: Sequence[str] = HOSTS, ipv6: bool = False) -> HostsFile:
    pki_dir = d / "pki"
    hosts = {}
    for name in names:
        state = d / "hosts" / name
        hosts[name] = HostEntry(
            name=name,
            address=f"[{host_address6(net, name)}]:{AGENT_PORT}" if ipv6 else f"{host_address(net, name)}:{AGENT_PORT}",
            socket=state / "agent.sock",
            netns=NETNS[name],
            bridge=BRIDGE,
            state_dir=state,
        )
    return HostsFile(
        path=d / "hosts.json",
        subnet=str(net),
        pki=PkiFiles(ca=pki_dir / "ca.crt", cert=pki_dir / f"{ADMIN}.crt", key=pki_dir / f"{ADMIN}.key"),
        hosts=hosts,
        client=ClientEntry(netns=NETNS["client"], address=host_address(net, "client")),
    )



# --- status ------------------------------------------------------------------------------


@dataclass
class HostStatus:
    """One lab host as found now."""

    name: str
    netns: str
    netns_present: bool
    address: str | None = None
    agent_pid: int | None = None
    agent_alive: bool = False
    socket: str | None = None
    socket_present: bool = False


@dataclass
class LabStatus:
    """What the lab looks like now; `to_json()` for `phaul lab status --json`."""

    lab_dir: str
    subnet: str | None
    namespaces: dict[str, bool]
    hosts: dict[str, HostStatus]
    client: dict[str, str | bool | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    bare: list[str] = field(default_factory=list)  # extra hosts with a network and nothing else

    @property
    def network_up(self) -> bool:
        return all(self.namespaces.values()) and not self.problems

    @property
    def healthy(self) -> bool:
        """Network complete and every agent alive with its socket."""
        return self.network_up and all(h.agent_alive and h.socket_present for h in self.hosts.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["network_up"], d["healthy"] = self.network_up, self.healthy
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        """A short table for humans."""
        yn = {True: "yes", False: "no"}
        lines = [f"lab {self.lab_dir}  subnet {self.subnet or '-'}  network {'up' if self.network_up else 'DOWN'}"]
        lines.append(f"{'host':<7}{'address':<22}{'netns':<7}{'agent':<14}{'socket':<7}")
        for h in self.hosts.values():
            agent = f"{h.agent_pid} {'alive' if h.agent_alive else 'dead'}" if h.agent_pid else "-"
            lines.append(f"{h.name:<7}{h.address or '-':<22}{yn[h.netns_present]:<7}{agent:<14}{yn[h.socket_present]:<7}")
        if self.client:
            lines.append(f"{'client':<7}{self.client.get('address') or '-':<22}{yn[bool(self.client.get('netns_present'))]:<7}")
        lines += [f"{name:<7}{'bare host':<22}{'yes':<7}" for name in self.bare]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def status(lab_dir: Path | None = None) -> LabStatus:
    """Inspect the lab: namespaces, network, agents and sockets."""
    d = _resolve(lab_dir)
    hosts_path = d / "hosts.json"
    hf = try_hosts(hosts_path)
    present = _netns_list()
    full = [*HOSTS, *(n for n in EXTRA_HOSTS if hf and n in hf.hosts)]
    bare = [n for n in EXTRA_HOSTS if n not in full and NETNS[n] in present]
    namespaces = {ns: ns in present for ns in (*LAB_NAMESPACES, *(NETNS[n] for n in EXTRA_HOSTS if n in full))}
    hosts: dict[str, HostStatus] = {}
    for name in full:
        entry = hf.hosts.get(name) if hf else None
        state = d / "hosts" / name
        sock = entry.socket if entry and entry.socket else state / "agent.sock"
        pid = _read_pid(state / "agent.pid")
        hosts[name] = HostStatus(
            name=name,
            netns=NETNS[name],
            netns_present=namespaces[NETNS[name]],
            address=entry.address if entry else None,
            agent_pid=pid,
            agent_alive=pid is not None and _is_agent(pid, name, state),
            socket=str(sock),
            socket_present=sock.exists(),
        )
    problems: list[str] = []
    if hf and hf.subnet and any(namespaces.values()):
        problems = _network_problems(parse_subnet(hf.subnet), d, (*full[len(HOSTS):], *bare))
    elif any(namespaces.values()):
        problems = [f"namespaces exist but {hosts_path} does not"]
    client: dict[str, str | bool | None] = {
        "netns": NETNS["client"],
        "netns_present": namespaces[NETNS["client"]],
        "address": hf.client.address if hf and hf.client else None,
    }
    return LabStatus(str(d), hf.subnet if hf else None, namespaces, hosts, client, problems, bare)


# --- up ------------------------------------------------------------------------------------


def up(
    subnet: str | None = None,
    *,
    lab_dir: Path | None = None,
    start_agents: bool = True,
    hosts: Sequence[str] = HOSTS,
    bare: Sequence[str] = (),
    ipv6: bool | None = None,
) -> LabStatus:
    """Build the lab (or repair it) in the shape asked for and return its status; harmless
    when it is already so.

    `subnet` defaults to the running lab's, else 10.213.0.0/24. `hosts` are the full hosts
    (alpha and beta, and gamma if named), `bare` the extra hosts that get only their network
    and state directory. An extra host not named in either is removed (`remove_host`); an
    agent whose peers are not the full hosts is restarted. A complete network is kept as it
    is and only missing pieces (an extra host, certificates, hosts file, dead agents) are
    redone; a partial one is torn down and rebuilt. `start_agents=False` is for tests.
    `ipv6`: the IPv6 lab (IPV6_PREFIX addresses too, agents on them only; hosts.json with
    IPv6 addresses) or the IPv4 one; None keeps what the running lab is, else IPv4. Agents
    running on the other family's address are restarted."""
    t0 = time.monotonic()
    full, extras = _shape(hosts, bare)
    d = _resolve(lab_dir)
    requested = parse_subnet(subnet) if subnet else None
    present = _netns_list() & set(ALL_NAMESPACES)
    existing = try_hosts(d / "hosts.json")
    if present:
        owner = _owner()
        if owner is not None and owner != str(d):
            if Path(owner).exists():
                raise Conflict(
                    f"the lab namespaces belong to the lab in {owner}, not {d}",
                    f"run `{LAB_DIR_ENV}={owner} phaul lab down` first, or use that lab",
                )
            log.warning("lab namespaces belong to %s, which is gone; tearing them down", owner)
            down(Path(owner))
            present, existing = set(), None
    if present and existing and existing.subnet and requested and parse_subnet(existing.subnet) != requested:
        raise Conflict(
            f"the lab is up with subnet {existing.subnet}, not {requested}",
            "run `phaul lab down` first, or leave out --subnet",
        )
    net = requested or (parse_subnet(existing.subnet) if present and existing and existing.subnet else None)
    net = net or parse_subnet(DEFAULT_SUBNET)
    for name in extras:
        host_address(net, name)  # refuses a subnet without room for it, before anything changes

    problems = _network_problems(net, d) if present else ["no lab namespaces"]
    if problems:
        if present or d.exists() or _stale_root_links() or _lab_cgroups():
            log.info("lab is missing or incomplete (%s); clearing before building", "; ".join(problems[:3]))
            down(d)
        _prepare_dir(d)
        _build_network(net, d)
        if left := _network_problems(net, d):
            raise ToolFailed(f"the lab network is incomplete after building: {'; '.join(left)}", "run `phaul lab down` and retry")
    else:
        _prepare_dir(d)
        log.info("lab network in %s is up with subnet %s", d, net)
    for name in EXTRA_HOSTS:
        if name not in extras and NETNS[name] in _netns_list():
            remove_host(name, lab_dir=d)
    for name in extras:
        if _network_problems(net, d, (name,)):
            _remove_host_network(name)
            _build_host(net, name)
            _wait_carrier((name,))
    if left := _network_problems(net, d, extras):
        raise ToolFailed(f"the lab network is incomplete after building: {'; '.join(left)}", "run `phaul lab down` and retry")

    if ipv6 is None:
        ipv6 = bool(present) and _is_ipv6_lab(existing)
    _set_ipv6(net, (*full, *extras), ipv6)
    _ensure_pki(d / "pki", net, full, ipv6)
    for name in bare:  # a bare host has no certificate from the lab: what it gets, `phaul host add` makes
        for suffix in (".crt", ".key"):
            (d / "pki" / f"{name}{suffix}").unlink(missing_ok=True)
    hosts_file = _hosts_for(net, d, full, ipv6)
    text = json.dumps(hosts_file.to_dict(), indent=2) + "\n"
    if not hosts_file.path.exists() or hosts_file.path.read_text() != text:
        write_atomic(hosts_file.path, text)
        log.info("wrote %s", hosts_file.path)
    for name in (*full, *bare):
        (d / "hosts" / name).mkdir(parents=True, exist_ok=True)
    if start_agents:
        started = [_start_agent(hosts_file.hosts[name], hosts_file.pki, d, peers=full) for name in full]
        _wait_agents([a for a in started if a is not None])
    log.info("lab up in %.2f s", time.monotonic() - t0)
    return status(d)


def _shape(hosts: Sequence[str], bare: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Check a requested lab shape; return (full hosts, extra hosts) in the lab's order."""
    unknown = sorted(set(hosts) - set(ALL_HOSTS)) + sorted(set(bare) - set(EXTRA_HOSTS))
    if unknown:
        raise InvalidInput(f"no lab host {unknown[0]!r} to build", f"full hosts are {', '.join(ALL_HOSTS)}; "
                           f"bare hosts {', '.join(EXTRA_HOSTS)}")
    if missing := [h for h in HOSTS if h not in hosts]:
        raise InvalidInput(f"the lab always has {missing[0]} as a full host",
                           f"include it in hosts (e.g. {', '.join(ALL_HOSTS)})")
    if both := sorted(set(hosts) & set(bare)):
        raise InvalidInput(f"lab host {both[0]} asked for both full and bare", "name it in one of hosts and bare")
    full = tuple(h for h in ALL_HOSTS if h in hosts)
    return full, tuple(h for h in EXTRA_HOSTS if h in full or h in bare)


def remove_host(name: str, *, lab_dir: Path | None = None) -> list[str]:
    """Remove extra host `name` (gamma) from a running lab: its agent and every process in
    its namespace or cgroup, its runc containers, namespace and switch port, cgroup, state
    directory, lab certificate and its entry in hosts.json. Return what was removed."""
    if name not in EXTRA_HOSTS:
        raise InvalidInput(f"lab host {name!r} cannot be removed alone",
                           f"remove {', '.join(EXTRA_HOSTS)}, or run `phaul lab down`")
    d = _resolve(lab_dir)
    removed: list[str] = []
    problems: list[str] = []
    state = d / "hosts" / name
    pid = _read_pid(state / "agent.pid")
    if pid is not None and _is_agent(pid, name, state):
        _terminate(pid)
        removed.append(f"agent {name} (pid {pid})")
    removed += _delete_runc_containers(state, problems)
    removed += _remove_host_network(name)
    cgroups = [root / NETNS[name] for root in _cgroup_roots() if (root / NETNS[name]).is_dir()]
    for cg in cgroups:
        if killed := _kill_all(functools.partial(_cgroup_pids, cg)):
            removed.append(f"{len(killed)} process(es) in cgroup {cg}")
        removed += _rmdir_tree(cg, problems)
    if state.exists():
        removed += _unmount_under(state, problems)
        if not _mounts_under(state):
            shutil.rmtree(state, ignore_errors=True)
            removed.append(f"directory {state}")
    for suffix in (".crt", ".key"):
        cert = d / "pki" / f"{name}{suffix}"
        if cert.exists():
            cert.unlink()
            removed.append(f"lab file {cert}")
    hf = try_hosts(d / "hosts.json")
    if hf and name in hf.hosts:
        del hf.hosts[name]
        write_atomic(hf.path, json.dumps(hf.to_dict(), indent=2) + "\n")
        removed.append(f"{name} from {hf.path}")
    for item in removed:
        log.info("removed %s", item)
    if problems:
        raise ToolFailed(f"removing lab host {name} left things behind: " + "; ".join(problems),
                         "fix them by hand, or run `phaul lab down`")
    return removed


def _remove_host_network(name: str) -> list[str]:
    """Kill what runs in host `name`'s namespace and delete it (its veth pair goes with it)."""
    ns = NETNS[name]
    if ns not in _netns_list():
        return []
    removed = []
    if killed := _kill_all(functools.partial(_netns_pids, ns)):
        removed.append(f"{len(killed)} process(es) in {ns}")
    _ip("netns", "delete", ns)
    _ip("link", "delete", f"{VETH_PREFIX}{name}-sw", ns=NETNS["sw"], check=False)  # gone with its peer, normally
    return [*removed, f"netns {ns}"]


def _prepare_dir(d: Path) -> None:
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    (d / MARKER).touch()
    (d / "hosts").mkdir(exist_ok=True)


def _build_network(net: ipaddress.IPv4Network, d: Path) -> None:
    """Create the four namespaces, the bridges, veths and addresses."""
    sw = NETNS["sw"]
    prefix = net.prefixlen
    for ns in LAB_NAMESPACES:
        _ip("netns", "add", ns)
        _ip("link", "set", "lo", "up", ns=ns)
    if OUTSIDE_NETNS not in _netns_list():
        _ip("netns", "attach", OUTSIDE_NETNS, str(os.getpid()))
    _ip("link", "add", BRIDGE, "address", BRIDGE_MAC["sw"], "type", "bridge", ns=sw)
    _ip("link", "set", BRIDGE, "alias", _owner_alias(d), ns=sw)
    _ip("link", "set", BRIDGE, "up", ns=sw)
    for name in HOSTS:
        _build_host(net, name, new_ns=False)
    ns, up_if, sw_if = NETNS["client"], f"{VETH_PREFIX}client-up", f"{VETH_PREFIX}client-sw"
    _ip("link", "add", sw_if, "type", "veth", "peer", "name", up_if, "netns", ns, ns=sw)
    _ip("link", "set", sw_if, "master", BRIDGE, "up", ns=sw)
    _ip("addr", "add", f"{host_address(net, 'client')}/{prefix}", "dev", up_if, ns=ns)
    _ip("link", "set", up_if, "up", ns=ns)
    _wait_carrier(HOSTS, client=True)
    log.info("built lab network %s (%s)", net, ", ".join(LAB_NAMESPACES))


def _build_host(net: ipaddress.IPv4Network, name: str, *, new_ns: bool = True) -> None:
    """Build host `name`'s namespace (unless `new_ns` is False: made already), bridge,
    address and its port on the switch."""
    sw, ns, up_if, sw_if = NETNS["sw"], NETNS[name], f"{VETH_PREFIX}{name}-up", f"{VETH_PREFIX}{name}-sw"
    if new_ns:
        _ip("netns", "add", ns)
        _ip("link", "set", "lo", "up", ns=ns)
    _sysctl(ns, "net.ipv4.ip_forward", "0")
    _ip("link", "add", BRIDGE, "address", BRIDGE_MAC[name], "type", "bridge", ns=ns)
    _ip("link", "add", sw_if, "type", "veth", "peer", "name", up_if, "netns", ns, ns=sw)
    _ip("link", "set", sw_if, "master", BRIDGE, "up", ns=sw)
    _ip("link", "set", up_if, "master", BRIDGE, "up", ns=ns)
    _ip("addr", "add", f"{host_address(net, name)}/{net.prefixlen}", "dev", BRIDGE, ns=ns)
    _ip("link", "set", BRIDGE, "up", ns=ns)


def _wait_carrier(names: Sequence[str], *, client: bool = False, timeout: float = 5.0) -> None:
    """Wait until the bridges and veths of hosts `names` (and the client's) have carrier.

    The kernel turns a bridge's carrier on through its link-watch work, up to a
    second after its first port came up; until then it drops what it is asked to send."""
    ports = [*names, "client"] if client else list(names)
    expect = {NETNS["sw"]: [*([BRIDGE] if client else []), *(f"{VETH_PREFIX}{n}-sw" for n in ports)]}
    if client:
        expect[NETNS["client"]] = [f"{VETH_PREFIX}client-up"]
    expect |= {NETNS[n]: [BRIDGE, f"{VETH_PREFIX}{n}-up"] for n in names}
    deadline = time.monotonic() + timeout
    while True:
        waiting = []
        for ns, names in expect.items():
            links = _links(ns)
            waiting += [f"{ns}/{n}" for n in names if "LOWER_UP" not in links.get(n, {}).get("flags", [])]
        if not waiting:
            return
        if time.monotonic() > deadline:
            log.warning("no carrier after %.0f s on %s", timeout, ", ".join(waiting))
            return
        time.sleep(0.05)


def _network_problems(net: ipaddress.IPv4Network, d: Path, extras: Sequence[str] = ()) -> list[str]:
    """What differs from a complete lab network for `net` with extra hosts `extras`
    (the default lab's when empty); empty when it is complete."""
    problems: list[str] = []
    present = _netns_list()
    spaces = (*LAB_NAMESPACES, *(NETNS[n] for n in extras))
    for ns in spaces:
        if ns not in present:
            problems.append(f"namespace {ns} is missing")
    if problems:
        return problems
    links = {ns: _links(ns) for ns in spaces}

    def want(ns: str, ifname: str, *, kind: str, mac: str | None = None, master: str | None = None,
             addr: str | None = None) -> None:
        link = links[ns].get(ifname)
        if link is None:
            problems.append(f"{ifname} is missing in {ns}")
            return
        if kind and link.get("linkinfo", {}).get("info_kind") != kind:
            problems.append(f"{ifname} in {ns} is not a {kind}")
        if "UP" not in link.get("flags", []):
            problems.append(f"{ifname} in {ns} is down")
        if mac and link.get("address") != mac:
            problems.append(f"{ifname} in {ns} has MAC {link.get('address')}, not {mac}")
        if master and link.get("master") != master:
            problems.append(f"{ifname} in {ns} is not a port of {master}")
        if addr is not None:
            have = {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("family") == "inet"}
            if have != {addr}:
                problems.append(f"{ifname} in {ns} has addresses {sorted(have)}, not {addr}")

    sw = NETNS["sw"]
    want(sw, BRIDGE, kind="bridge", mac=BRIDGE_MAC["sw"])
    if links[sw].get(BRIDGE, {}).get("ifalias") != _owner_alias(d):
        problems.append(f"{BRIDGE} in {sw} is not marked as owned by {d}")
    for name in (*HOSTS, "client", *extras):
        want(sw, f"{VETH_PREFIX}{name}-sw", kind="veth", master=BRIDGE)
    for name in (*HOSTS, *extras):
        ns = NETNS[name]
        want(ns, BRIDGE, kind="bridge", mac=BRIDGE_MAC[name], addr=f"{host_address(net, name)}/{net.prefixlen}")
        want(ns, f"{VETH_PREFIX}{name}-up", kind="veth", master=BRIDGE)
        if _sysctl(ns, "net.ipv4.ip_forward") != "0":
            problems.append(f"net.ipv4.ip_forward is not 0 in {ns}")
    want(NETNS["client"], f"{VETH_PREFIX}client-up", kind="veth",
         addr=f"{host_address(net, 'client')}/{net.prefixlen}")
    for ns in spaces:
        want(ns, "lo", kind="")
    return problems


def _ensure_pki(pki_dir: Path, net: ipaddress.IPv4Network, names: Sequence[str] = HOSTS, ipv6: bool = False) -> None:
    """Make sure the lab CA, the certificates of hosts `names` and the admin's exist and fit `net`
    (and their IPv6 addresses too with `ipv6`)."""
    wanted = {name: [host_address(net, name), *([host_address6(net, name)] if ipv6 else [])] for name in names}
    wanted |= {ADMIN: []}
    if not (pki_dir / "ca.crt").exists() or not (pki_dir / "ca.key").exists():
        pki.init_ca(pki_dir, "phaul lab CA", force=True)
    try:
        for name, ips in wanted.items():
            _ensure_cert(pki_dir, name, ips)
    except PhaulError as e:
        log.warning("lab CA in %s is unusable (%s); making a new one", pki_dir, e.message)
        pki.init_ca(pki_dir, "phaul lab CA", force=True)
        for name, ips in wanted.items():
            pki.issue(pki_dir, name, ips=ips)


def _ensure_cert(pki_dir: Path, name: str, ips: list[str]) -> None:
    try:
        cred = pki.load(pki_dir, name)
        soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=7)
        if set(ips) <= set(cred.ips) and cred.not_after > soon:
            return
    except PhaulError as e:
        log.info("issuing lab certificate %s: %s", name, e.message)
    pki.issue(pki_dir, name, ips=ips)


# --- agents ------------------------------------------------------------------------------


FAULT_INJECTION_ENV = "PHAUL_LAB_FAULT_INJECTION"  # "1": the agents are test agents that take armed faults
TEST_AGENT = "phaul.testing.agent"  # the module run as the agent then


def agent_command(
    name: str,
    listen: str,
    socket: Path,
    state_dir: Path,
    cert: Path,
    key: Path,
    ca: Path,
    peers: Sequence[str] = HOSTS,
    python: str = sys.executable,
    bridge: str | None = None,
    fault_injection: bool = False,
) -> list[str]:
    """The argument list that runs one host's agent (without the nsenter prefix):
    `phaul agent`, or with `fault_injection` the test agent with fault injection on."""
    return [
        python, *(("-m", TEST_AGENT) if fault_injection else ("-m", "phaul", "agent")),
        "--name", name,
        "--listen", listen,
        "--socket", str(socket),
        "--state-dir", str(state_dir),
        "--cert", str(cert),
        "--key", str(key),
        "--ca", str(ca),
        "--peers", ",".join(peers),
        "--admins", ADMIN,
        # lab links are short: a stalled channel is dead after 5 s, an undecided gate after 120 s
        "--link-timeout", "5",
        "--gate-timeout", "120",
        "--resolve-interval", "5",
        # the lab's namespaces have no route out: the debian template downloads from the machine's own
        "--build-netns", f"/run/netns/{OUTSIDE_NETNS}",
        *(("--bridge", bridge) if bridge else ()),
        *(("--enable-fault-injection",) if fault_injection else ()),
    ]


@dataclass
class _Started:
    """An agent this call started and is waiting for."""

    name: str
    proc: subprocess.Popen[bytes]
    sock: Path
    logfile: Path


def _start_agent(host: HostEntry, files: PkiFiles, d: Path, peers: Sequence[str] = HOSTS) -> _Started | None:
    """Start host's agent unless it is alive with its socket and `peers` (then return None)."""
    state = host.state_dir or d / "hosts" / host.name
    sock = host.socket or state / "agent.sock"
    pid = _read_pid(state / "agent.pid")
    if pid is not None and _is_agent(pid, host.name, state):
        if sock.exists() and _agent_arg(pid, "--peers") == ",".join(peers) and _agent_arg(pid, "--listen") == host.address:
            return None
        log.warning("agent %s (pid %d) is alive without its socket, or with other peers or address; restarting it",
                    host.name, pid)
        _terminate(pid)
    pki_dir = d / "pki"
    cmd = [
        "nsenter", f"--net=/run/netns/{host.netns or NETNS[host.name]}", "--",
        *agent_command(
            host.name, host.address, sock, state,
            pki_dir / f"{host.name}.crt", pki_dir / f"{host.name}.key", files.ca, peers=peers, bridge=host.bridge,
            fault_injection=os.environ.get(FAULT_INJECTION_ENV) == "1",  # tests only: see phaul/testing/faults.py
        ),
    ]
    sock.unlink(missing_ok=True)
    logfile = state / "agent.log"
    if logfile.exists():
        logfile.replace(state / "agent.log.1")
    env = dict(os.environ)
    root = str(Path(phaul.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with logfile.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=state, env=env, start_new_session=True,
        )
    write_atomic(state / "agent.pid", f"{proc.pid}\n")
    log.info("started agent %s (pid %d) listening on %s", host.name, proc.pid, host.address)
    return _Started(host.name, proc, sock, logfile)


def _wait_agents(started: list[_Started], timeout: float = AGENT_START_TIMEOUT) -> None:
    """Wait for every started agent's socket; on a death or the timeout, stop them all and
    raise with the tail of the failing agent's log."""
    deadline = time.monotonic() + timeout
    pending = list(started)
    while pending:
        for a in list(pending):
            if a.sock.exists():
                pending.remove(a)
            elif a.proc.poll() is not None:
                _fail_agents(started, a, f"exited with status {a.proc.returncode} before creating {a.sock}")
        if pending and time.monotonic() > deadline:
            _fail_agents(started, pending[0], f"did not create {pending[0].sock} within {timeout:.0f} s")
        if pending:
            time.sleep(0.05)


def _fail_agents(started: list[_Started], failed: _Started, what: str) -> None:
    for a in started:
        _terminate(a.proc.pid)
        a.proc.poll()
    raise ToolFailed(
        f"agent {failed.name} {what}:\n{_tail(failed.logfile)}",
        f"see {failed.logfile}; stop the lab with `phaul lab down`",
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "  (no log)"
    return "\n".join(f"  | {line}" for line in text) or "  (empty log)"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_agent(pid: int, name: str, state: Path) -> bool:
    """Whether `pid` is a live (not zombie) agent for host `name` with state dir `state`."""
    if not procfs.alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args_s = [a.decode(errors="replace") for a in args]
    return ("agent" in args_s or TEST_AGENT in args_s) and str(state) in args_s and f"--name\0{name}" in "\0".join(args_s)


def _agent_arg(pid: int, flag: str) -> str | None:
    """The value of option `flag` (e.g. --peers) agent `pid` was started with."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _terminate(pid: int, timeout: float = AGENT_STOP_TIMEOUT) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not procfs.alive(pid):
                return
            time.sleep(0.05)
    log.warning("process %d survived SIGKILL", pid)


# --- exec ------------------------------------------------------------------------------------


def exec_in(name: str, args: Sequence[str]) -> int:
    """Run `args` in lab namespace `name` (alpha, beta, gamma, client or sw) with stdio inherited;
    return its exit status."""
    ns = NETNS.get(name) or (name if name in ALL_NAMESPACES else None)
    if ns is None:
        raise NotFound(f"no lab namespace {name!r}", f"use one of {', '.join(NETNS)}")
    if not args:
        raise InvalidInput("no command to run", f"write it after --, e.g. `phaul lab exec {name} -- ip addr`")
    if ns not in _netns_list():
        raise NotFound(f"lab namespace {ns} does not exist", "run `phaul lab up`")
    return subprocess.call(["nsenter", f"--net=/run/netns/{ns}", "--", *args])


exec = exec_in  # noqa: A001 -- the name the CLI verb uses; shadows the builtin only inside this module


# --- down --------------------------------------------------------------------------------------


def down(lab_dir: Path | None = None) -> list[str]:
    """Tear the lab down, however much of it exists; return what was removed.

    Stops agents, deletes runc containers, kills what is left in the lab namespaces
    and cgroups, removes the cgroups, namespaces, veths and mounts under the lab
    directory, then the directory. Raises ToolFailed at the end if something stayed."""
    t0 = time.monotonic()
    d = _resolve(lab_dir)
    removed: list[str] = []
    problems: list[str] = []
    states = sorted(p for p in (d / "hosts").iterdir() if p.is_dir()) if (d / "hosts").is_dir() else []

    for state in states:
        pid = _read_pid(state / "agent.pid")
        if pid is not None and _is_agent(pid, state.name, state):
            _terminate(pid)
            removed.append(f"agent {state.name} (pid {pid})")

    _thaw_cgroups()
    for state in states:
        removed += _delete_runc_containers(state, problems)

    for ns in ALL_NAMESPACES:
        killed = _kill_all(functools.partial(_netns_pids, ns))
        if killed:
            removed.append(f"{len(killed)} process(es) in {ns}")
    for cg in _lab_cgroups():
        killed = _kill_all(functools.partial(_cgroup_pids, cg))
        if killed:
            removed.append(f"{len(killed)} process(es) in cgroup {cg}")
    for cg in _lab_cgroups():
        removed += _rmdir_tree(cg, problems)

    present = _netns_list()
    for ns in (*ALL_NAMESPACES, OUTSIDE_NETNS):  # the outside's name only: its namespace is this host's
        if ns in present:
            r = _ip("netns", "delete", ns, check=False)
            (removed.append(f"netns {ns}") if r.returncode == 0 else problems.append(f"netns {ns}: {r.stderr.strip()}"))
    for link in _stale_root_links():
        if link not in _stale_root_links():
            continue  # went with its peer
        r = _ip("link", "delete", link, check=False)
        if r.returncode == 0 or "Cannot find device" in r.stderr:
            removed.append(f"link {link}")
        else:
            problems.append(f"link {link}: {r.stderr.strip()}")

    removed += _unmount_under(d, problems)
    if d.exists():
        removed += _remove_dir(d, problems)

    for item in removed:
        log.info("removed %s", item)
    log.info("lab down in %.2f s", time.monotonic() - t0)
    if problems:
        raise ToolFailed(
            "lab teardown left things behind: " + "; ".join(problems),
            "fix them by hand, then run `phaul lab down` again",
        )
    return removed


def _delete_runc_containers(state: Path, problems: list[str]) -> list[str]:
    root = state / "runc"
    if not root.is_dir():
        return []
    if shutil.which("runc") is None:
        problems.append(f"runc is not installed; cannot delete containers under {root}")
        return []
    r = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        problems.append(f"runc list in {root}: {r.stderr.strip()}")
        return []
    out = []
    for ct in r.stdout.split():
        d = subprocess.run(["runc", "--root", str(root), "delete", "--force", ct], capture_output=True, text=True, timeout=60)
        if d.returncode == 0:
            out.append(f"runc container {ct} on {state.name}")
        else:
            log.warning("runc delete --force %s (root %s): %s", ct, root, d.stderr.strip())
    return out


def _netns_pids(ns: str) -> set[int]:
    r = _ip("netns", "pids", ns, check=False)
    return {int(p) for p in r.stdout.split() if p.isdigit()} if r.returncode == 0 else set()


def _cgroup_pids(cg: Path) -> set[int]:
    pids: set[int] = set()
    for procs in cg.rglob("cgroup.procs"):
        try:
            pids |= {int(p) for p in procs.read_text().split()}
        except (OSError, ValueError):
            pass
    return pids


def _kill_all(find: Callable[[], set[int]], timeout: float = 5.0) -> set[int]:
    """SIGKILL what `find()` returns until it returns nothing live; return the pids killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    me = os.getpid()
    while time.monotonic() < deadline:
        pids = {p for p in find() if p != me and procfs.alive(p)}
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
                killed.add(p)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return killed


def _cgroup_roots() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    roots = [base] if (base / "cgroup.procs").exists() else []
    if base.is_dir():
        roots += sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists())
    return roots


def _lab_cgroups() -> list[Path]:
    return [root / name for root in _cgroup_roots() for name in CGROUP_NAMES if (root / name).is_dir()]


def _thaw_cgroups() -> None:
    """Thaw frozen lab cgroups so that killed tasks can exit."""
    for cg in _lab_cgroups():
        for f in [*cg.rglob("freezer.state"), *cg.rglob("cgroup.freeze")]:
            try:
                f.write_text("THAWED" if f.name == "freezer.state" else "0")
            except OSError:
                pass


def _rmdir_tree(cg: Path, problems: list[str]) -> list[str]:
    """Remove a cgroup directory and its children, deepest first."""
    failed = []
    for dirpath, _dirs, _files in os.walk(cg, topdown=False):
        for attempt in range(20):
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == 19:
                    failed.append(f"cgroup {dirpath}: {e.strerror}")
                    break
                time.sleep(0.05)
    problems += failed
    return [] if failed else [f"cgroup {cg}"]


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def _mounts_under(d: Path) -> list[str]:
    """Mount points at or under `d`, deepest and most recent first."""
    base = os.path.realpath(d)
    found: list[tuple[int, int, str]] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for i, line in enumerate(lines):
        mp = _unescape(line.split()[4])
        if mp == base or mp.startswith(base.rstrip("/") + "/"):
            found.append((mp.count("/"), i, mp))
    return [mp for _, _, mp in sorted(found, reverse=True)]


def _unmount_under(d: Path, problems: list[str]) -> list[str]:
    removed: list[str] = []
    for _ in range(20):
        mounts = _mounts_under(d)
        if not mounts:
            return removed
        for mp in mounts:
            r = subprocess.run(["umount", mp], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                r = subprocess.run(["umount", "-l", mp], capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                removed.append(f"mount {mp}")
    problems += [f"mount {mp} could not be unmounted" for mp in _mounts_under(d)]
    return removed


def _remove_dir(d: Path, problems: list[str]) -> list[str]:
    if _mounts_under(d):
        problems.append(f"{d} still has mounts; left it in place")
        return []
    known = {MARKER, "hosts", "pki", "hosts.json"}
    if not (d / MARKER).exists() and not {p.name for p in d.iterdir()} <= known:
        problems.append(f"{d} holds files phaul did not create and has no {MARKER} marker; left it in place")
        return []
    try:
        shutil.rmtree(d)
    except OSError as e:
        problems.append(f"{d}: {e}")
        return []
    return [f"directory {d}"]


# --- helpers -------------------------------------------------------------------------------------


def _resolve(d: Path | None) -> Path:
    path = Path(d).absolute() if d is not None else default_lab_dir()
    if len(path.parts) < 3:
        raise InvalidInput(f"lab directory {path} is too close to /", f"use a directory such as {LAB_DIR}")
    return path


def _owner_alias(d: Path) -> str:
    return (OWNER_ALIAS + str(d))[-255:]


def _owner() -> str | None:
    """The lab directory recorded on the switch bridge, if it exists."""
    link = _links(NETNS["sw"]).get(BRIDGE, {}) if NETNS["sw"] in _netns_list() else {}
    alias = link.get("ifalias", "")
    return alias[len(OWNER_ALIAS):] if alias.startswith(OWNER_ALIAS) else None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(("-n", ns) if ns else ()), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise ToolFailed(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}", "run `phaul lab down` and try again")
    return r


def _links(ns: str) -> dict[str, dict]:
    r = _ip("-j", "-d", "addr", "show", ns=ns, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return {}
    return {link["ifname"]: link for link in json.loads(r.stdout)}


def _netns_list() -> set[str]:
    r = _ip("-j", "netns", "list", check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return set()
    return {n["name"] for n in json.loads(r.stdout)}


def _stale_root_links() -> list[str]:
    r = _ip("-j", "link", "show", check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    return [link["ifname"] for link in json.loads(r.stdout) if link["ifname"].startswith(VETH_PREFIX)]


def _sysctl(ns: str, key: str, value: str | None = None) -> str:
    """Read (or set) a per-namespace sysctl inside lab namespace `ns`."""
    arg = ["-w", f"{key}={value}"] if value is not None else ["-n", key]
    cmd = ["nsenter", f"--net=/run/netns/{ns}", "--", "sysctl", *arg]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        if value is not None:
            raise ToolFailed(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}", "run `phaul lab down` and try again")
        return ""
    return r.stdout.strip()
