"""The destination side of a migration.

Prepare opens the migration's data channel into a fresh directory; the source
pushes the container's directory and the CRIU images there; Restore moves the
container into place and restores it held stopped; Resume lets it run; Abort
removes every trace of it. Nothing here runs until the source says so.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from phaul import criu
from phaul.containers import ContainerConfig
from phaul.doctor import criu_path, criu_version
from phaul.errors import Conflict, NotFound, ToolFailed
from phaul.faults import Fault
from phaul.fs_sync import RsyncReceiver
from phaul.host import Host
from phaul.validate import check_id

log = logging.getLogger(__name__)

RESTORE_TIMEOUT = 300.0


@dataclass
class Incoming:
    """A migration this host receives."""

    migration_id: str
    ct_id: str
    source: str
    dir: Path
    receiver: RsyncReceiver
    fault: Fault | None = None
    state: str = "prepared"  # prepared, restored (held stopped), running, aborted
    placed: bool = False  # the container directory was moved into place
    lock: threading.Lock = field(default_factory=threading.Lock)


class Destination:
    """All incoming migrations of one host."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._incoming: dict[str, Incoming] = {}
        self._lock = threading.Lock()

    def prepare(
        self, migration_id: str, source: str, config: ContainerConfig, source_criu: str, fault: Fault | None = None
    ) -> str:
        """Check this host can take the container and open the data channel;
        returns the channel's ADDR:PORT."""
        check_id(migration_id, "migration ID")
        check_id(source, "source host name")
        ct_id = check_id(config.id)
        if self.host.allow and source not in self.host.allow:
            raise Conflict(f"{self.host.name} does not accept migrations from {source}", f"add {source} to its --allow list")
        mine = criu_version(criu_path() or "")
        theirs = tuple(int(x) for x in source_criu.split(".") if x.isdigit()) if source_criu else ()
        if mine is None:
            raise ToolFailed(f"{self.host.name} has no usable CRIU", f"run `make setup` on {self.host.name}")
        if theirs and mine < theirs:
            raise Conflict(
                f"{self.host.name}'s CRIU {'.'.join(map(str, mine))} is older than {source}'s {source_criu}",
                f"upgrade CRIU on {self.host.name} (`make setup`)",
            )
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
            for sub in ("ct", "images", "work"):
                (mdir / sub).mkdir(parents=True)
            receiver = RsyncReceiver(self.host.creds, mdir, self.host.address, source)
            try:
                address = receiver.open()
            except Exception:
                shutil.rmtree(mdir, ignore_errors=True)
                raise
            self._incoming[migration_id] = Incoming(migration_id, ct_id, source, mdir, receiver, fault=fault)
        log.info("migration %s: receiving %s from %s on %s", migration_id, ct_id, source, address)
        return address

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
            target.parent.mkdir(parents=True, exist_ok=True)
            (m.dir / "ct").rename(target)
            m.placed = True
            ct.rewrite_for_host(m.ct_id)
            conf = ct.criu_config_path(m.ct_id)
            conf.write_text("leave-stopped\n")
            t0 = time.monotonic()
            try:
                if m.fault is not None and m.fault.kind == "damage-image":
                    m.fault.at("restore", m.dir / "images")
                ct.restore(m.ct_id, m.dir / "images", m.dir / "work")
            finally:
                conf.write_text("")
            took = (time.monotonic() - t0) * 1000
            m.state = "restored"
        stats = criu.read_stats(m.dir / "work", "restore")
        stats["runc_restore"] = took
        log.info("migration %s: %s restored and held stopped in %.0f ms", migration_id, m.ct_id, took)
        return stats

    def resume(self, migration_id: str) -> None:
        """Let the held copy run."""
        m = self._get(migration_id)
        with m.lock:
            if m.state == "running":
                return
            if m.state != "restored":
                raise Conflict(f"migration {migration_id} is {m.state}; only a restored copy can be resumed")
            self.host.containers.resume(m.ct_id)
            m.state = "running"
        log.info("migration %s: %s runs on %s", migration_id, m.ct_id, self.host.name)

    def abort(self, migration_id: str) -> None:
        """Remove everything this migration put on this host. Idempotent."""
        with self._lock:
            m = self._incoming.get(migration_id)
        if m is None:
            shutil.rmtree(self.host.migration_dir(migration_id), ignore_errors=True)
            return
        with m.lock:
            if m.state == "running":
                raise Conflict(f"migration {migration_id} already committed; its container runs here")
            m.receiver.close()
            if m.placed:
                self.host.containers.destroy(m.ct_id)
            shutil.rmtree(m.dir, ignore_errors=True)
            m.state = "aborted"
        with self._lock:
            self._incoming.pop(migration_id, None)
        log.info("migration %s: aborted, %s removed from %s", migration_id, m.ct_id, self.host.name)

    def finish(self, migration_id: str) -> None:
        """Close the data channel and drop the migration's temporary files."""
        with self._lock:
            m = self._incoming.pop(migration_id, None)
        if m is None:
            raise NotFound(f"no migration {migration_id} on {self.host.name}")
        m.receiver.close()
        shutil.rmtree(m.dir, ignore_errors=True)

    def close_all(self) -> None:
        """Agent shutdown: abort what never ran."""
        for mid in list(self._incoming):
            try:
                self.abort(mid)
            except Exception as e:  # keep shutting down
                log.warning("migration %s: %s", mid, e)

    def _get(self, migration_id: str) -> Incoming:
        with self._lock:
            m = self._incoming.get(migration_id)
        if m is None:
            raise NotFound(f"no migration {migration_id} on {self.host.name}", "the destination agent may have restarted")
        return m

