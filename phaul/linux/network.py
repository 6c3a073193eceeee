"""A container's network identity, and moving it with the container.

An addressed container (`ct create --ip ADDR/PREFIX`) has one interface,
`eth0`, with a fixed MAC derived from its ID, in the network namespace runc
made for it. Its peer, the host veth (`host_veth(ID)`), is a port of the
host's bridge, so the address sits on the host's segment.

runc has CRIU treat the network namespace as empty (`--empty-ns network`):
CRIU dumps the container's sockets, not its interfaces, and locks the
namespace while the container is frozen. On the destination CRIU creates a
fresh namespace and runs the `setup-namespaces` action before it restores
any socket; `restore_criu_options` hooks a script there that re-creates
`eth0` (same MAC, address, routes) with its peer on this host, down and off
the bridge, so the restored copy cannot be reached (nor answer with a RST)
until `TrafficHold.release` plugs it in after the commit.

What the pieces give:

- `plug` / `unplug`: the veth of a starting / removed container.
- `bridge_problem`, `address_problem`: the destination's preflight checks
  (phaul.migration.preflight) for an addressed container.
- `FreezeSignal` (source) and `TrafficHold` (destination): no client packet
  is lost while the container moves. When CRIU begins the final dump, the
  destination attracts the container's MAC to a holding port on its bridge
  and keeps every frame sent to it; once the source copy is gone it plugs
  the restored copy in, replays the kept frames into it in order (and those
  still arriving, until a short quiet moment), then announces the address
  from it. A client's packet (or retransmission) sent while the
  container was frozen reaches the restored socket as soon as it runs,
  instead of being dropped at the frozen source and waiting for the client's
  next retransmission timeout.
- `announce`: gratuitous ARP from inside a container's namespace.
- `close_tcp_connections`: `migrate --tcp=close`, a FIN on every
  established connection of a restored copy before it runs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from phaul.containers import ContainerConfig, ContainerKind
from phaul.errors import Conflict, InvalidInput, PhaulError, ToolFailed
from phaul.linux.run import run

log = logging.getLogger(__name__)

CT_IFNAME = "eth0"
HOST_VETH_PREFIX = "phv"  # host end of a container's veth
HOLD_PREFIX = "phh"  # holding port on the destination's bridge
HOLD_PEER_PREFIX = "phi"  # its peer, where the held frames are read
ARP_PROBE_WAIT = 0.2  # s to wait for answers to the address-in-use probe
# Re-announce the holding port: until CRIU has frozen and locked it, the source copy may still send.
ATTRACT_REPEAT_MS = (5, 10, 20, 30, 45, 60, 80, 100, 130, 160, 200, 300, 400)
FREEZE_POLL = 0.001
LINK_UP_WAIT = 1.0  # s a link just brought up may take to pass frames
HOLD_BUFFER = 16 << 20  # bytes of held frames the kernel keeps for us
# Release: the held frames are relayed in order until none came for RELAY_QUIET s (at most RELAY_MAX s).
RELAY_QUIET = 0.003
_WORD = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")  # what an address, MAC or link name may be in an `ip` line
RELAY_MAX = 0.1

_ETH_P_ALL = 0x0003
_ETH_P_ARP = 0x0806
_PACKET_OUTGOING = 4
_PACKET_VNET_HDR = 15
_SOL_PACKET = 263
_VNET_HDR_LEN = 10  # struct virtio_net_hdr: checksum and GSO offload state of a frame
_SO_RCVBUFFORCE = 33
_CLONE_NEWNET = 0x40000000
_SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)
_BROADCAST = b"\xff" * 6
_TCP_STATES_TO_CLOSE = {"01", "08"}  # ESTABLISHED, CLOSE_WAIT: we may still send our FIN

_libc = ctypes.CDLL(None, use_errno=True)


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a container is known by on the segment: address, MAC, gateway."""

    ct_id: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    mac: str
    gateway: str | None = None

    @classmethod
    def of(cls, config: ContainerConfig) -> Identity | None:
        """The identity of an addressed container; None when it has no address."""
        if not config.ip:
            return None
        if not config.mac:
            raise InvalidInput(f"container {config.id} has an address but no MAC", f"recreate it: phaul ct destroy {config.id}")
        return cls(config.id, ipaddress.ip_interface(config.ip), config.mac, config.gateway)

    @property
    def ip(self) -> str:
        return str(self.address.ip)

    @property
    def host_veth(self) -> str:
        return host_veth(self.ct_id)


