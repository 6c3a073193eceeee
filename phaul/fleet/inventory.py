"""The inventory seam: which hosts exist, and the leases that fence a primary.

Fleet operations (evacuate; standby and failover) ask an `Inventory` for hosts and a
`Leases` store for leases, never the hosts file directly. The defaults here suit a
handful of hosts: the hosts file, and lease files on the admin's machine. Past that,
one module implements both on a distributed store (etcd: hosts as keys under a prefix,
a lease as a key bound to an etcd lease and taken in a transaction that compares its
create revision) and the operations do not change. See the README, "Where many hosts meet".
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from phaul.errors import Conflict, InvalidInput
from phaul.hosts import HostEntry, HostsFile
from phaul.linux.fsutil import write_atomic
from phaul.validate import check_id

log = logging.getLogger(__name__)


class Inventory(Protocol):
    """The hosts fleet operations may use."""

    def hosts(self) -> list[HostEntry]: ...

    def host(self, name: str) -> HostEntry: ...


@dataclass(frozen=True)
class Lease:
    """`holder` holds `key` until `expires` (seconds since the epoch)."""

    key: str
    holder: str
    expires: float

    def live(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires


class Leases(Protocol):
    """Leases with compare-and-set: one holder per key at a time."""

    def acquire(self, key: str, holder: str, ttl_s: float) -> Lease:
        """Take or renew `key` for `holder`; Conflict while another holder's lease is live."""
        ...

    def release(self, key: str, holder: str) -> None:
        """Give `key` up if `holder` holds it."""
        ...

    def current(self, key: str) -> Lease | None:
        """The live lease on `key`, if any."""
        ...


@dataclass(frozen=True)
class HostsFileInventory:
    """The default inventory: the hosts file (phaul.hosts)."""

    hosts_file: HostsFile

    def hosts(self) -> list[HostEntry]:
        return [self.hosts_file.hosts[n] for n in sorted(self.hosts_file.hosts)]

    def host(self, name: str) -> HostEntry:
        return self.hosts_file.host(name)


@dataclass(frozen=True)
class FileLeases:
    """The default lease store: one JSON file per key in `directory`, changed under flock.
    Good for one admin machine; several need a shared store (etcd)."""

    directory: Path

    def acquire(self, key: str, holder: str, ttl_s: float) -> Lease:
        if ttl_s <= 0:
            raise InvalidInput(f"lease time {ttl_s:g} s is not positive", "give a lease time above 0 s")
        with self._locked():
            held = self._read(key)
            if held is not None and held.live() and held.holder != holder:
                raise Conflict(
                    f"{key} is held by {held.holder} for {held.expires - time.time():.0f} s more",
                    "wait until the lease expires, or have its holder release it",
                )
            lease = Lease(key, holder, time.time() + ttl_s)
            write_atomic(self._path(key), json.dumps(asdict(lease)).encode())
            return lease

    def release(self, key: str, holder: str) -> None:
        with self._locked():
            held = self._read(key)
            if held is not None and held.holder == holder:
                self._path(key).unlink(missing_ok=True)

    def current(self, key: str) -> Lease | None:
        held = self._read(key)
        return held if held is not None and held.live() else None

    def _path(self, key: str) -> Path:
        return self.directory / f"{check_id(key, 'lease key')}.json"

    def _read(self, key: str) -> Lease | None:
        try:
            data = json.loads(self._path(key).read_text())
            return Lease(str(data["key"]), str(data["holder"]), float(data["expires"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable lease %s: %s", self._path(key), e)
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
