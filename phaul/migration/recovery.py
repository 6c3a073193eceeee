"""Settling migrations that a failure or an agent restart left unfinished.

The source agent decides: it alone may destroy its copy of the container, and
it tells the destination to run its copy only once its own copy is gone. The
destination never runs a copy it was not told to run and never removes a
restored copy without the source's word; what it holds before its restore has
ended it may remove on its own (the source cannot have committed).

A settled migration ends `ok` (the copy runs on the destination),
`rolled_back` (it runs on the source), or `failed` (no copy could be run); one
that cannot be settled yet (the peer is unreachable) stays `in_doubt` and is
retried by the agent's resolver and by `phaul recover`.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from phaul.agent.host import Host
from phaul.channels.client import Agent, connect
from phaul.errors import NotFound, PhaulError
from phaul.linux import criu, network
from phaul.memory import lazy_link
from phaul.migration.copies import ensure_running, kill_data_channel, procs_using, source_copy, start_stopped, wait_until
from phaul.migration.dest import Destination
from phaul.migration.journal import Journal, JournalEntry
from phaul.migration.offline import COPY_MARK, OFFLINE_MARK
from phaul.migration.report import Result
from phaul.rpc import phaul_pb2 as pb

log = logging.getLogger(__name__)

PEER_TIMEOUT = 10.0  # s, one call to the peer while settling
DUMP_WAIT = 60.0  # s, how long to wait for a dump in progress to reach the gate or end
GATE_END_WAIT = 60.0  # s, how long to wait for the gate to act on a verdict
RECENT = 60.0  # s: the resolver leaves an incoming migration journaled this recently to its source
STALE_PREPARED = 3600.0  # s: an incoming migration never restored, its source silent this long, is removed



class Decision(StrEnum):
    """What the source answers when the destination asks what to do with its copy."""

    COMMIT = "commit"  # run it: the source copy is gone
    ABORT = "abort"  # remove it: the source copy runs
    PENDING = "pending"  # ask again later
    UNKNOWN = "unknown"  # the source has no record of the migration


class DestState(StrEnum):
    """What the destination holds of a migration (its answer to MigrationStatus)."""

    ABSENT = "absent"
    PREPARED = "prepared"
    RESTORED = "restored"  # held stopped, waiting for the source's decision
    RUNNING = "running"
    ABORTED = "aborted"



@dataclass
class Outcome:
    """How settling one migration ended on this host."""

    migration_id: str
    role: str
    result: Result  # OK, ROLLED_BACK, FAILED, IN_DOUBT or IN_PROGRESS
    message: str = ""


class Active:
    """The migrations this agent process is running right now (they are not
    settled by recovery: their own thread does that)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, migration_id: str) -> None:
        with self._lock:
            self._ids.add(migration_id)

    def discard(self, migration_id: str) -> None:
        with self._lock:
            self._ids.discard(migration_id)

    def __contains__(self, migration_id: object) -> bool:
        with self._lock:
            return migration_id in self._ids


def _age(timestamp: str) -> float:
    """Seconds since a journal timestamp (large when unreadable)."""
    try:
        return time.time() - dt.datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return float("inf")


# -- settling ---------------------------------------------------------------------------


