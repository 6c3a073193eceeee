"""`phaul evacuate HOST`: move every container off a host, N at a time, and say how each ended.
Running containers move live; created and stopped ones offline (their files), as `phaul migrate`
moves them; a paused one stays (its memory would be lost).

Steps: settle the host's unsettled migrations (`phaul recover`), list its containers, ask each
destination for its memory, run every (container, destination) preflight through the source
agent, plan (phaul.fleet.placement), then migrate by the plan. A migration still unsettled after
that (its peer does not answer) is named `in_doubt` (exit 3) with what to do, its container on
the host or not (`Unsettled`): the host must not be retired before it is settled. A container
that cannot move stays running where it is and is named with the reason; the others go on. Interrupted, it
starts nothing more and waits for the migrations under way; run again, it continues with
what is left (what moved is no longer on the host).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from enum import StrEnum

from phaul.channels.client import Agent
from phaul.checks import CheckState
from phaul.errors import Busy, ExitCode, InvalidInput, PhaulError
from phaul.fleet import migrate_call
from phaul.fleet.inventory import Inventory
from phaul.fleet.placement import Capacity, Movable, Placement, Verdict, plan
from phaul.fleet.placement import parallel as default_parallel
from phaul.hosts import HostEntry
from phaul.migration.report import Report, Result
from phaul.rpc import phaul_pb2 as pb

log = logging.getLogger(__name__)

BUSY_RETRY_S = 2.0  # the source runs its most migrations at once: ask again this often
BUSY_GIVE_UP_S = 1800.0
CHECK_THREADS = 4
WAIT_TICK = 0.2  # s

AgentFor = Callable[[HostEntry], Agent]
Say = Callable[[str], None]
Progress = Callable[[str, pb.Progress], None] | None  # (container, progress)


class Outcome(StrEnum):
    """How one container's evacuation ended (the values are the JSON's)."""

    PLANNED = "planned"  # --dry-run: it would go to its destination
    MOVED = "ok"
    ROLLED_BACK = "rolled_back"  # still running on the source
    FAILED = "failed"
    IN_DOUBT = "in_doubt"
    STAYED = "stayed"  # no destination may take it (preflight), or it is not running
    NOT_STARTED = "not_started"  # interrupted before its turn


@dataclass
class Row:
    """One container of the evacuation, as the table and the JSON show it."""

    ct: str
    dest: str | None
    outcome: Outcome
    reason: str
    migration_id: str = ""
    pause_longest_ms: float | None = None
    pause_total_ms: float | None = None
    bytes_sent: int | None = None


@dataclass(frozen=True)
class Unsettled:
    """A migration of the evacuated host that `phaul recover` could not settle (yet)."""

    migration_id: str
    role: str  # the host's: source or destination
    ct: str
    peer: str
    state: str  # in_doubt, in_progress

    def row(self, host: str, here: bool) -> Row:
        """Its container's row: it does not move (`here`: it is on `host`) or cannot be said to be
        off `host` until the migration is settled; the reason says what the admin does."""
        mid, state = self.migration_id, self.state.replace("_", " ")
        settle = f"`phaul --host {host} recover {mid}` settles it once {self.peer}'s agent answers"
        if here:
            return Row(self.ct, None, Outcome.IN_DOUBT,
                       f"migration {mid} ({self.role}, with {self.peer}) is {state}: it stays until {settle}; "
                       "then evacuate again")
        if self.role == "source":
            return Row(self.ct, self.peer, Outcome.IN_DOUBT,
                       f"migration {mid} to {self.peer} is {state}: {self.peer} may hold its copy, waiting for "
                       f"{host}'s word, and {host} keeps its images; {settle} (do not retire {host} before)")
        return Row(self.ct, None, Outcome.IN_DOUBT, f"migration {mid} from {self.peer} is {state}: {settle}")


@dataclass(frozen=True)
class EvacuationOptions:
    """What `phaul evacuate` was asked."""

    source: str
    to: tuple[str, ...] = ()  # destinations; empty: every other host of the inventory
    parallel: int | None = None  # migrations at once; None: from the measured costs (placement.parallel)
    dry_run: bool = False
    request: pb.MigrateRequest = field(default_factory=pb.MigrateRequest)  # method, rounds... for every migration


@dataclass
class Evacuation:
    """The plan and, once run, each container's outcome."""

    source: str
    rows: list[Row]
    parallel: int
    dry_run: bool

    def exit_code(self) -> ExitCode:
        """0: every container moved (or, dry run, has a destination); 3: some in doubt; 1: some did not move."""
        if any(r.outcome == Outcome.IN_DOUBT for r in self.rows):
            return ExitCode.IN_DOUBT
        done = Outcome.PLANNED if self.dry_run else Outcome.MOVED
        return ExitCode.OK if all(r.outcome == done for r in self.rows) else ExitCode.FAILED

    def to_table(self) -> str:
        lines = [f"{'CT':<16} {'TO':<10} {'OUTCOME':<12} {'PAUSE':>9} {'SENT':>10}  REASON"]
        for r in self.rows:
            pause = "-" if r.pause_longest_ms is None else f"{r.pause_longest_ms:.0f} ms"
            sent = "-" if r.bytes_sent is None else f"{r.bytes_sent / (1 << 20):.1f} MiB"
            lines.append(f"{r.ct:<16} {r.dest or '-':<10} {r.outcome.value:<12} {pause:>9} {sent:>10}  {r.reason}")
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no containers"
        lines.append(f"{'plan for' if self.dry_run else 'evacuation of'} {self.source}: {summary}")
        return "\n".join(lines)