def host_veth(ct_id: str) -> str:
    """The name of the host end of the container's veth (15 characters at most)."""
    return HOST_VETH_PREFIX + _digest(ct_id)[:10]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _host_mac(tag: str, ct_id: str) -> str:
    """A MAC for a host-side port: starts with fe, so it is never a bridge's lowest
    and never changes an unpinned bridge's own MAC."""
    digest = hashlib.sha256(f"{tag}:{ct_id}".encode()).digest()
    return "fe:" + ":".join(f"{b:02x}" for b in digest[:5])


# --- ip(8) ----------------------------------------------------------------------------


def _run(cmd: list[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return run(cmd, timeout=30, check=check, input=input, hint="see the agent's log")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _ip_in(pid: int, commands: list[str]) -> None:
    """Run `ip -batch` lines inside the network namespace of `pid`."""
    _run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", "ip", "-batch", "-"], input="\n".join(commands) + "\n")


def link(name: str) -> dict | None:
    """`ip -d link show NAME` as a dict, or None when there is no such link here."""
    r = _ip("-j", "-d", "link", "show", "dev", name, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return None
    found = json.loads(r.stdout)
    return found[0] if found else None


def delete_link(name: str) -> bool:
    """Delete a link (a veth takes its peer along); True if one was there."""
    r = _ip("link", "delete", "dev", name, check=False)
    return r.returncode == 0


# --- the container's interface -----------------------------------------------------------


def _word(value: str) -> str:
    """`value` if it is one plain word; the lines built here go to `ip -batch` and a
    shell script, where a space, newline or shell character would add commands."""
    if not _WORD.fullmatch(value):
        raise InvalidInput(f"refusing {value[:80]!r} in an `ip` command: not a plain address or name")
    return value


def _veth_command(ident: Identity, netns: str) -> list[str]:
    """`ip` arguments that make the container's veth: eth0 (its MAC) in the network
    namespace of process `netns`, the host end here, down and unplugged."""
    return ["link", "add", _word(ident.host_veth), "address", _host_mac("veth", ident.ct_id), "type", "veth",
            "peer", "name", CT_IFNAME, "address", _word(ident.mac), "netns", netns]


def _inside_commands(ident: Identity) -> list[str]:
    """`ip -batch` lines that configure the container's side."""
    commands = ["link set lo up", f"address add {_word(str(ident.address))} dev {CT_IFNAME}", f"link set {CT_IFNAME} up"]
    if ident.gateway:
        commands.append(f"route add default via {_word(ident.gateway)} dev {CT_IFNAME}")
    return commands


def plug(ident: Identity, pid: int, bridge: str) -> None:
    """Give the (created, not yet started) container whose init is `pid` its eth0,
    plugged into `bridge`; announce its address."""
    check_bridge(bridge, "this host")
    host = ident.host_veth
    if delete_link(host):
        log.info("removed a stale %s before plugging %s", host, ident.ct_id)
    _ip(*_veth_command(ident, str(pid)))
    try:
        _ip_in(pid, _inside_commands(ident))
        _ip("link", "set", host, "master", bridge, "up")
    except BaseException:
        delete_link(host)
        raise
    log.info("plugged %s (%s, %s) into %s through %s", ident.ct_id, ident.address, ident.mac, bridge, host)
    try:
        announce(pid, ident)
    except OSError as e:
        log.warning("could not announce %s: %s", ident.ip, e)


def unplug(ct_id: str) -> None:
    """Remove the host end of the container's veth, if it is still there. Idempotent."""
    if delete_link(host_veth(ct_id)):
        log.info("unplugged %s (%s)", ct_id, host_veth(ct_id))


def isolate(ct_id: str) -> None:
    """Take the container's port on the segment down: no frame reaches or leaves it."""
    _ip("link", "set", "dev", host_veth(ct_id), "down")


def rejoin(ct_id: str) -> None:
    """Bring the port `isolate` took down up again, if it is still there. Best effort."""
    if link(host_veth(ct_id)) is not None:
        _ip("link", "set", "dev", host_veth(ct_id), "up", check=False)


def restore_criu_options(ident: Identity | None, directory: Path) -> str:
    """Lines for the CRIU configuration file of a restore: a script (written into
    `directory`) that sets the new network namespace up at CRIU's `setup-namespaces`
    action, before any socket is restored. Every container gets its `lo` up (CRIU
    restores the namespace empty, and a connection or listener on 127.0.0.1 or ::1
    cannot be restored on a loopback that is down); an addressed one (`ident`) also
    gets eth0 re-created, its host end left down and unplugged until `plug_restored`."""
    ip, nsenter = _tool("ip"), _tool("nsenter")
    setup = ""
    inside = "link set lo up"
    if ident is not None:
        veth = " ".join(_veth_command(ident, '"$CRTOOLS_INIT_PID"'))
        setup = f"{ip} {veth}\n"
        inside = "\n".join(_inside_commands(ident))
    script = directory / "net-restore.sh"
    script.write_text(
        "#!/bin/sh\n# phaul: the container's network (generated). CRIU runs this at each action.\n"
        '[ "$CRTOOLS_SCRIPT_ACTION" = setup-namespaces ] || exit 0\nset -e\n'
        f"{setup}"
        f'{nsenter} --net=/proc/"$CRTOOLS_INIT_PID"/ns/net -- {ip} -batch - <<EOF\n{inside}\nEOF\n'
    )
    script.chmod(0o700)
    return f"action-script {script}\n"


def _tool(name: str) -> str:
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    raise ToolFailed(f"{name} not found", "install iproute2 and util-linux")


def plug_restored(ident: Identity, bridge: str, pid: int, *, learning: bool = True) -> None:
    """Put a restored copy (init `pid`) on the segment: plug the host end of its
    veth into `bridge` and bring it up; with `learning`, announce the address
    from inside. Without it the bridge does not learn the copy's MAC from its
    frames and nothing is announced (TrafficHold.release relays held frames first)."""
    veth = ident.host_veth
    if learning:
        _ip("link", "set", "dev", veth, "master", bridge, "up")
    else:
        _run(["ip", "-batch", "-"], input=f"link set dev {veth} master {bridge}\n"
             f"link set dev {veth} type bridge_slave learning off\nlink set dev {veth} up\n")
        _wait_oper_up(veth)
    # The restored kernel tried to resolve its peers while eth0 had no carrier; such
    # entries would hold its first answers until their next ARP retry (1 s).
    _ip_in(pid, [f"neighbour flush dev {CT_IFNAME}"])
    if learning:
        announce(pid, ident)  # the bridge now sends new frames to the restored eth0


def adopt_restored(containers: ContainerKind, ct_id: str, bridge: str | None) -> None:
    """Put a restored copy on the segment when nothing was held for it (its agent
    restarted meanwhile); removes a holding port the dead agent left."""
    ident = Identity.of(containers.config(ct_id))
    pid = containers.info(ct_id).pid
    if ident is None or not bridge or not pid:
        return
    TrafficHold(ident, bridge).close()
    plug_restored(ident, bridge, pid)


def reannounce(containers: ContainerKind, ct_id: str) -> None:
    """Announce the address of a container running here again, e.g. after a rollback
    (the segment may have learned the destination meanwhile). Best effort."""
    try:
        ident = Identity.of(containers.config(ct_id))
        pid = containers.info(ct_id).pid
        if ident is not None and pid:
            announce(pid, ident)
    except (PhaulError, OSError) as e:
        log.warning("announcing %s again failed: %s", ct_id, e)


# --- preflight ----------------------------------------------------------------------------


def check_bridge(bridge: str | None, where: str) -> None:
    """Raise Conflict unless `bridge` names a bridge on this host."""
    if not bridge:
        raise Conflict(
            f"{where} has no bridge for container interfaces",
            "start its agent with --bridge NAME (the bridge on the containers' segment)",
        )
    found = link(bridge)
    if found is None:
        raise Conflict(f"{where} has no bridge {bridge!r}: its containers cannot be plugged in",
                       "create the bridge or start the agent with the right --bridge")
    kind = found.get("linkinfo", {}).get("info_kind")
    if kind != "bridge":
        raise Conflict(f"{bridge!r} on {where} is a {kind or 'plain'} device, not a bridge",
                       "start the agent with --bridge naming a bridge")


def bridge_problem(bridge: str | None, where: str) -> str | None:
    """Why containers cannot be plugged into `bridge` on this host (`where`), or None."""
    try:
        check_bridge(bridge, where)
    except Conflict as e:
        return e.message
    return None


def address_problem(ident: Identity, where: str, others: Iterable[ContainerConfig], bridge: str | None) -> str | None:
    """Why the container's address cannot live on this host (`where`), or None: it
    is an address of the host, of another container of the host, or answered
    for on the bridge's segment by another machine (an ARP probe)."""
    for other in others:
        if other.id != ident.ct_id and other.ip and ipaddress.ip_interface(other.ip).ip == ident.address.ip:
            return f"container {other.id} on {where} already has {ident.ip}"
    r = _ip("-j", "address", "show")
    for dev in json.loads(r.stdout or "[]"):
        for a in dev.get("addr_info", []):
            if a.get("local") == ident.ip:
                return f"{ident.ip} is already an address of {where} ({dev['ifname']})"
    if bridge and link(bridge) is not None and ident.address.version == 4:
        owner = arp_probe(bridge, ident.address.ip, ignore_mac=ident.mac)
        if owner:
            return f"{ident.ip} is already in use on {where}'s segment (answered by {owner})"
    return None


def arp_probe(
    ifname: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, ignore_mac: str, wait: float = ARP_PROBE_WAIT
) -> str | None:
    """Ask (RFC 5227 probe) who has `ip` on `ifname`; the MAC of an answer from
    anyone but `ignore_mac`, else None."""
    mine = _mac_bytes(link(ifname)["address"])  # type: ignore[index]
    ignore = _mac_bytes(ignore_mac)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as s:
        s.bind((ifname, _ETH_P_ARP))
        s.send(_arp_frame(1, mine, b"\0" * 4, ip.packed, dst=_BROADCAST))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            frame = s.recv(2048)
            if len(frame) < 42 or frame[12:14] != b"\x08\x06" or frame[20:22] != b"\x00\x02":
                continue
            sha, spa = frame[22:28], frame[28:32]
            if spa == ip.packed and sha != ignore:
                return ":".join(f"{b:02x}" for b in sha)
    return None


# --- announcing --------------------------------------------------------------------------------


def announce(pid: int, ident: Identity) -> None:
    """Gratuitous ARP (request and reply) from the container's eth0: the segment's
    switches learn where its MAC is, its neighbours refresh their entries."""
    if ident.address.version != 4:
        return
    with _socket_in_netns(pid, socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
        s.bind((CT_IFNAME, 0))
        for frame in _garp_frames(ident):
            _send(s, frame)


def _send(s: socket.socket, frame: bytes, wait: float = LINK_UP_WAIT) -> None:
    """Send a frame on a packet socket; a link brought up a moment ago may refuse
    (ENETDOWN) until the kernel has activated its queues: retry for up to `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        try:
            s.send(frame)
            return
        except OSError as e:
            if e.errno != errno.ENETDOWN or time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def _garp_frames(ident: Identity) -> list[bytes]:
    mac, ip = _mac_bytes(ident.mac), ident.address.ip.packed
    return [_arp_frame(1, mac, ip, ip), _arp_frame(2, mac, ip, ip, tha=_BROADCAST)]


def _arp_frame(op: int, sha: bytes, spa: bytes, tpa: bytes, *, tha: bytes = b"\0" * 6, dst: bytes = _BROADCAST) -> bytes:
    eth = dst + sha + struct.pack("!H", _ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + sha + spa + tha + tpa
    return eth + arp


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


class _socket_in_netns:
    """A socket created inside the network namespace of `pid` (a context manager)."""

    def __init__(self, pid: int, family: int, type_: int, proto: int) -> None:
        box: dict[str, object] = {}

        def make() -> None:  # a thread of its own: setns changes only the calling thread
            try:
                fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns into the network namespace of {pid}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                box["sock"] = socket.socket(family, type_, proto)
            except BaseException as e:  # handed to the caller
                box["error"] = e

        t = threading.Thread(target=make, name=f"netns-{pid}")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        self.sock: socket.socket = box["sock"]  # type: ignore[assignment]

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# --- source side: the moment of the freeze -----------------------------------------------------


class FreezeSignal:
    """Tells the source agent when CRIU begins the final dump (its `pre-dump`
    action, just before it freezes the container), so that the destination
    starts holding the container's traffic at once: what the frozen copy would
    drop (TCP segments after the network lock) or swallow (UDP datagrams
    before it, which CRIU does not dump) is kept for the restored copy."""

    ACTION = "pre-dump"

    def __init__(self, path: Path) -> None:
        self.dir = path
        path.mkdir(parents=True, exist_ok=True)
        self.script = path / "net-hook.sh"
        self.marker = path / "freezing"
        self.marker.unlink(missing_ok=True)
        self.script.write_text(
            "#!/bin/sh\n# phaul network hook (generated). CRIU runs this at each action.\n"
            f'[ "$CRTOOLS_SCRIPT_ACTION" = {self.ACTION} ] && : > {self.marker}\nexit 0\n'
        )
        self.script.chmod(0o700)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def criu_options(self) -> str:
        return f"action-script {self.script}\n"

    def start(self, on_freeze: Callable[[], None]) -> None:
        """Call `on_freeze()` in a thread of its own once CRIU reaches the action."""

        def watch() -> None:
            while not self._stop.is_set():
                if self.marker.exists():
                    try:
                        on_freeze()
                    except Exception as e:  # holding is an optimisation; the migration goes on
                        log.warning("holding the container's traffic failed: %s", e)
                    return
                time.sleep(FREEZE_POLL)

        self._thread = threading.Thread(target=watch, name="freeze-signal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


# --- destination side: holding the container's traffic while it moves ------------------------


class TrafficHold:
    """A holding port for one incoming container on this host's bridge.

    `open()` (at prepare) makes a veth pair: one end a bridge port, the other
    read through a packet socket. `attract()` (when the source's final dump
    begins) sends gratuitous ARP for the container through it, so the segment
    delivers the container's frames here; the kernel keeps them in the socket.
    Nothing answers them meanwhile, so no copy acknowledges data that a
    rollback would lose. `release(pid)` (once the source copy is gone and the
    restored one, init `pid`, is about to run) plugs the restored eth0 into the
    bridge, replays the kept frames into it in order, then announces the address
    from it, so new frames go straight there. `close()` removes the pair.
    Frames keep their checksum and segmentation offload state (virtio_net_hdr)."""

    def __init__(self, ident: Identity, bridge: str) -> None:
        self.ident = ident
        self.bridge = bridge
        tag = _digest(ident.ct_id)[:10]
        self.port, self.peer = HOLD_PREFIX + tag, HOLD_PEER_PREFIX + tag
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.attracted_at: float | None = None
        self.replayed = 0

    def open(self) -> None:
        delete_link(self.port)  # a leftover of an agent that died
        _ip("link", "add", self.port, "address", _host_mac("hold", self.ident.ct_id), "type", "veth",
            "peer", "name", self.peer, "address", _host_mac("hold-peer", self.ident.ct_id))
        try:
            for name in (self.port, self.peer):
                _no_ipv6(name)
            _ip("link", "set", self.peer, "up")
            _ip("link", "set", self.port, "master", self.bridge, "up")
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            try:
                s.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
                s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, HOLD_BUFFER)
                s.bind((self.peer, _ETH_P_ALL))
                s.setblocking(False)
            except BaseException:
                s.close()
                raise
            self._sock = s
        except BaseException:
            delete_link(self.port)
            raise
        log.info("holding port %s for %s ready on %s", self.port, self.ident.ct_id, self.bridge)

    def attract(self) -> None:
        """Draw the container's frames to the holding port and keep them from now on."""
        with self._lock:
            if self._sock is None or self._thread is not None:
                return
            self._drain()  # frames flooded here before the move are not the container's to keep
            self._send_garp()
            self.attracted_at = time.monotonic()
            self._thread = threading.Thread(target=self._repeat, name=f"hold-{self.ident.ct_id}", daemon=True)
            self._thread.start()
        log.info("holding the traffic of %s (%s)", self.ident.ct_id, self.ident.ip)

    def release(self, pid: int) -> int:
        """Put the restored container (init `pid`) on the segment and send it what was
        held; returns the number of frames replayed."""
        t0 = time.monotonic()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is None or self.attracted_at is None:
            plug_restored(self.ident, self.bridge, pid)
            self.close()
            return 0
        # No frame may overtake a held one: a newer TCP segment reaching the restored socket
        # first makes it acknowledge a hole, and the client retransmits everything held. So the
        # host veth joins the bridge without learning (the container's own frames do not draw
        # its MAC away from the holding port) and the held frames, with those still arriving,
        # are relayed in order; only once no frame came for RELAY_QUIET does the bridge learn
        # the restored copy (the announcement), and the few frames kept meanwhile follow.
        veth = self.ident.host_veth
        plug_restored(self.ident, self.bridge, pid, learning=False)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as out:
            out.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
            out.bind((veth, 0))
            try:
                self._relay(out)
            finally:
                _ip("link", "set", "dev", veth, "type", "bridge_slave", "learning", "on")
            self._replay(out)
            announce(pid, self.ident)  # the bridge now sends new frames to the restored eth0
            self._replay(out)
            delete_link(self.port)  # frames already in our socket stay readable
            self._replay(out)
        now = time.monotonic()
        log.info("released %s: %d frame(s) held for %.0f ms replayed; release took %.1f ms",
                 self.ident.ct_id, self.replayed, (now - self.attracted_at) * 1000, (now - t0) * 1000)
        self.close()
        return self.replayed

    def close(self) -> None:
        """Stop holding and remove the holding port. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        delete_link(self.port)

    def _repeat(self) -> None:
        start = time.monotonic()
        for ms in ATTRACT_REPEAT_MS:
            if self._stop.wait(max(0.0, start + ms / 1000 - time.monotonic())):
                return
            with self._lock:
                if self._sock is None:
                    return
                self._send_garp()

    def _send_garp(self) -> None:
        assert self._sock is not None
        for frame in _garp_frames(self.ident):
            self._sock.send(b"\0" * _VNET_HDR_LEN + frame)

    def _frames(self) -> Iterable[tuple[bytes, int]]:
        assert self._sock is not None
        errors = 0
        while True:
            try:
                data, addr = self._sock.recvfrom(70000)
            except BlockingIOError:
                return
            except OSError as e:  # the port was removed: reported once, then the kept frames follow
                if e.errno not in (errno.ENETDOWN, errno.ENODEV, errno.ENXIO) or errors > 2:
                    raise
                errors += 1
                continue
            yield data, addr[2]

    def _drain(self) -> None:
        for _ in self._frames():
            pass

    def _relay(self, out: socket.socket) -> None:
        """Replay held frames, and those still arriving, until none came for RELAY_QUIET."""
        assert self._sock is not None
        start = quiet_since = time.monotonic()
        while True:
            if self._replay(out):
                quiet_since = time.monotonic()
            now = time.monotonic()
            if now - quiet_since >= RELAY_QUIET or now - start >= RELAY_MAX:
                return
            select.select([self._sock], [], [], RELAY_QUIET - (now - quiet_since))

    def _replay(self, out: socket.socket) -> int:
        """Send the frames held so far into the restored copy; returns how many were read."""
        if self._sock is None:
            return 0
        mac = _mac_bytes(self.ident.mac)
        read = 0
        for data, pkttype in self._frames():
            read += 1
            if pkttype == _PACKET_OUTGOING or data[_VNET_HDR_LEN:_VNET_HDR_LEN + 6] != mac:
                continue
            try:
                _send(out, data)
                self.replayed += 1
            except OSError as e:  # e.g. a frame the restored side cannot take; TCP resends it
                log.debug("dropping a held frame of %s: %s", self.ident.ct_id, e)
        return read


def _wait_oper_up(ifname: str, wait: float = LINK_UP_WAIT) -> None:
    """Wait until a link just brought up is operationally up: before that its queues may
    not be active yet, and a frame sent through it can vanish without an error."""
    deadline = time.monotonic() + wait
    while (found := link(ifname)) is not None and found.get("operstate") != "UP" and time.monotonic() < deadline:
        time.sleep(0.001)


def _no_ipv6(ifname: str) -> None:
    try:
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")
    except OSError:
        pass  # no IPv6 here


# --- migrate --tcp=close --------------------------------------------------------------------------


def close_tcp_connections(pid: int) -> int:
    """Shut down (FIN) every established TCP connection of the container whose
    init is `pid`, typically restored and held stopped: each peer sees a clean
    end of stream and the container's programs an end of file. Returns how many."""
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    inodes: set[str] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] in _TCP_STATES_TO_CLOSE:
                inodes.add(fields[9])
    closed: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not inodes - closed:
            continue
        try:
            if os.readlink(proc / "ns" / "pid") != ns:
                continue
            fds = [(fd.name, os.readlink(fd)) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        for fd, target in fds:
            inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
            if inode in inodes and inode not in closed and _shutdown_remote(int(proc.name), int(fd)):
                closed.add(inode)
    if closed:
        log.info("closed %d TCP connection(s) of the container with init %d", len(closed), pid)
    return len(closed)


def _shutdown_remote(pid: int, fd: int) -> bool:
    """shutdown(SHUT_RDWR) on file descriptor `fd` of process `pid` (through pidfd_getfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        mine = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if mine < 0:
            log.debug("pidfd_getfd(%d, %d): %s", pid, fd, os.strerror(ctypes.get_errno()))
            return False
        with socket.socket(fileno=mine) as s:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError as e:
                log.debug("shutdown of fd %d of %d: %s", fd, pid, e)
                return False
        return True
    finally:
        os.close(pidfd)
