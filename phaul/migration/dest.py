"""The destination side of a migration.

Prepare opens the migration's data channel into a fresh directory; the source
pushes the container's directory and the CRIU images there; Restore moves the
container into place and restores it held stopped; Resume lets it run; Abort
removes every trace of it. Nothing here runs until the source says so.

Layout: `STATE/incoming/<id>/` (`Host.incoming_dir`, mode 0700) is the agent's:
the rsync daemon's configuration, the secret file, the data-channel and
page-stream logs, the seal file, `work/` (CRIU's and runc's work directory and
logs) and CRIU's net-restore.sh. The peer writes only into `recv/`: `ct/`
(the container's directory, whose root file system may hold anything), and
`images/`, `delta/` and `rounds/`, which receive regular files and
directories only (phaul.channels.fs_sync). See the `Incoming` properties.

Sealing: the peer's write access ends before this host reads what it pushed.
`Destination.seal` creates the seal file (the data-channel gate,
phaul.channels.transport.GATE, then refuses every new connection) and ends
every connection live on the rsync and page stream endpoints, their
listeners kept. ApplyPages seals for the time it applies delta/ to images/
and unseals after (the next pre-copy round pushes again); it spares the rsync
connections already chrooted into recv/ct (the round's file system sync runs
beside the memory transfer, and ApplyPages does not read ct/), while new
connections of every area wait for the unseal (refused meanwhile). Restore seals and
closes both endpoints, listeners and all, before it reads anything; the
migration stays sealed from then on (Resume seals again, a no-op; a copy
reloaded after an agent restart is sealed with no endpoint open). The page
stream is the one writer that reads: its process applies the delta it
received itself, while its connection lives.

Soft-dirty pre-copy: CRIU's `parent` links in image directories are never
received (the data areas take no symbolic links); Restore creates them
(`_link_parents`): rounds/K/parent -> ../K-1 and images/parent -> ../rounds/N,
N the last round received. A final dump made without a parent (pre-copy
fell back to stop-and-copy) has no page in its parent, and CRIU only opens
the parent's page maps for the same task IDs, so the link is harmless there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from phaul.agent.host import Host
from phaul.channels.fs_sync import AREAS, RsyncReceiver
from phaul.channels.transport import TlsEndpoint, new_secret, rsh_env, write_secret
from phaul.containers import ContainerConfig, inbound
from phaul.endpoint import parse_endpoint
from phaul.errors import Busy, Conflict, InvalidInput, NotFound, Refused, ToolFailed
from phaul.linux import criu, criu_images, network
from phaul.linux.datatree import check_data_tree
from phaul.linux.doctor import criu_path, criu_version
from phaul.memory import lazy_link, page_basis, page_delta
from phaul.migration import quota
from phaul.migration.journal import JournalEntry
from phaul.migration.offline import OFFLINE_MARK, OFFLINE_START
from phaul.migration.report import Result
from phaul.migration.steps import Step, StepPoint
from phaul.validate import check_id

log = logging.getLogger(__name__)

KEEPER_READY_S = 30.0  # s: the post-copy keeper listens, and then holds every task's userfaultfd, within this


@dataclass
class Incoming:
    """A migration this host receives."""

    migration_id: str
    ct_id: str
    source: str
    dir: Path  # Host.incoming_dir: the agent's (see the module docstring)
    receiver: RsyncReceiver | None = None
    state: str = "prepared"  # prepared, restored (held stopped), running, aborted
    placed: bool = False  # the container directory was moved into place
    lock: threading.Lock = field(default_factory=threading.Lock)
    net: network.TrafficHold | None = None  # an addressed container's holding port on the bridge
    tcp_close: bool = False  # close its established TCP connections before it runs
    stream: TlsEndpoint | None = None  # the page stream endpoint (phaul.memory.page_stream), if opened
    pid: int | None = None  # the restored copy's init, once restored
    stopped: tuple[int, ...] = ()  # container PIDs of the tasks stopped when dumped: resume leaves them stopped
    touched: float = field(default_factory=time.monotonic)  # the last call naming it (or byte received)
    config: ContainerConfig | None = None  # the validated configuration from Prepare (None once reloaded)
    watch: quota.QuotaWatch | None = None  # measures recv/ while the data channel is open
    cut: quota.QuotaExceeded | None = None  # why it was cut off (over quota): every later call says so
    source_address: str = ""  # the source agent's ADDR:PORT, from Prepare
    page_link: str = ""  # post-copy: where the source serves the pages (Prepare, checked)
    keeper: subprocess.Popen[bytes] | None = None  # post-copy: phaul.memory.lazy_link's keeper, until every page is here
    offline: bool = False  # no images (phaul.migration.offline): Restore creates the container, Resume starts it
    start: bool = False  # offline: Resume runs the command (else the container stays created)
    standby: bool = False  # a standby refresh (phaul.standby): kept, never restored from the source's say

    @property
    def lazy_status(self) -> Path:
        """The keeper's status file (phaul.memory.lazy_link)."""
        return self.work_dir / "lazy.status"

    @property
    def recv_dir(self) -> Path:
        """The only tree the peer can write."""
        return self.dir / "recv"

    @property
    def ct_dir(self) -> Path:
        return self.recv_dir / "ct"

    @property
    def images_dir(self) -> Path:
        return self.recv_dir / "images"

    @property
    def delta_dir(self) -> Path:
        return self.recv_dir / "delta"

    @property
    def rounds_dir(self) -> Path:
        return self.recv_dir / "rounds"

    @property
    def basis_dir(self) -> Path:
        """Hybrid: the last pre-copy round's images, kept by KeepBasis (the agent's)."""
        return self.dir / "basis"

    @property
    def work_dir(self) -> Path:
        """CRIU's and runc's work directory and logs (the agent's)."""
        return self.dir / "work"

    @property
    def secret_file(self) -> Path:
        return self.dir / "secret"

    @property
    def seal_file(self) -> Path:
        return self.dir / "sealed"