class Recovery:
    """Settles this host's unfinished migrations: at start-up, periodically (the
    resolver) and on request (`phaul recover`)."""

    def __init__(self, host: Host, journal: Journal, dest: Destination, active: Active) -> None:
        self.host = host
        self.journal = journal
        self.dest = dest
        self.active = active
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._stop = threading.Event()

    @contextmanager
    def _locked(self, migration_id: str, role: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._locks.setdefault(f"{role}-{migration_id}", threading.Lock())
        with lock:
            yield

    # -- start-up and the resolver --------------------------------------------------

    def startup(self) -> list[Outcome]:
        """Settle what can be settled without the peers (quick; run before serving):
        destination migrations whose restore never ended are removed, a resumed
        copy is finished; a held copy is reloaded so the source can still decide."""
        outcomes = []
        for e in self.journal.unsettled():
            if e.role == "destination":
                try:
                    outcomes.append(self._dest_startup(e))
                except Exception as ex:  # keep starting
                    log.exception("migration %s: start-up recovery failed", e.migration_id)
                    outcomes.append(Outcome(e.migration_id, e.role, Result.IN_DOUBT, str(ex)))
        self.journal.prune()
        return outcomes

    def start_resolver(self, interval: float) -> threading.Thread:
        """Settle unsettled migrations in the background now, then every `interval` s
        (0: only once)."""
        def loop() -> None:
            while not self._stop.is_set():
                self.settle_all(quiet=True)
                self.dest.expire_idle()
                self.journal.prune()
                if interval <= 0 or self._stop.wait(interval):
                    return

        t = threading.Thread(target=loop, name="resolver", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def settle_all(self, quiet: bool = False) -> list[Outcome]:
        """Settle every unsettled migration. `quiet` (the resolver): log failures, and
        leave alone an incoming migration this agent took part in within RECENT s
        (its source is still driving it)."""
        out = []
        for e in self.journal.unsettled():
            if e.migration_id in self.active:
                continue
            if quiet and e.role == "destination" and self.dest.lookup(e.migration_id) is not None and _age(e.updated_at) < RECENT:
                continue
            try:
                out.append(self.settle(e.migration_id, e.role))
            except Exception as ex:
                if not quiet:
                    raise
                log.warning("migration %s: settling failed: %s", e.migration_id, ex)
        return out

    def settle(self, migration_id: str, role: str | None = None) -> Outcome:
        """Settle one migration (either role) as far as possible now."""
        e = self.journal.get(migration_id, role)
        if e.migration_id in self.active:
            return Outcome(e.migration_id, e.role, Result.IN_PROGRESS, "the migration is still running on this agent")
        with self._locked(e.migration_id, e.role):
            e = self.journal.get(migration_id, e.role)
            if e.role == "source":
                return self._settle_source(e)
            return self._settle_dest(e)

    # -- the source's side ---------------------------------------------------------------

    def decision(self, migration_id: str) -> tuple[Decision, str]:
        """What the destination should do with its copy: COMMIT (run it: the source
        copy is gone), ABORT (remove it: the source copy runs and never will be
        destroyed), PENDING (ask again later) or UNKNOWN, with why."""
        if migration_id in self.active:
            return Decision.PENDING, "the migration is under way"
        try:
            e = self.journal.get(migration_id, "source")
        except NotFound:
            return Decision.UNKNOWN, "this host has no record of the migration"
        with self._locked(e.migration_id, "source"):
            e = self.journal.get(migration_id, "source")
            if e.result == Result.OK:
                return Decision.COMMIT, "committed"
            if e.result in (Result.ROLLED_BACK, Result.REFUSED):
                return Decision.ABORT, f"the migration ended {e.result}"
            if e.reached("source-destroyed"):  # post-copy: the tree may still be frozen, serving pages
                return Decision.COMMIT, "committed: the source copy never runs again"
            if e.reached(OFFLINE_MARK) or e.reached(COPY_MARK):  # a stopped source copy is not "gone"
                return Decision.PENDING, "an offline migration: the source settles it"
            # unsettled, or failed: what the source holds decides (a copy held by the
            # destination is never removed while the source has none)
            local = source_copy(self.host, e.ct, self.host.migration_dir(e.migration_id))
            if local == "gone":
                return Decision.COMMIT, "the source copy is gone"
            if local in ("running", "frozen"):
                return Decision.ABORT, f"the source copy is {local}; it will be resumed"
            return Decision.PENDING, f"the source copy is {local}"

    def _settle_source(self, e: JournalEntry) -> Outcome:
        mid, ct = e.migration_id, e.ct
        mdir = self.host.migration_dir(mid)
        if e.settled:
            return self._reconcile_settled_source(e)
        if e.reached(OFFLINE_MARK) or e.reached(COPY_MARK):
            return self._settle_offline(e, mdir)
        local = source_copy(self.host, ct, mdir)
        if local == "dumping":
            gate = criu.CommitGate.attach(mdir / "gate")
            wait_until(lambda: gate.waiting() or source_copy(self.host, ct, mdir) != "dumping", DUMP_WAIT, 0.1)
            local = source_copy(self.host, ct, mdir)
            if local == "dumping":
                self.journal.mark_in_doubt(mid, "source", "a dump of the container is still under way")
                return Outcome(mid, "source", Result.IN_DOUBT, "a dump of the container is still under way; try again")
        peer_state, peer_error = self._peer_dest_state(e)
        log.info("migration %s: settling (source copy %s, destination %s)", mid, local, peer_state or peer_error)
        if e.reached("source-destroyed") and local != "gone":
            # Post-copy: after the commit the source tree stays frozen while CRIU serves its
            # pages (done now: not dumping); it must never run again.
            return self._finish_commit(e, mdir)

        if local == "gate":
            if e.reached("commit") and peer_state in (DestState.RESTORED, DestState.RUNNING):
                return self._finish_commit(e, mdir)
            gate = criu.CommitGate.attach(mdir / "gate")
            self.journal.record(mid, "source", "abort")
            gate.release(commit=False)
            wait_until(lambda: gate.verdict() is not None and not procs_using(mdir / "images"), GATE_END_WAIT, 0.05)
            local = source_copy(self.host, ct, mdir)
        if local in ("running", "frozen"):
            if not ensure_running(self.host, ct):
                self.journal.mark_in_doubt(mid, "source", f"the source copy of {ct} could not be resumed")
                return Outcome(mid, "source", Result.IN_DOUBT, f"the source copy of {ct} could not be resumed")
            self._clear_criu_config(ct)
            note = self._abort_dest(e, peer_state)
            network.reannounce(self.host.containers, ct)  # the destination may have held its traffic
            self.journal.settle(mid, "source", Result.ROLLED_BACK, note)
            kill_data_channel(mdir)
            shutil.rmtree(mdir, ignore_errors=True)
            return Outcome(mid, "source", Result.ROLLED_BACK, f"{ct} runs on {self.host.name}" + (f"; {note}" if note else ""))
        # the source copy is gone
        if peer_state in (DestState.RESTORED, DestState.RUNNING):
            return self._finish_commit(e, mdir)
        if peer_state is None:
            msg = f"the source copy is gone and {e.peer} cannot be reached ({peer_error}); its copy may be held there"
            self.journal.mark_in_doubt(mid, "source", msg)
            return Outcome(mid, "source", Result.IN_DOUBT, msg)
        if peer_state == DestState.PREPARED:
            self._abort_dest(e, peer_state)
        msg = f"no copy of {ct} is left: the source copy is gone and {e.peer} has {peer_state}; images kept in {mdir}"
        log.error("migration %s: %s", mid, msg)
        self.journal.settle(mid, "source", Result.FAILED, msg)
        return Outcome(mid, "source", Result.FAILED, msg)

    def _settle_offline(self, e: JournalEntry, mdir: Path) -> Outcome:
        """An offline move or copy (phaul.migration.offline) its agent left: the destination
        starts its copy only when told to (journaled "resume" here first). Its copy runs:
        the move's stopped source copy goes (`ok`). Otherwise it is removed and the source
        copy started again if the move stopped it ("dump"); `in_doubt` while a destination
        that may have been told cannot be asked."""
        mid, ct = e.migration_id, e.ct
        peer_state, peer_error = self._peer_dest_state(e)
        if peer_state == DestState.RUNNING:
            if e.reached(OFFLINE_MARK):
                self._destroy_source(ct)
                self.journal.record(mid, "source", "source-destroyed")
            return self._settled_ok(e, mdir)
        if peer_state is None and e.reached("resume"):
            msg = f"{e.peer} may have started its copy of {ct} and cannot be reached ({peer_error})"
            self.journal.mark_in_doubt(mid, "source", msg)
            return Outcome(mid, "source", Result.IN_DOUBT, msg)
        note = self._abort_dest(e, peer_state) if peer_state is not None else f"{e.peer} is unreachable ({peer_error})"
        if e.reached("dump") and not start_stopped(self.host, ct):
            msg = f"{ct} did not start again on {self.host.name}: `phaul ct start {ct}`" + (f"; {note}" if note else "")
            self.journal.settle(mid, "source", Result.FAILED, msg)
            return Outcome(mid, "source", Result.FAILED, msg)
        self.journal.settle(mid, "source", Result.ROLLED_BACK, note)
        kill_data_channel(mdir)
        shutil.rmtree(mdir, ignore_errors=True)
        return Outcome(mid, "source", Result.ROLLED_BACK, f"{ct} is back on {self.host.name}" + (f"; {note}" if note else ""))

    def _finish_commit(self, e: JournalEntry, mdir: Path) -> Outcome:
        """The destination holds a restored copy: make sure the source copy is
        destroyed, then let the destination's copy run."""
        mid, ct = e.migration_id, e.ct
        gate = criu.CommitGate.attach(mdir / "gate")
        if gate.waiting():
            self.journal.record(mid, "source", "commit")
            gate.release(commit=True)
            wait_until(lambda: gate.verdict() is not None, GATE_END_WAIT, 0.02)
            if gate.verdict() != "commit":
                return self._settle_source(self.journal.get(mid, "source"))  # the gate gave up: roll back
            wait_until(lambda: not procs_using(mdir / "images"), GATE_END_WAIT, 0.05)
        self._destroy_source(ct)
        self.journal.record(mid, "source", "source-destroyed")
        self.journal.record(mid, "source", "resume")
        try:
            with self._peer(e) as peer:
                peer.call("Resume", pb.MigrationRef(migration_id=mid), timeout=PEER_TIMEOUT * 3)
        except PhaulError as ex:
            if self._peer_dest_state(e)[0] == DestState.RUNNING:  # it was told meanwhile (its own resolver asked)
                return self._settled_ok(e, mdir)
            msg = f"the source copy is destroyed; {e.peer} did not confirm its copy runs: {ex.message}"
            self.journal.mark_in_doubt(mid, "source", msg)
            return Outcome(mid, "source", Result.IN_DOUBT, msg)
        return self._settled_ok(e, mdir)

    def _settled_ok(self, e: JournalEntry, mdir: Path) -> Outcome:
        self._finish_dest(e)
        self.journal.settle(e.migration_id, "source", Result.OK)
        kill_data_channel(mdir)  # post-copy: the page link's endpoint (its CRIU, and so its hub, ended already)
        shutil.rmtree(mdir, ignore_errors=True)
        return Outcome(e.migration_id, "source", Result.OK, f"{e.ct} runs on {e.peer}")

    def _reconcile_settled_source(self, e: JournalEntry) -> Outcome:
        """A settled migration: make sure the destination agrees (it may have been
        unreachable when the migration settled)."""
        state, err = self._peer_dest_state(e)
        note = ""
        mdir = self.host.migration_dir(e.migration_id)
        if e.result == Result.FAILED and state == DestState.RESTORED and source_copy(self.host, e.ct, mdir) == "gone":
            return self._finish_commit(e, mdir)  # the last copy: run it
        if e.result == Result.OK and state == DestState.RESTORED:
            try:
                with self._peer(e) as peer:
                    peer.call("Resume", pb.MigrationRef(migration_id=e.migration_id), timeout=PEER_TIMEOUT * 3)
                note = f"; told {e.peer} to run its copy"
            except PhaulError as ex:
                note = f"; {e.peer} did not resume its copy: {ex.message}"
        elif e.result == Result.OK and state == DestState.RUNNING:
            self._finish_dest(e)
        elif e.result != Result.OK and state in (DestState.PREPARED, DestState.RESTORED):
            note = "; " + (self._abort_dest(e, state) or f"removed what {e.peer} held")
        elif state is None:
            note = f"; {e.peer} is unreachable ({err})"
        return Outcome(e.migration_id, "source", Result(e.result), f"already settled{note}")

    def _destroy_source(self, ct: str) -> None:
        try:
            self.host.containers.destroy(ct, timeout=0)  # a dumped copy: killed, not stopped
        except NotFound:
            pass

    def _clear_criu_config(self, ct: str) -> None:
        try:
            if self.host.containers.criu_config_path(ct).exists():
                self.host.containers.set_criu_options(ct)
        except (OSError, PhaulError):
            pass

    def _peer(self, e: JournalEntry) -> Agent:
        if not e.peer_address:
            raise PhaulError(f"the journal of migration {e.migration_id} does not say where {e.peer} is")
        return connect(e.peer_address, e.peer, self.host.creds)

    def _peer_dest_state(self, e: JournalEntry) -> tuple[str | None, str]:
        """(what the destination holds, "") or (None, why it could not be asked)."""
        try:
            with self._peer(e) as peer:
                reply = peer.call("MigrationStatus", pb.MigrationRef(migration_id=e.migration_id), timeout=PEER_TIMEOUT)
            return reply.state, ""
        except PhaulError as ex:
            return None, ex.message

    def _abort_dest(self, e: JournalEntry, state: str | None) -> str:
        if state in (DestState.ABSENT, DestState.ABORTED):
            return ""
        try:
            with self._peer(e) as peer:
                peer.call("Abort", pb.MigrationRef(migration_id=e.migration_id), timeout=PEER_TIMEOUT * 6)
            return ""
        except PhaulError as ex:
            return f"{e.peer} may still hold partial state ({ex.message}); it removes it once it learns the outcome"

    def _finish_dest(self, e: JournalEntry) -> None:
        try:
            with self._peer(e) as peer:
                peer.call("Finish", pb.MigrationRef(migration_id=e.migration_id), timeout=PEER_TIMEOUT * 3)
        except PhaulError as ex:
            log.info("migration %s: clean-up on %s: %s", e.migration_id, e.peer, ex.message)

    # -- the destination's side -----------------------------------------------------------

    def dest_state(self, migration_id: str) -> DestState:
        """What this host holds of an incoming migration (asked by the source)."""
        m = self.dest.lookup(migration_id)
        if m is not None:
            try:
                return DestState(m.state)  # prepared, restored, running, aborted
            except ValueError:
                return DestState.PREPARED
        try:
            e = self.journal.get(migration_id, "destination")
        except NotFound:
            return DestState.ABSENT
        if e.result == Result.OK or e.reached("resume"):
            return DestState.RUNNING
        if e.settled:
            return DestState.ABORTED
        return DestState.RESTORED if e.reached("restored") else DestState.PREPARED

    def _dest_startup(self, e: JournalEntry) -> Outcome:
        mid = e.migration_id
        mdir = self.host.incoming_dir(mid)
        if e.reached("resume"):
            return self._dest_finish_resume(e)
        if e.reached("restored"):
            kill_data_channel(mdir)  # the dead agent's; nothing more travels for this migration
            self.dest.reload_restored(e)
            return Outcome(mid, "destination", Result.IN_DOUBT, f"{e.ct} is held restored; waiting for {e.peer}'s decision")
        # The restore never ended here: the source cannot have committed. Remove it all.
        kill_data_channel(mdir)
        wait_until(lambda: not procs_using(mdir), 10.0, 0.05)  # a restore the dead agent started
        self.dest.remove_leftovers(e)
        self.journal.settle(mid, "destination", Result.ROLLED_BACK, "removed at agent start-up: the restore never ended")
        return Outcome(mid, "destination", Result.ROLLED_BACK, f"removed the partial copy of {e.ct}")

    def _dest_finish_resume(self, e: JournalEntry) -> Outcome:
        mid = e.migration_id
        try:
            network.adopt_restored(self.host.containers, e.ct, self.host.bridge)  # plugged in, announced
            self.host.containers.resume(e.ct)
        except PhaulError as ex:
            log.info("migration %s: resuming %s: %s", mid, e.ct, ex.message)
        mdir = self.host.incoming_dir(mid)
        status = mdir / "work" / "lazy.status"  # post-copy: its keeper outlives the agent (phaul.memory.lazy_link)
        if any(_is_keeper(p) for p in procs_using(mdir)):
            return Outcome(mid, "destination", Result.IN_PROGRESS, f"the pages of {e.ct} are still arriving")
        if status.exists() and lazy_link.read_status(status).get("done") != "ok":
            msg = f"{e.ct} was lost during post-copy: its keeper killed it for pages that never came"
            kill_data_channel(mdir)
            self.dest.forget(mid)
            shutil.rmtree(mdir, ignore_errors=True)
            self.journal.settle(mid, "destination", Result.FAILED, msg)
            return Outcome(mid, "destination", Result.FAILED, msg)
        kill_data_channel(mdir)
        self.dest.forget(mid)
        shutil.rmtree(mdir, ignore_errors=True)
        self.journal.settle(mid, "destination", Result.OK)
        return Outcome(mid, "destination", Result.OK, f"{e.ct} runs here")

    def _settle_dest(self, e: JournalEntry) -> Outcome:
        mid = e.migration_id
        if e.settled:
            return Outcome(mid, "destination", Result(e.result), "already settled")
        if e.reached("resume"):
            return self._dest_finish_resume(e)
        held = e.reached("restored")
        if not held and self.dest.lookup(mid) is None:
            return self._dest_startup(e)  # nothing alive holds it: remove
        try:
            with self._peer(e) as peer:
                reply = peer.call("MigrationDecision", pb.MigrationRef(migration_id=mid), timeout=PEER_TIMEOUT)
            decision, why = reply.decision, reply.message
        except PhaulError as ex:
            decision, why = None, ex.message
        try:
            if decision == Decision.COMMIT and held:
                self.dest.resume(mid)
                self.dest.finish(mid)
                return Outcome(mid, "destination", Result.OK, f"{e.ct} runs here ({e.peer}: {why})")
            if decision == Decision.ABORT or (decision in (Decision.UNKNOWN, Decision.COMMIT) and not held):
                self.dest.abort(mid)
                return Outcome(mid, "destination", Result.ROLLED_BACK, f"removed the copy of {e.ct} ({e.peer}: {why})")
        except NotFound:  # the source settled it meanwhile, through this agent's methods
            e = self.journal.get(mid, "destination")
            if e.settled:
                return Outcome(mid, "destination", Result(e.result), f"settled meanwhile by {e.peer}")
            raise
        if decision is None and not held and _age(e.updated_at) > STALE_PREPARED:
            # nothing restored, the source gone silent for long: it cannot commit without us
            self.dest.abort(mid)
            return Outcome(mid, "destination", Result.ROLLED_BACK, f"removed: {e.peer} has been unreachable since {e.updated_at}")
        msg = f"{e.ct} is held {'restored' if held else 'prepared'} here; {e.peer}: {why}"
        if held:
            self.journal.mark_in_doubt(mid, "destination", msg)
        return Outcome(mid, "destination", Result.IN_DOUBT if held else Result.IN_PROGRESS, msg)


def _is_keeper(pid: int) -> bool:
    """Is `pid` a post-copy keeper (phaul.memory.lazy_link)?"""
    try:
        return b"phaul.memory.lazy_link" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
