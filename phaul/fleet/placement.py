"""Where each container of an evacuated host goes: a plan, with the reason for each choice.

Pure logic on figures the agents gave (tests/test_placement.py). A container may go only
where its preflight passed; among those, to the destination with the most memory left
after what is already committed there and what this plan has sent it (free memory minus
the containers' declared limits, or their use when they declare none), so that the
containers spread out instead of filling the first host.

Order: the smallest containers (by memory in use) move first and the largest last. Memory in
use bounds what a migration copies and what its rounds re-copy, so the small ones are
quick wins that empty the host of most containers early, and the long, link-hungry moves
come last, when nothing else competes with them for the link or fails behind them.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Movable:
    """A container to move: its ID, the memory it needs where it goes, and its use now."""

    ct: str
    need: int  # bytes: its limit, else its use
    used: int


@dataclass(frozen=True)
class Capacity:
    """A destination: MemAvailable and the memory its own containers have declared."""

    name: str
    available: int
    committed: int


@dataclass(frozen=True)
class Verdict:
    """Whether `ct` may go to a destination (its preflight), and if not, why; and what the
    source measured of its migrations there, scaled to the container: ms to send, to restore."""

    ok: bool
    reason: str = ""
    transfer_ms: float = 0.0
    restore_ms: float = 0.0


@dataclass(frozen=True)
class Placement:
    """`ct` goes to `dest` (None: it stays where it is), and why."""

    ct: str
    dest: str | None
    reason: str


@dataclass
class _Room:
    capacity: Capacity
    planned: int = 0
    cts: list[str] = field(default_factory=list)

    @property
    def left(self) -> int:
        return self.capacity.available - self.capacity.committed - self.planned


def ordered(cts: Sequence[Movable]) -> list[Movable]:
    """The order containers move in: smallest memory in use first (see the module's text)."""
    return sorted(cts, key=lambda c: (c.used, c.ct))


def plan(cts: Sequence[Movable], dests: Sequence[Capacity], verdicts: Mapping[tuple[str, str], Verdict]) -> list[Placement]:
    """A placement for every container of `cts`, in the order they move. `verdicts` holds
    the preflight of (container, destination); a missing pair counts as not checked."""
    rooms = {d.name: _Room(d) for d in dests}
    result: list[Placement] = []
    for ct in ordered(cts):
        fits, refusals = [], []
        for name, room in rooms.items():
            verdict = verdicts.get((ct.ct, name), Verdict(False, "not checked"))
            if not verdict.ok:
                refusals.append(f"{name}: {verdict.reason}")
            elif room.left < ct.need:
                refusals.append(f"{name}: {_mib(room.left)} left there, it needs {_mib(ct.need)}")
            else:
                fits.append(room)
        if not fits:
            result.append(Placement(ct.ct, None, "; ".join(refusals) or "no destination"))
            continue
        best = min(fits, key=lambda r: (-r.left, len(r.cts), r.capacity.name))
        reason = f"preflight passed; most memory left: {_mib(best.left)}"
        if len(fits) > 1:
            others = ", ".join(f"{r.capacity.name} {_mib(r.left)}" for r in fits if r is not best)
            reason += f" (also fit: {others})"
        best.planned += ct.need
        best.cts.append(ct.ct)
        result.append(Placement(ct.ct, best.capacity.name, reason))
    return result


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def parallel(placements: Sequence[Placement], verdicts: Mapping[tuple[str, str], Verdict]) -> int:
    """How many migrations run at once by default, from the measured transfer rate and the
    containers' memory: never more than one per destination in the plan (a container's pause
    waits on its restore there; two restores on one host lengthen each other's), and only as
    many as the link carries within one restore's time (k transfers at once share the source's
    link, so each takes k times as long; beyond that, parallel moves only stretch pauses). At least 1."""
    chosen = [verdicts[(p.ct, p.dest)] for p in placements if p.dest is not None and (p.ct, p.dest) in verdicts]
    dests = len({p.dest for p in placements if p.dest is not None})
    if not chosen:
        return 1
    send = statistics.median(v.transfer_ms for v in chosen)
    restore = statistics.median(v.restore_ms for v in chosen)
    by_link = int(restore // send) if send > 0 else dests
    return max(1, min(dests, by_link))
