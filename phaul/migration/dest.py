"""The destination side of a migration.

Prepare opens the migration's data channel into a fresh directory; the source
pushes the container's directory and the CRIU images there; Restore moves the
container into place and restores it held stopped; Resume lets it run; Abort
removes every trace of it. Nothing here runs until the source says so.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from phaul.agent.host import Host
from phaul.channels.fs_sync import RsyncReceiver
from phaul.channels.transport import TlsEndpoint
from phaul.containers import ContainerConfig, inbound
from phaul.errors import Conflict, NotFound, ToolFailed
from phaul.linux import criu, network
from phaul.linux.doctor import criu_path, criu_version
from phaul.memory import page_delta
from phaul.migration.journal import JournalEntry
from phaul.migration.report import Result
from phaul.migration.steps import Step, StepPoint
from phaul.validate import check_id

log = logging.getLogger(__name__)


@dataclass
class Incoming:
    """A migration this host receives."""

    migration_id: str
    ct_id: str
    source: str
    dir: Path
    receiver: RsyncReceiver
    state: str = "prepared"  # prepared, restored (held stopped), running, aborted
    placed: bool = False  # the container directory was moved into place
    lock: threading.Lock = field(default_factory=threading.Lock)
    net: network.TrafficHold | None = None  # an addressed container's holding port on the bridge
    tcp_close: bool = False  # close its established TCP connections before it runs
    stream: TlsEndpoint | None = None  # the page stream endpoint (phaul.memory.page_stream), if opened
    pid: int | None = None  # the restored copy's init, once restored


class Destination:
    """All incoming migrations of one host."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._incoming: dict[str, Incoming] = {}
        self._lock = threading.Lock()
        self.journal = host.journal

    def prepare(
        self, migration_id: str, source: str, config: ContainerConfig, source_criu: str,
        tcp_close: bool = False, source_address: str = "",
    ) -> str:
        """Check this host can take the container and open the data channel;
        returns the channel's ADDR:PORT."""
        check_id(migration_id, "migration ID")
        check_id(source, "source host name")
        ct_id = check_id(config.id)
        if source not in self.host.peers:
            raise Conflict(f"{self.host.name} does not accept migrations from {source}", f"add {source} to its --peers list")
        mine = criu_version(criu_path() or "")
        theirs = tuple(int(x) for x in source_criu.split(".") if x.isdigit()) if source_criu else ()
        if mine is None:
            raise ToolFailed(f"{self.host.name} has no usable CRIU", f"run `make setup` on {self.host.name}")
        if theirs and mine < theirs:
            raise Conflict(
                f"{self.host.name}'s CRIU {'.'.join(map(str, mine))} is older than {source}'s {source_criu}",
                f"upgrade CRIU on {self.host.name} (`make setup`)",
            )
        ident = network.Identity.of(config)
        if ident is not None:  # a container with an address needs the bridge (preflight checks the address)
            network.check_bridge(self.host.bridge, self.host.name)
        self.host.hook.at(Step.PREPARE, StepPoint(migration_id, "destination", self.host.state_dir))
        with self._lock:
            if self.host.containers.container_dir(ct_id).exists():
                raise Conflict(
                    f"{self.host.name} already has a container {ct_id}",
                    f"destroy it there (`phaul --host {self.host.name} ct destroy {ct_id}`) or migrate elsewhere",
                )
            if any(m.ct_id == ct_id and m.state != "aborted" for m in self._incoming.values()):
                raise Conflict(f"a migration of {ct_id} to {self.host.name} is already under way")
            mdir = self.host.migration_dir(migration_id)
            if mdir.exists():
                raise Conflict(f"migration {migration_id} already exists on {self.host.name}")
            self.journal.begin(migration_id, "destination", ct_id, source, source_address)
            for sub in ("ct", "images", "work"):
                (mdir / sub).mkdir(parents=True)
            receiver = RsyncReceiver(self.host.creds, mdir, self.host.address, source, self.host.timeouts.link)
            try:
                address = receiver.open()
                (mdir / "data-channel.pid").write_text(f"{receiver.endpoint.pid}\n")
            except BaseException as e:
                receiver.close()
                shutil.rmtree(mdir, ignore_errors=True)
                self._settle_quietly(migration_id, Result.REFUSED, str(e))
                raise
            self._incoming[migration_id] = Incoming(migration_id, ct_id, source, mdir, receiver, tcp_close=tcp_close)
        if ident is not None:
            self._prepare_network(migration_id, ident)
        log.info("migration %s: receiving %s from %s on %s", migration_id, ct_id, source, address)
        return address

    def open_page_stream(self, migration_id: str) -> str:
        """Open the migration's page stream endpoint (phaul.memory.page_stream) for the
        final page delta; returns its ADDR:PORT. It serves the source only."""
        m = self._get(migration_id)
        with m.lock:
            if m.state != "prepared":
                raise Conflict(f"migration {migration_id} is {m.state}; pages can only be sent before the restore")
            _close_stream(m)
            endpoint = TlsEndpoint(
                self.host.creds, self.host.address, m.source, [sys.executable, "-m", "phaul.memory.page_stream", str(m.dir)],
                self.host.timeouts.link,
            )
            address = endpoint.open(m.dir / "page-stream.log")
            m.stream = endpoint
        return address

    def apply_pages(self, migration_id: str) -> page_delta.ApplyStats:
        """Pre-copy: patch the images this host holds with the page delta the
        source pushed into delta/, so that images/ holds exactly its latest dump."""
        m = self._get(migration_id)
        with m.lock:
            if m.state != "prepared":
                raise Conflict(f"migration {migration_id} is {m.state}; pages can only be applied before the restore")
            try:
                stats = page_delta.apply_delta(m.dir / "delta", m.dir / "images")
            except page_delta.DeltaError as e:
                raise ToolFailed(f"migration {migration_id}: {e}", "the source sends the images whole instead") from None
        log.debug("migration %s: page delta applied: %d pages in %.0f ms", migration_id, stats.pages_written, stats.ms)
        return stats

    def restore(self, migration_id: str) -> dict[str, float]:
        """Restore the pushed container, held stopped. Returns CRIU's restore timings."""
        m = self._get(migration_id)
        with m.lock:
            if m.state != "prepared":
                raise Conflict(f"migration {migration_id} is {m.state}, not ready to restore")
            ct = self.host.containers
            target = ct.container_dir(m.ct_id)
            if target.exists():
                raise Conflict(f"{self.host.name} already has a container {m.ct_id}")
            if not (m.dir / "ct" / "phaul.json").exists():
                raise ToolFailed(f"migration {migration_id}: the container's files never arrived", "check the data channel log")
            inbound.check_container_dir(m.dir / "ct", m.ct_id)
            self.journal.record(migration_id, "destination", "restore")
            target.parent.mkdir(parents=True, exist_ok=True)
            (m.dir / "ct").rename(target)
            m.placed = True
            ct.rewrite_for_host(m.ct_id)
            conf = ct.criu_config_path(m.ct_id)
            conf.write_text("leave-stopped\n" + self._network_restore_options(m))
            t0 = time.monotonic()
            try:
                self.host.hook.at(Step.RESTORE, StepPoint(migration_id, "destination", self.host.state_dir, m.dir / "images"))
                m.pid = ct.restore(m.ct_id, m.dir / "images", m.dir / "work", timeout=self.host.timeouts.restore).pid
            finally:
                conf.write_text("")
            took = (time.monotonic() - t0) * 1000
            self.journal.record(migration_id, "destination", "restored")
            m.state = "restored"
        stats = criu.read_stats(m.dir / "work", "restore")
        stats["runc_restore"] = took
        log.info("migration %s: %s restored and held stopped in %.0f ms", migration_id, m.ct_id, took)
        return stats

    def resume(self, migration_id: str) -> None:
        """Let the held copy run. Idempotent, across agent restarts too."""
        if self.lookup(migration_id) is None and self._journaled(migration_id, "resume"):
            return
        m = self._get(migration_id)
        with m.lock:
            if m.state == "running":
                return
            if m.state != "restored":
                raise Conflict(f"migration {migration_id} is {m.state}; only a restored copy can be resumed")
            self.journal.record(migration_id, "destination", "resume")
            pid = m.pid or self.host.containers.info(m.ct_id).pid
            if pid:
                self._release_traffic(m, pid)
            if m.tcp_close and pid:
                network.close_tcp_connections(pid)
            self.host.containers.resume(m.ct_id)
            m.state = "running"
            if m.net is not None and pid:
                _announce(pid, m.net.ident)  # once more, now that it runs
        log.info("migration %s: %s runs on %s", migration_id, m.ct_id, self.host.name)

    def abort(self, migration_id: str) -> None:
        """Remove everything this migration put on this host. Idempotent."""
        with self._lock:
            m = self._incoming.get(migration_id)
        if m is None:
            shutil.rmtree(self.host.migration_dir(migration_id), ignore_errors=True)
            self._settle_quietly(migration_id, Result.ROLLED_BACK)
            return
        with m.lock:
            if m.state == "running":
                raise Conflict(f"migration {migration_id} already committed; its container runs here")
            m.receiver.close()
            _close_stream(m)
            if m.net is not None:
                m.net.close()
            if m.placed:
                self.host.containers.destroy(m.ct_id)
            shutil.rmtree(m.dir, ignore_errors=True)
            m.state = "aborted"
            self._settle_quietly(migration_id, Result.ROLLED_BACK)
        with self._lock:
            self._incoming.pop(migration_id, None)
        log.info("migration %s: aborted, %s removed from %s", migration_id, m.ct_id, self.host.name)

    def finish(self, migration_id: str) -> None:
        """Close the data channel and drop the migration's temporary files."""
        with self._lock:
            m = self._incoming.pop(migration_id, None)
        if m is None:
            if self._journaled(migration_id, "ok"):
                return  # finished already (the source and its resolver may both ask)
            raise NotFound(f"no migration {migration_id} on {self.host.name}")
        m.receiver.close()
        _close_stream(m)
        if m.net is not None:
            m.net.close()
        shutil.rmtree(m.dir, ignore_errors=True)
        self._settle_quietly(migration_id, Result.OK)

    def close_all(self) -> None:
        """Agent shutdown: abort what was not restored yet. A restored copy held
        stopped is kept: the source may have destroyed its own copy already (the
        next agent reloads it from the journal)."""
        for mid, m in list(self._incoming.items()):
            if m.state != "prepared":
                m.receiver.close()
                _close_stream(m)
                if m.net is not None:  # its held frames die with this agent
                    m.net.close()
                continue
            try:
                self.abort(mid)
            except Exception as e:  # keep shutting down
                log.warning("migration %s: %s", mid, e)

    def hold_traffic(self, migration_id: str) -> None:
        """The source's final dump begins: keep the container's frames until its copy here runs."""
        m = self._get(migration_id)
        if m.net is not None:
            m.net.attract()

    # -- network (phaul.linux.network) -----------------------------------------------------

    def _prepare_network(self, migration_id: str, ident: network.Identity) -> None:
        """Open the holding port of an addressed container; on failure nothing is left."""
        assert self.host.bridge is not None  # prepare refused otherwise
        hold = network.TrafficHold(ident, self.host.bridge)
        try:
            hold.open()
        except BaseException:
            self.abort(migration_id)
            raise
        self._get(migration_id).net = hold

    def _network_restore_options(self, m: Incoming) -> str:
        if m.net is None:
            return ""
        network.unplug(m.ct_id)  # a host veth left from the container's last stay here
        return network.restore_criu_options(m.net.ident, m.dir)

    def _release_traffic(self, m: Incoming, pid: int) -> None:
        """The source copy is gone: put the restored copy (init `pid`) on the segment
        and hand it the frames held meanwhile."""
        if m.net is None:  # e.g. reloaded after an agent restart: no frames were kept
            network.adopt_restored(self.host.containers, m.ct_id, self.host.bridge)
            return
        try:
            m.net.release(pid)
        except Exception:
            m.net.close()
            raise

    # -- the journal and recovery (phaul.migration.recovery) ------------------------------------

    def _settle_quietly(self, migration_id: str, result: Result, error: str = "") -> None:
        """Journal how this host's part ended, if it was journaled and is not settled yet."""
        try:
            if not self.journal.get(migration_id, "destination").settled:
                self.journal.settle(migration_id, "destination", result, error)
        except NotFound:
            pass
        except OSError as e:  # e.g. the state directory is full: recovery settles it later
            log.warning("migration %s: cannot journal %s: %s", migration_id, result, e)

    def _journaled(self, migration_id: str, step: str) -> bool:
        try:
            return self.journal.get(migration_id, "destination").reached(step)
        except NotFound:
            return False

    def busy(self, ct_id: str) -> bool:
        """A migration of container `ct_id` to this host is under way."""
        with self._lock:
            return any(m.ct_id == ct_id and m.state != "aborted" for m in self._incoming.values())

    def lookup(self, migration_id: str) -> Incoming | None:
        with self._lock:
            return self._incoming.get(migration_id)

    def forget(self, migration_id: str) -> None:
        with self._lock:
            m = self._incoming.pop(migration_id, None)
        if m is not None:
            m.receiver.close()

    def reload_restored(self, e: JournalEntry) -> None:
        """After an agent restart: take back a copy restored and held here, so that
        the source can still tell it to run or to go."""
        mdir = self.host.migration_dir(e.migration_id)
        mdir.mkdir(parents=True, exist_ok=True)
        receiver = RsyncReceiver(self.host.creds, mdir, self.host.address, e.peer, self.host.timeouts.link)
        with self._lock:
            self._incoming[e.migration_id] = Incoming(
                e.migration_id, e.ct, e.peer, mdir, receiver, state="restored", placed=True,
            )

    def remove_leftovers(self, e: JournalEntry) -> None:
        """After an agent restart: remove what a migration whose restore never ended
        left here (its container is ours only if it was moved into place from the
        migration's directory)."""
        mdir = self.host.migration_dir(e.migration_id)
        target = self.host.containers.container_dir(e.ct)
        if e.reached("restore") and target.exists() and not (mdir / "ct").exists():
            try:
                self.host.containers.destroy(e.ct)
            except NotFound:
                pass
        shutil.rmtree(mdir, ignore_errors=True)
        with self._lock:
            self._incoming.pop(e.migration_id, None)

    def _get(self, migration_id: str) -> Incoming:
        with self._lock:
            m = self._incoming.get(migration_id)
        if m is None:
            raise NotFound(f"no migration {migration_id} on {self.host.name}", "the destination agent may have restarted")
        return m


def _announce(pid: int, ident: network.Identity) -> None:
    try:
        network.announce(pid, ident)
    except OSError as e:
        log.warning("announcing %s failed: %s", ident.ip, e)


def _close_stream(m: Incoming) -> None:
    if m.stream is not None:
        m.stream.close()
        m.stream = None