class Evacuator:
    """Runs one evacuation against live agents (`agent_for` connects to a host's agent)."""

    def __init__(self, inventory: Inventory, agent_for: AgentFor, say: Say) -> None:
        self.inventory = inventory
        self.agent_for = agent_for
        self.say = say
        self.stop = threading.Event()  # set: start no more migrations

    # -- planning ---------------------------------------------------------------------

    def plan(self, opts: EvacuationOptions) -> Evacuation:
        source = self.inventory.host(opts.source)
        dests = self._destinations(opts)
        rows: list[Row] = []
        with self.agent_for(source) as agent:
            doubtful = self._settle(agent, opts.dry_run)
            movable: list[Movable] = []
            listed = agent.call("ListContainers", pb.Empty()).containers
            here = {c.id for c in listed}
            # an unsettled migration whose container is not here (committed, or held by the peer) is named too
            rows += [u.row(source.name, here=False) for ct, u in doubtful.items() if ct not in here]
            for c in listed:
                if c.id in doubtful:
                    rows.append(doubtful[c.id].row(source.name, here=True))
                elif c.state == "paused":  # moved offline only when asked: its memory would be lost
                    rows.append(Row(c.id, None, Outcome.STAYED, "paused: resume it, or move it with `phaul migrate --offline`"))
                else:
                    used = max(c.memory_used, 0)
                    movable.append(Movable(c.id, c.memory_limit if c.memory_limit > 0 else used, used))
            capacities, unreachable = self._capacities(dests)
            verdicts = self._preflight(agent, movable, [d for d in dests if d.name in capacities])
        for ct in movable:
            verdicts.update({(ct.ct, name): Verdict(False, why) for name, why in unreachable.items()})
        placements = plan(movable, [capacities.get(d.name, Capacity(d.name, 0, 0)) for d in dests], verdicts)
        rows += [_planned(p) for p in placements]
        return Evacuation(source.name, rows, opts.parallel or default_parallel(placements, verdicts), opts.dry_run)

    def _destinations(self, opts: EvacuationOptions) -> list[HostEntry]:
        if opts.source in opts.to:
            raise InvalidInput(f"--to names {opts.source}, the host being evacuated", "name other hosts in --to")
        dests = [self.inventory.host(n) for n in opts.to] if opts.to else [
            h for h in self.inventory.hosts() if h.name != opts.source
        ]
        if not dests:
            raise InvalidInput(
                f"no host to move {opts.source}'s containers to", "add hosts to the hosts file, or name them with --to"
            )
        return dests

    def _settle(self, agent: Agent, dry_run: bool) -> dict[str, Unsettled]:
        """Settle the source's unsettled migrations first (not in a dry run); the migrations
        still unsettled then, by container."""
        if not dry_run:
            for o in agent.call("Recover", pb.RecoverRequest(), timeout=600).outcomes:
                self.say(f"settled {o.migration_id} ({o.role}): {o.result}: {o.message}")
        return {
            r.ct: Unsettled(r.migration_id, r.role, r.ct, r.peer, r.state)
            for r in agent.call("ListMigrations", pb.Empty()).migrations
            if r.state in ("in_doubt", "in_progress")
        }

    def _capacities(self, dests: Sequence[HostEntry]) -> tuple[dict[str, Capacity], dict[str, str]]:
        """Each destination's memory figures, and the destinations that did not answer, with why."""
        capacities, unreachable = {}, {}
        for d in dests:
            try:
                with self.agent_for(d) as agent:
                    info = agent.call("Info", pb.Empty(), timeout=30)
            except PhaulError as e:
                self.say(f"{d.name} is left out: {e.message}")
                unreachable[d.name] = f"its agent does not answer ({e.message})"
                continue
            capacities[d.name] = Capacity(d.name, info.memory_available, info.memory_committed)
        return capacities, unreachable

    def _preflight(self, agent: Agent, cts: Sequence[Movable], dests: Sequence[HostEntry]) -> dict[tuple[str, str], Verdict]:
        def check(ct: str, dest: HostEntry) -> Verdict:
            try:
                request = pb.CheckRequest(ct_id=ct, dest_name=dest.name, dest_address=dest.address)
                reply = agent.call("Check", request, timeout=120)
            except PhaulError as e:
                return Verdict(False, e.message)
            failed = [f"{c.name}: {c.message}" for c in reply.checks if c.status == CheckState.FAILURE]
            return Verdict(not failed, "; ".join(failed), reply.transfer_ms, reply.restore_ms)

        pairs = [(c.ct, d) for c in cts for d in dests]
        with futures.ThreadPoolExecutor(CHECK_THREADS) as pool:
            results = list(pool.map(lambda p: check(*p), pairs))
        return {(ct, d.name): v for (ct, d), v in zip(pairs, results, strict=True)}

    # -- running ----------------------------------------------------------------------

    def run(self, evacuation: Evacuation, opts: EvacuationOptions, on_progress: Progress) -> None:
        """Migrate every planned container, `evacuation.parallel` at a time; fills in the rows."""
        source = self.inventory.host(evacuation.source)
        todo = [r for r in evacuation.rows if r.outcome == Outcome.PLANNED]
        with futures.ThreadPoolExecutor(evacuation.parallel) as pool:
            running = [pool.submit(self._move, source, row, opts, on_progress) for row in todo]
            try:
                _wait(running)
            except KeyboardInterrupt:
                self.stop.set()
                self.say("interrupted: no more migrations start; waiting for those under way (run evacuate again to go on)")
                _wait(running)
        for row in todo:
            if row.outcome == Outcome.PLANNED:
                row.outcome, row.reason = Outcome.NOT_STARTED, "interrupted before its turn"

    def _move(self, source: HostEntry, row: Row, opts: EvacuationOptions, on_progress: Progress) -> None:
        assert row.dest is not None
        dest = self.inventory.host(row.dest)
        request = pb.MigrateRequest()
        request.CopyFrom(opts.request)
        request.ct_id, request.dest_name, request.dest_address = row.ct, dest.name, dest.address
        give_up = time.monotonic() + BUSY_GIVE_UP_S
        sink = (lambda p: on_progress(row.ct, p)) if on_progress else None
        while not self.stop.is_set():
            self.say(f"{row.ct}: {source.name} -> {dest.name}")
            try:
                with self.agent_for(source) as agent:
                    _fill(row, migrate_call.run(agent, request, source.name, sink))
            except Busy as e:
                if time.monotonic() > give_up:
                    row.outcome, row.reason = Outcome.STAYED, e.message
                    return
                self.stop.wait(BUSY_RETRY_S)
                continue
            except PhaulError as e:
                row.outcome = Outcome.IN_DOUBT if e.exit_code == ExitCode.IN_DOUBT else Outcome.STAYED
                row.reason = e.message
            self.say(f"{row.ct}: {row.outcome.value} {row.reason}".rstrip())
            return


def _wait(running: Sequence[futures.Future[None]]) -> None:
    """Until all are done, in short waits: Ctrl-C is seen at once even when a worker thread took the signal."""
    while futures.wait(running, timeout=WAIT_TICK).not_done:
        pass


def _planned(p: Placement) -> Row:
    if p.dest is None:
        return Row(p.ct, None, Outcome.STAYED, f"no destination: {p.reason}")
    return Row(p.ct, p.dest, Outcome.PLANNED, p.reason)


def _fill(row: Row, report: Report) -> None:
    row.outcome = {Result.OK: Outcome.MOVED, Result.ROLLED_BACK: Outcome.ROLLED_BACK,
                   Result.IN_DOUBT: Outcome.IN_DOUBT}.get(report.result, Outcome.FAILED)
    row.migration_id = report.migration_id
    row.reason = report.error or f"{report.memory_method}, frozen {report.frozen_ms:.0f} ms"
    pauses = report.pauses_ms
    row.pause_longest_ms, row.pause_total_ms = max(pauses, default=0.0), sum(pauses)
    row.bytes_sent = report.bytes_sent + report.fs_bytes_sent
