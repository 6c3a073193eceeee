"""Failover, on the standby host: run CT from its last consistent checkpoint.

Fencing first, so that two copies never run:
- the primary's agent answers: it is asked to fence (phaul.standby.schedule
  `Standbys.fence`): while CT runs there the failover is refused (that is a
  migration's job); once CT is stopped there, the primary marks its copy stale and
  the failover goes on;
- the primary does not answer: refused unless the admin says it is fenced
  (`--fenced`: powered off, or CT known dead there). The primary's agent, when it
  comes back, learns that CT failed over and never runs its stale copy.

The restore is a migration's (phaul.migration.dest: images validated against the
bundle this host writes from its own configuration, held stopped, then resumed),
from a hard-linked copy of the checkpoint: a restore that fails leaves the
checkpoint as it was, to try again.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

from phaul.agent.host import Host
from phaul.channels.client import connect
from phaul.errors import Busy, Conflict, LinkBroken, PhaulError, Unreachable
from phaul.migration.dest import Destination
from phaul.rpc import phaul_pb2 as pb
from phaul.standby.store import StandbyStore, link_tree

log = logging.getLogger(__name__)

FENCE_TIMEOUT_S = 10.0  # s: the primary's agent answers within this, or it is taken as down
FENCED_TIMEOUT_S = 2.0  # s: the same, when the admin says it is fenced (only a live agent running CT can refuse)
PRIMARY_STOPPED, ADMIN = "primary-stopped", "admin"


@dataclass(frozen=True)
class FailedOver:
    ct: str
    primary: str
    checkpoint_at: float
    restore_ms: float
    fence: str  # PRIMARY_STOPPED | ADMIN


def fence(host: Host, ct_id: str, primary: str, address: str, fenced: bool) -> str:
    """How the primary is fenced, or Conflict when a failover could leave two copies running."""
    wait = FENCED_TIMEOUT_S if fenced else FENCE_TIMEOUT_S
    try:
        with connect(address, primary, host.creds) as agent:
            agent.wait_ready(wait)
            running = agent.call("FenceStandby", pb.ContainerRef(id=ct_id), timeout=FENCE_TIMEOUT_S).running
    except (Unreachable, LinkBroken) as e:
        if not fenced:
            raise Conflict(
                f"{primary}, where {ct_id} ran, does not answer ({e.message}): {ct_id} may still run there",
                f"make sure {primary} is powered off (or {ct_id} is dead there), then run it again with --fenced",
            ) from None
        log.warning("failover of %s: %s does not answer; fenced by the admin", ct_id, primary)
        return ADMIN
    if running:
        raise Conflict(
            f"{ct_id} runs on {primary}, whose agent answers: a failover would leave two running copies",
            f"move it instead: `phaul --host {primary} migrate {ct_id} {host.name}`",
        )
    return PRIMARY_STOPPED


def failover(host: Host, dest: Destination, store: StandbyStore, ct_id: str, fenced: bool) -> FailedOver:
    """Fence the primary, then restore `ct_id`'s recovery point here and run it."""
    if not store.failover_lock.acquire(blocking=False):
        raise Busy(f"{host.name} is failing a container over already", "run it again when that one has ended")
    try:
        return _failover(host, dest, store, ct_id, fenced)
    finally:
        store.failover_lock.release()


def _failover(host: Host, dest: Destination, store: StandbyStore, ct_id: str, fenced: bool) -> FailedOver:
    kept, m = store.take(ct_id)
    how = fence(host, ct_id, kept.source, kept.source_address, fenced)
    gen = m.dir
    m.dir = host.incoming_dir(m.migration_id)
    shutil.rmtree(m.dir, ignore_errors=True)
    m.dir.parent.mkdir(parents=True, exist_ok=True)
    link_tree(gen, m.dir)
    (m.dir / "sealed").unlink(missing_ok=True)
    t0 = time.monotonic()
    store.mark_failed_over(kept)  # from now on no refresh is kept and the old primary is told
    try:
        dest.take_kept(m)
        dest.restore(m.migration_id)
        dest.resume(m.migration_id)
    except BaseException:
        try:
            dest.abort(m.migration_id)  # the held copy, never run; the checkpoint stays
            store.unmark(ct_id)
        except PhaulError as e:
            log.error("failover of %s: removing the failed restore: %s", ct_id, e)
        shutil.rmtree(m.dir, ignore_errors=True)
        raise
    took = (time.monotonic() - t0) * 1000
    store.failed_over_done(ct_id)
    dest.finish(m.migration_id)
    log.info("failover: %s runs on %s from its checkpoint of %s (%s)", ct_id, host.name, time.ctime(kept.checkpoint_at), how)
    return FailedOver(ct_id, kept.source, kept.checkpoint_at, took, how)