def _receiver(host: Host, m: Incoming) -> RsyncReceiver:
    return RsyncReceiver(
        host.creds, m.dir, m.recv_dir, host.address, m.source, host.timeouts.link, m.secret_file, m.seal_file,
    )


class Destination:
    """All incoming migrations of one host."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._incoming: dict[str, Incoming] = {}
        self._lock = threading.Lock()
        self.journal = host.journal

    def prepare(
        self, migration_id: str, source: str, config: ContainerConfig, source_criu: str, need_bytes: int,
        tcp_close: bool = False, source_address: str = "", page_link: str = "", offline: bool = False, start: bool = False,
        standby: bool = False,
    ) -> tuple[str, str]:
        """Check this host can take the container (`need_bytes`: what the source will
        write here, phaul.migration.quota) and open the data channel; returns the
        channel's ADDR:PORT and the migration's secret. `page_link`: post-copy; the
        source will serve the container's memory there (ADDR:PORT on the source agent's
        address), fetched after the restore by a keeper (phaul.memory.lazy_link). `offline`:
        no images come (phaul.migration.offline); `start`: Resume runs its command."""
        check_id(migration_id, "migration ID")
        check_id(source, "source host name")
        ct_id = check_id(config.id)
        if source not in self.host.peers:
            raise Conflict(f"{self.host.name} does not accept migrations from {source}", f"add {source} to its --peers list")
        mine = criu_version(criu_path() or "")
        theirs = tuple(int(x) for x in source_criu.split(".") if x.isdigit()) if source_criu else ()
        if offline and page_link:
            raise Refused("an offline migration has no post-copy page link", "upgrade phaul on the source host")
        if mine is None and not offline:
            raise ToolFailed(f"{self.host.name} has no usable CRIU", f"run `make setup` on {self.host.name}")
        if theirs and mine is not None and mine < theirs:
            raise Conflict(
                f"{self.host.name}'s CRIU {'.'.join(map(str, mine))} is older than {source}'s {source_criu}",
                f"upgrade CRIU on {self.host.name} (`make setup`)",
            )
        if page_link:
            _check_page_link(page_link, source, source_address)
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
            self._check_bounds(source)
            self._check_space(need_bytes)
            mdir = self.host.incoming_dir(migration_id)
            if mdir.exists():
                raise Conflict(f"migration {migration_id} already exists on {self.host.name}")
            self.journal.begin(migration_id, "destination", ct_id, source, source_address)
            if offline:  # what a restarted agent reloads (reload_restored)
                self.journal.record(migration_id, "destination", OFFLINE_START if start else OFFLINE_MARK)
            m = Incoming(migration_id, ct_id, source, mdir, tcp_close=tcp_close, config=config, source_address=source_address,
                         page_link=page_link, offline=offline, start=start, standby=standby)
            secret = new_secret()
            receiver = m.receiver = _receiver(self.host, m)
            try:
                mdir.parent.mkdir(parents=True, exist_ok=True)
                mdir.mkdir(mode=0o700)
                m.work_dir.mkdir()
                for area in AREAS:
                    (m.recv_dir / area).mkdir(parents=True)
                write_secret(m.secret_file, secret)
                if page_link:
                    self._spawn_keeper(m, page_link)
                address = receiver.open()
                (mdir / "data-channel.pid").write_text(f"{receiver.endpoint.pid}\n")
                self._watch_quota(m, need_bytes)
            except BaseException as e:
                _stop_keeper(m)
                _close_channels(m)
                receiver.close()
                shutil.rmtree(mdir, ignore_errors=True)
                self._settle_quietly(migration_id, Result.REFUSED, str(e))
                raise
            self._incoming[migration_id] = m
        # offline: `start` plugs it in, as `phaul ct start` does; a standby refresh never runs here: no frames to hold
        if ident is not None and not offline and not standby:
            self._prepare_network(migration_id, ident)
        log.info("migration %s: receiving %s from %s on %s", migration_id, ct_id, source, address)
        return address, secret

    def _check_bounds(self, source: str) -> None:
        """Busy when this host receives as many migrations as its limits allow (with self._lock held)."""
        limits = self.host.limits
        running = [m for m in self._incoming.values() if m.state != "aborted"]
        if len(running) >= limits.incoming:
            raise Busy(f"{self.host.name} already receives {len(running)} migrations", "try again when one has ended")
        if sum(m.source == source for m in running) >= limits.incoming_per_peer:
            raise Busy(
                f"{self.host.name} already receives {limits.incoming_per_peer} migrations from {source}",
                "try again when one has ended",
            )

    def _check_space(self, need_bytes: int) -> None:
        free = quota.measure_free(self.host.state_dir)
        if need_bytes > free - self.host.limits.disk_reserve:
            raise Busy(
                f"the migration needs {need_bytes >> 20} MiB; {self.host.name} has {free >> 20} MiB free"
                f" in {self.host.state_dir}",
                "free space there or migrate elsewhere",
            )

    def _watch_quota(self, m: Incoming, need_bytes: int) -> None:
        def exceeded(e: quota.QuotaExceeded) -> None:
            with m.lock:
                self._cut_off(m, e)

        def grew() -> None:
            m.touched = time.monotonic()  # bytes arriving: the migration is not idle

        limits = self.host.limits
        m.watch = quota.QuotaWatch(m.recv_dir, limits.quota(need_bytes), limits.disk_reserve, exceeded, grew)
        m.watch.start()

    def _check_quota(self, m: Incoming) -> None:
        """Measure what arrived, exactly (the channel sealed); cut the migration off when
        over (with m.lock held)."""
        if m.watch is None:
            return
        try:
            m.watch.check_now()
        except quota.QuotaExceeded as e:
            self._cut_off(m, e)
            raise

    def _cut_off(self, m: Incoming, e: quota.QuotaExceeded) -> None:
        """Over quota (with m.lock held): the channel closes, what arrived goes, every
        later call but Abort fails with `e`."""
        if m.cut is not None or m.state != "prepared":
            return
        log.warning("migration %s from %s: cut off: %s", m.migration_id, m.source, e.message)
        m.cut = e
        self.seal(m)
        _close_channels(m)
        shutil.rmtree(m.recv_dir, ignore_errors=True)

    def open_page_stream(self, migration_id: str) -> str:
        """Open the migration's page stream endpoint (phaul.memory.page_stream) for the
        final page delta; returns its ADDR:PORT. It serves the source only."""
        m = self._get(migration_id)
        with m.lock:
            if m.state != "prepared":
                raise Conflict(f"migration {migration_id} is {m.state}; pages can only be sent before the restore")
            _close_stream(m)
            endpoint = TlsEndpoint(
                self.host.creds, self.host.address, m.source,
                [sys.executable, "-m", "phaul.memory.page_stream", m.secret_file, m.delta_dir, m.images_dir],
                self.host.timeouts.link, m.seal_file, m.dir,
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
            self.seal(m, keep_ct=True)  # a pre-copy round's file system sync runs beside it
            try:
                self._check_quota(m)
                for area in (m.delta_dir, m.images_dir):
                    check_data_tree(area)
                stats = page_delta.apply_delta(m.delta_dir, m.images_dir)
            except page_delta.DeltaError as e:
                raise ToolFailed(f"migration {migration_id}: {e}", "the source sends the images whole instead") from None
            finally:
                if m.cut is None:
                    _unseal(m)
        log.debug("migration %s: page delta applied: %d pages in %.0f ms", migration_id, stats.pages_written, stats.ms)
        return stats

    def keep_basis(self, migration_id: str) -> None:
        """Hybrid, before the final dump: keep what images/ holds now (the last pre-copy
        round) in basis/, out of the peer's reach, for the keeper to rebuild the pages the
        source sends as references to it (phaul.memory.page_basis)."""
        m = self._get(migration_id)
        with m.lock:
            if m.state != "prepared" or not m.page_link:
                raise Conflict(f"migration {migration_id} is {m.state} and not post-copy: no basis to keep")
            shutil.rmtree(m.basis_dir, ignore_errors=True)
            try:
                n = page_basis.keep_basis(m.images_dir, m.basis_dir)
            except InvalidInput:
                shutil.rmtree(m.basis_dir, ignore_errors=True)
                raise
        log.debug("migration %s: %d image files kept as the page link's basis", migration_id, n)

    def restore(self, migration_id: str) -> dict[str, float]:
        """Restore the pushed container, held stopped. Returns CRIU's restore timings.
        Post-copy: without its private memory, which a keeper (phaul.memory.lazy_link)
        fetches; it holds every task's userfaultfd before this returns."""
        m = self._get(migration_id)
        page_link = m.page_link
        with m.lock:
            if m.state != "prepared" or m.standby:
                what = "a standby refresh" if m.standby else m.state
                raise Conflict(f"migration {migration_id} is {what}, not ready to restore")
            ct = self.host.containers
            target = ct.container_dir(m.ct_id)
            if target.exists():
                raise Conflict(f"{self.host.name} already has a container {m.ct_id}")
            self._take_arrival(m)
            assert m.config is not None  # set by prepare; a reloaded migration is restored already
            check_data_tree(m.images_dir)
            _link_parents(m)
            self.journal.record(migration_id, "destination", "restore")
            target.parent.mkdir(parents=True, exist_ok=True)
            m.ct_dir.rename(target)  # renames whatever is there now, never following it
            m.placed = True
            inbound.strip_container_dir(target)  # again where it lies, out of the peer's reach
            ct.adopt(m.ct_id, m.config)
            if m.offline:  # created from its configuration, its command not run (phaul.migration.offline)
                self.host.hook.at(Step.RESTORE, StepPoint(migration_id, "destination", self.host.state_dir, None, target))
                self.journal.record(migration_id, "destination", "restored")
                m.state = "restored"
                log.info("migration %s: %s created from its configuration on %s", migration_id, m.ct_id, self.host.name)
                return {}
            ct.set_criu_options(m.ct_id, "leave-stopped\n" + self._network_restore_options(m))
            t0 = time.monotonic()
            try:
                self.host.hook.at(Step.RESTORE, StepPoint(migration_id, "destination", self.host.state_dir, m.images_dir, target))
                checked = criu_images.validate_for_bundle(m.images_dir, target / "bundle" / "config.json")  # as placed here
                m.stopped = checked.stopped
                t_keeper = time.monotonic()
                if page_link:
                    self._start_keeper(m)
                lazy_ms = {"lazy_start": (time.monotonic() - t_keeper) * 1000} if page_link else {}
                m.pid = ct.restore(
                    m.ct_id, m.images_dir, m.work_dir, timeout=self.host.timeouts.restore, lazy_pages=bool(page_link),
                ).pid
                if page_link:
                    t_held = time.monotonic()
                    self._wait_keeper(m, "held", KEEPER_READY_S)
                    lazy_ms["lazy_held"] = (time.monotonic() - t_held) * 1000
            except BaseException:
                _stop_keeper(m)
                raise
            finally:
                with contextlib.suppress(OSError):  # best effort (a full disk): the next step writes its own
                    ct.set_criu_options(m.ct_id)
            took = (time.monotonic() - t0) * 1000
            self.journal.record(migration_id, "destination", "restored")
            m.state = "restored"
        stats = criu.read_stats(m.work_dir, "restore")
        stats["runc_restore"] = took
        stats["image_check"] = checked.ms
        stats.update(lazy_ms)
        log.info("migration %s: %s restored and held stopped in %.0f ms", migration_id, m.ct_id, took)
        return stats

    def keep(self, migration_id: str) -> Incoming:
        """A standby refresh (phaul.standby) has pushed everything: seal it, check what
        arrived as Restore would (quota, the container directory stripped to its root file
        system, the images a data tree) and hand it over: the migration is no longer this
        object's, its journal settled; nothing was placed or runs. The caller moves `dir`."""
        m = self._get(migration_id)
        with m.lock:
            if m.state != "prepared" or m.config is None or not m.standby:
                raise Conflict(f"migration {migration_id} is {m.state} and no standby refresh: not a checkpoint to keep")
            self._take_arrival(m)
            check_data_tree(m.images_dir)
            if m.net is not None:
                m.net.close()
            m.state = "kept"
        with self._lock:
            self._incoming.pop(migration_id, None)
        self._settle_quietly(migration_id, Result.OK)
        return m

    def take_kept(self, m: Incoming) -> None:
        """Failover (phaul.standby): take a kept checkpoint back as a prepared migration,
        sealed, so that `restore` and `resume` run it as any other; its journal begins here."""
        assert m.config is not None
        m.state, m.receiver, m.stream, m.watch, m.standby = "prepared", None, None, None, False
        m.seal_file.touch()
        with self._lock:
            if m.migration_id in self._incoming:
                raise Conflict(f"migration {m.migration_id} already exists on {self.host.name}")
            self.journal.begin(m.migration_id, "destination", m.ct_id, m.source, m.source_address)
            self._incoming[m.migration_id] = m
        ident = network.Identity.of(m.config)
        if ident is not None:
            network.check_bridge(self.host.bridge, self.host.name)
            self._prepare_network(m.migration_id, ident)

    def _spawn_keeper(self, m: Incoming, page_link: str) -> None:
        """Post-copy, at Prepare: the keeper (phaul.memory.lazy_link), waiting on its stdin
        for the restore (its start-up is then out of the frozen time; it ends if this agent
        dies before)."""
        ct = self.host.containers
        criu_bin = criu_path()
        if criu_bin is None:
            raise ToolFailed(f"{self.host.name} has no usable CRIU", f"run `make setup` on {self.host.name}")
        cmd = [
            sys.executable, "-m", "phaul.memory.lazy_link", "keep", "--criu", criu_bin, "--images", str(m.images_dir),
            "--work", str(m.work_dir), "--status", str(m.lazy_status), "--secret-file", str(m.secret_file),
            "--redial-s", str(self.host.timeouts.link * 2), "--basis", str(m.basis_dir),
        ]
        for procs in ct.cgroup_procs(m.ct_id):
            cmd += ["--procs", str(procs)]
        env = {**os.environ, **rsh_env(self.host.creds, page_link, m.source, self.host.timeouts.link)}
        m.lazy_status.unlink(missing_ok=True)
        with open(m.work_dir / "lazy-link.log", "ab") as out:
            m.keeper = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=out, stderr=out, env=env, start_new_session=True,
            )

    def _start_keeper(self, m: Incoming) -> None:
        """Post-copy, the images here: let the keeper start the lazy-pages daemon and wait
        until it listens for the restore."""
        assert m.keeper is not None and m.keeper.stdin is not None
        try:
            m.keeper.stdin.write(lazy_link.GO)
            m.keeper.stdin.close()
        except OSError as e:
            raise ToolFailed(
                f"the post-copy keeper on {self.host.name} is gone: {e}", f"see {m.work_dir / 'lazy-link.log'}"
            ) from None
        self._wait_keeper(m, "listening", KEEPER_READY_S)
        deadline = time.monotonic() + KEEPER_READY_S
        while not (m.work_dir / "lazy-pages.socket").exists():
            if m.keeper.poll() is not None or time.monotonic() > deadline:
                raise ToolFailed(
                    f"CRIU's lazy-pages daemon did not start on {self.host.name}", f"see {m.work_dir / 'lazy-pages.log'}"
                )
            time.sleep(0.002)

    def _wait_keeper(self, m: Incoming, key: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while key not in lazy_link.read_status(m.lazy_status):
            assert m.keeper is not None
            if m.keeper.poll() is not None or time.monotonic() > deadline:
                status = lazy_link.read_status(m.lazy_status)
                raise ToolFailed(
                    f"the post-copy keeper on {self.host.name} did not get to '{key}': {status.get('error', status)}",
                    f"see {m.work_dir / 'lazy-link.log'} and {m.work_dir / 'lazy-pages.log'}",
                )
            time.sleep(0.002)

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
            self.seal(m)
            if m.offline:
                self._start_offline(m)
                return
            self.journal.record(migration_id, "destination", "resume")
            pid = m.pid or self.host.containers.info(m.ct_id).pid
            if pid:
                self._release_traffic(m, pid)
            if m.tcp_close and pid:
                network.close_tcp_connections(pid)
            self.host.containers.resume(m.ct_id, m.stopped)
            m.state = "running"
            if m.net is not None and pid:
                _announce(pid, m.net.ident)  # once more, now that it runs
        log.info("migration %s: %s runs on %s", migration_id, m.ct_id, self.host.name)

    def _start_offline(self, m: Incoming) -> None:
        """Offline (with m.lock held): run the container's command if it ran on the source.
        Journaled once it runs: a copy whose start failed is removed by Abort, and an agent
        that dies while starting it reloads it held (Abort destroys it, running or not)."""
        if m.start:
            self.host.containers.start(m.ct_id)
        self.journal.record(m.migration_id, "destination", "resume")
        m.state = "running"
        log.info("migration %s: %s %s on %s", m.migration_id, m.ct_id, "runs" if m.start else "is in place", self.host.name)

    def abort(self, migration_id: str) -> None:
        """Remove everything this migration put on this host. Idempotent."""
        with self._lock:
            m = self._incoming.get(migration_id)
        if m is None:
            shutil.rmtree(self.host.incoming_dir(migration_id), ignore_errors=True)
            self._settle_quietly(migration_id, Result.ROLLED_BACK)
            return
        with m.lock:
            if m.state == "running":
                raise Conflict(f"migration {migration_id} already committed; its container runs here")
            _close_channels(m)
            if m.net is not None:
                m.net.close()
            if m.placed:
                self.host.containers.destroy(m.ct_id, timeout=0)  # held stopped: it never ran here
            _stop_keeper(m)  # after the copy is gone: it never reads a page that did not come
            shutil.rmtree(m.dir, ignore_errors=True)
            m.state = "aborted"
            self._settle_quietly(migration_id, Result.ROLLED_BACK)
        with self._lock:
            self._incoming.pop(migration_id, None)
        log.info("migration %s: aborted, %s removed from %s", migration_id, m.ct_id, self.host.name)

    def finish(self, migration_id: str) -> int:
        """Close the data channel and drop the migration's temporary files. Post-copy:
        once the keeper has ended; ToolFailed when it lost the container. Returns the
        bytes of pages the keeper received after the resume (0 without post-copy)."""
        received = 0
        with self._lock:
            m = self._incoming.get(migration_id)
        if m is not None and m.keeper is not None:
            try:
                m.keeper.wait(timeout=self.host.timeouts.link * 2)
            except subprocess.TimeoutExpired:
                raise ToolFailed(
                    f"migration {migration_id}: pages of {m.ct_id} are still arriving on {self.host.name}",  # ARRIVING_MARK
                    "ask again later",
                ) from None
            status = lazy_link.read_status(m.lazy_status)
            if status.get("done") != "ok":
                self._lost(m, str(status.get("error", "the post-copy keeper ended")))
            received = int(str(status.get("received", 0)))
        with self._lock:
            m = self._incoming.pop(migration_id, None)
        if m is None:
            if self._journaled(migration_id, "ok"):
                return received  # finished already (the source and its resolver may both ask)
            raise NotFound(f"no migration {migration_id} on {self.host.name}")
        _close_channels(m)
        if m.net is not None:
            m.net.close()
        shutil.rmtree(m.dir, ignore_errors=True)
        self._settle_quietly(migration_id, Result.OK)
        return received

    def _lost(self, m: Incoming, why: str) -> None:
        """Post-copy ended without every page: the copy here was killed (by the keeper, before
        any task could read a missing page). Keep its logs in the reports directory, drop the rest."""
        with self._lock:
            self._incoming.pop(m.migration_id, None)
        _close_channels(m)
        if m.net is not None:
            m.net.close()
        logs = self.host.state_dir / "reports"
        with contextlib.suppress(OSError):
            logs.mkdir(exist_ok=True)
        for name in ("lazy-pages.log", "lazy-link.log", "restore.log"):
            with contextlib.suppress(OSError):
                shutil.copy(m.work_dir / name, logs / f"{m.migration_id}-{name}")
        shutil.rmtree(m.dir, ignore_errors=True)
        error = (
            f"{m.ct_id} was lost on {self.host.name} during post-copy: {why}; "
            "its tasks were killed before any could read a page that never arrived"
        )
        self._settle_quietly(m.migration_id, Result.FAILED, error)
        raise ToolFailed(
            error,
            f"its file system is on {self.host.name}: start it afresh (`phaul --host {self.host.name} ct start {m.ct_id}`) "
            f"or restore it from a backup; CRIU's account: {logs / (m.migration_id + '-lazy-pages.log')}",
        )

    def close_all(self) -> None:
        """Agent shutdown: abort what was not restored yet. A restored copy held
        stopped is kept: the source may have destroyed its own copy already (the
        next agent reloads it from the journal)."""
        for mid, m in list(self._incoming.items()):
            if m.state != "prepared":
                _close_channels(m)
                if m.net is not None:  # its held frames die with this agent
                    m.net.close()
                continue
            try:
                self.abort(mid)
            except Exception as e:  # keep shutting down
                log.warning("migration %s: %s", mid, e)

    def _take_arrival(self, m: Incoming) -> None:
        """The peer's writes end (sealed, quota checked, channels closed) and what arrived
        becomes this host's: the container directory stripped to its root file system."""
        self.seal(m)
        self._check_quota(m)
        _close_channels(m)
        if not os.path.lexists(m.ct_dir / "bundle"):
            raise ToolFailed(f"migration {m.migration_id}: the container's files never arrived", "check the data channel log")
        inbound.strip_container_dir(m.ct_dir)

    def seal(self, m: Incoming, keep_ct: bool = False) -> None:
        """End the peer's write access: no new data-channel connection is served
        (the seal file) and every live one is ended, the listeners kept. Returns
        once nothing the peer runs here can write any more. `keep_ct`: spare the
        rsync connections already writing the container's directory (chrooted
        into recv/ct), which the caller does not read."""
        m.seal_file.touch()
        for endpoint in (m.receiver.endpoint if m.receiver is not None else None, m.stream):
            if endpoint is not None:
                endpoint.end_connections(keep_root=m.ct_dir if keep_ct else None)

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
        if m.net is None:  # no address: only the loopback to bring up
            return network.restore_criu_options(None, m.dir)
        network.unplug(m.ct_id)  # a host veth left from the container's last stay here
        return network.restore_criu_options(m.net.ident, m.dir)  # the agent's directory, not recv/

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
            _close_channels(m)

    def reload_restored(self, e: JournalEntry) -> None:
        """After an agent restart: take back a copy restored and held here, so that
        the source can still tell it to run or to go (sealed, no data channel)."""
        m = Incoming(e.migration_id, e.ct, e.peer, self.host.incoming_dir(e.migration_id), state="restored", placed=True,
                     offline=e.reached(OFFLINE_MARK) or e.reached(OFFLINE_START), start=e.reached(OFFLINE_START))
        m.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        m.seal_file.touch()
        with self._lock:
            self._incoming[e.migration_id] = m

    def remove_leftovers(self, e: JournalEntry) -> None:
        """After an agent restart: remove what a migration whose restore never ended
        left here (its container is ours only if it was moved into place from the
        migration's directory)."""
        mdir = self.host.incoming_dir(e.migration_id)
        target = self.host.containers.container_dir(e.ct)
        if e.reached("restore") and target.exists() and not os.path.lexists(mdir / "recv" / "ct"):
            try:
                self.host.containers.destroy(e.ct, timeout=0)
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
        if m.cut is not None:
            raise quota.QuotaExceeded(f"migration {migration_id}: {m.cut.message}", m.cut.hint)
        m.touched = time.monotonic()
        return m

    def expire_idle(self) -> list[str]:
        """Abort prepared migrations no call has named for `limits.idle_prepared` s (a
        source that died or went away before the restore: its copy still runs there)."""
        now = time.monotonic()
        with self._lock:
            idle = [m.migration_id for m in self._incoming.values()
                    if m.state == "prepared" and now - m.touched > self.host.limits.idle_prepared]
        for mid in idle:
            log.warning("migration %s: prepared and idle for %.0f s; removing it", mid, self.host.limits.idle_prepared)
            try:
                self.abort(mid)
            except Exception as e:  # keep serving
                log.warning("migration %s: %s", mid, e)
        return idle


def _check_page_link(page_link: str, source: str, source_address: str) -> None:
    """A post-copy page link must be on the source agent's own address, and this host must run post-copy."""
    link_host = parse_endpoint(page_link, "page link address").host
    if not source_address or link_host != parse_endpoint(source_address, "source address").host:
        raise Refused(
            f"the page link {page_link} is not on {source}'s agent address {source_address or '(none given)'}",
            "the source serves pages on its own agent's address only",
        )
    ok, why = lazy_link.available()
    if not ok:
        raise Conflict(f"this host cannot take a post-copy migration: {why}", "use --method precopy or stop-and-copy")


def _stop_keeper(m: Incoming) -> None:
    """End a keeper (a failed restore: the source still holds the container)."""
    if m.keeper is not None and m.keeper.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(m.keeper.pid, signal.SIGKILL)
        m.keeper.wait()
    m.keeper = None


def _announce(pid: int, ident: network.Identity) -> None:
    try:
        network.announce(pid, ident)
    except OSError as e:
        log.warning("announcing %s failed: %s", ident.ip, e)


def _close_stream(m: Incoming) -> None:
    if m.stream is not None:
        m.stream.close()
        m.stream = None


def _close_channels(m: Incoming) -> None:
    """Stop both endpoints, every connection ended, and the quota's watch."""
    if m.watch is not None:
        m.watch.stop()
    if m.receiver is not None:
        m.receiver.close()
    _close_stream(m)


def _unseal(m: Incoming) -> None:
    try:
        m.seal_file.unlink()
    except FileNotFoundError:
        pass


def _link_parents(m: Incoming) -> None:
    """Soft-dirty pre-copy (see the module docstring): the `parent` links CRIU
    restores through, made here, never received. Runs sealed."""
    rounds = sorted(
        int(p.name) for p in m.rounds_dir.iterdir() if p.name.isdigit() and p.name == str(int(p.name)) and p.is_dir()
    )
    links = [(m.rounds_dir / str(k) / "parent", f"../{k - 1}") for k in rounds if k - 1 in rounds]
    if rounds:
        links.append((m.images_dir / "parent", f"../rounds/{rounds[-1]}"))
    for path, target in links:
        try:
            os.symlink(target, path)
        except FileExistsError:
            raise ToolFailed(
                f"migration {m.migration_id}: the source pushed {path.relative_to(m.recv_dir)}, which this host makes",
                "the source must not send CRIU's parent links",
            ) from None
