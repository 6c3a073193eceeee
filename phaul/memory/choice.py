"""Which memory method a migration runs: `--method` and what `auto` predicts.

The user asks for one of `REQUESTS`; `choose` turns it into one of the
memory methods of `phaul.memory.methods` (its report name). `auto` predicts,
for every method this host pair can run, what a connected client will see
(`Prediction`: the longest pause and the summed pauses, pre-copy rounds
included) from recorded figures (`CostInputs`), and picks:

1. the safe methods first (stop-and-copy, pre-copy: a failure at any point
   leaves a complete copy): the one with the lowest summed pauses among those
   whose longest pause meets `--max-downtime`;
2. otherwise the lowest longest pause among all methods whose summed pauses do
   not exceed stop-and-copy's (so never a method predicted to cost the
   client more in all than a single stop-and-copy); a less safe method only
   when it shortens the longest pause by `MARGIN` or more. Post-copy is among
   them only with `auto_postcopy` (`AUTO_POSTCOPY`, off: a link lost for
   longer than post-copy recovery bridges loses the container).

The model, per method, for M bytes of memory dirtied at d bytes/s:
- stop-and-copy: one pause: a full dump D(M) + sending M + restore R(M).
- pre-copy (page deltas between full dumps): round 1 freezes for D(M) and
  sends M while the container runs; the final freeze is D(M) + sending what
  changed since (d x the round's length) + R(M).
- post-copy: one pause without the memory: D(0) + R(0); after the resume the
  pages the container touches first arrive on fault, which a client sees as
  stalls of about the transfer of one second's dirty memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MiB = 1 << 20

STOP_AND_COPY = "stop-and-copy"
PAGE_DELTA = "precopy-page-delta"
SOFT_DIRTY = "precopy-soft-dirty"
POSTCOPY = "postcopy"
HYBRID = "hybrid"
LAZY = (POSTCOPY, HYBRID)  # the methods whose final dump leaves memory behind (a page link)
OFFLINE = "offline"  # no memory moves: stop, sync, start (phaul.migration.offline); never auto's pick

REQUESTS = ("auto", "precopy", "postcopy", "hybrid", "stop-and-copy")
ALIASES = {"off": "stop-and-copy"}  # `--precopy=off`
MARGIN = 0.10  # auto takes a less safe method only for a longest pause this much shorter
# A link lost for longer than post-copy recovery bridges loses the container: auto leaves post-copy out.
AUTO_POSTCOPY = False


@dataclass(frozen=True)
class CostInputs:
    """Recorded figures the prediction uses (`phaul.memory.policy.RestoreCosts` and the last rounds)."""

    memory_bytes: int  # what a full dump writes
    dirty_rate: float  # bytes/s the container rewrites (its last migration's, or a guess)
    dump_fixed_ms: float = 100.0  # a full dump's freeze without memory (the lab: about 100 ms)
    dump_ms_per_mib: float = 0.6  # ... and per MiB (the lab: 246 ms for 256 MiB)
    rate: float = 250e6  # bytes/s a transfer moves (the lab's TLS data channel)
    restore_fixed_ms: float = 290.0  # restore + commit + resume without memory
    restore_ms_per_mib: float = 0.5

    def dump_ms(self, nbytes: int) -> float:
        return self.dump_fixed_ms + self.dump_ms_per_mib * nbytes / MiB

    def restore_ms(self, nbytes: int) -> float:
        return self.restore_fixed_ms + self.restore_ms_per_mib * nbytes / MiB

    def send_ms(self, nbytes: float) -> float:
        return nbytes / self.rate * 1000


@dataclass(frozen=True)
class Prediction:
    method: str  # a report name
    longest_ms: float
    sum_ms: float
    safe: bool  # a failure at any point leaves a complete copy


@dataclass(frozen=True)
class Choice:
    method: str  # a report name, a key of phaul.memory.methods.METHODS
    reason: str  # a sentence for the report
    predictions: tuple[Prediction, ...] = ()


class MethodUnavailable(ValueError):
    """The requested method cannot run between these hosts; the message says why."""


def predict(method: str, c: CostInputs) -> Prediction:
    """What a client is predicted to see with `method` (a report name)."""
    m = c.memory_bytes
    if method == STOP_AND_COPY:
        pause = c.dump_ms(m) + c.send_ms(m) + c.restore_ms(m)
        return Prediction(method, pause, pause, True)
    if method in (PAGE_DELTA, SOFT_DIRTY):
        round_freeze = c.dump_ms(m) if method == PAGE_DELTA else c.dump_ms(0)
        window_s = (c.dump_ms(m) + c.send_ms(m)) / 1000
        final = c.dump_ms(m) + c.send_ms(min(m, c.dirty_rate * window_s)) + c.restore_ms(m)
        return Prediction(method, max(round_freeze, final), round_freeze + final, True)
    if method == POSTCOPY:
        pause = c.dump_ms(0) + c.restore_ms(0)
        stalls = c.send_ms(min(m, c.dirty_rate))
        return Prediction(method, max(pause, stalls), pause + stalls, False)
    raise ValueError(f"no prediction for method {method!r}")


def precopy_method(features: Mapping[str, bool]) -> str:
    """Pre-copy on this host: CRIU's pre-dump where the kernel tracks dirty pages, page deltas otherwise."""
    return SOFT_DIRTY if features.get("soft_dirty") else PAGE_DELTA


def choose(
    request: str, features: Mapping[str, bool], costs: CostInputs, max_downtime_ms: float,
    unavailable: Mapping[str, str] | None = None, auto_postcopy: bool = AUTO_POSTCOPY,
) -> Choice:
    """The method for `--method request` on a host pair: `features` of this host
    (`phaul.linux.doctor.features()`), `unavailable`: report name -> why it cannot
    run between these hosts; `auto_postcopy`: may auto take post-copy. Raises
    MethodUnavailable for an explicit request that cannot run, ValueError for an
    unknown request."""
    request = ALIASES.get(request, request)
    unavailable = dict(unavailable or {})
    pre = precopy_method(features)
    if request == "stop-and-copy":
        return Choice(STOP_AND_COPY, "asked for: a single stop-and-copy")
    if request == "precopy":
        return Choice(pre, "asked for: pre-copy rounds, then a stop-and-copy of what changed")
    if request in LAZY:
        if request in unavailable:
            raise MethodUnavailable(f"--method {request} cannot run: {unavailable[request]}")
        why = "pre-copy rounds, then post-copy of what changed since the last" if request == HYBRID else request
        return Choice(request, f"asked for: {why}")
    if request != "auto":
        raise ValueError(f"unknown method {request!r}; use one of {', '.join(REQUESTS)}")

    if not auto_postcopy:
        unavailable.setdefault(POSTCOPY, "auto takes it only once post-copy survives a link cut; ask with --method postcopy")
    names = [n for n in (STOP_AND_COPY, pre, POSTCOPY) if n not in unavailable]
    preds = tuple(predict(n, costs) for n in names)
    stop = preds[0]
    meets = [p for p in preds if p.safe and p.longest_ms <= max_downtime_ms]
    if meets:
        best = min(meets, key=lambda p: (p.sum_ms, p.longest_ms))
        why = f"its predicted longest pause {best.longest_ms:.0f} ms meets --max-downtime {max_downtime_ms:.0f} ms"
    else:
        # preds is in order of safety: a later one must cut the longest pause by MARGIN
        best = stop
        for p in preds[1:]:
            if p.sum_ms <= stop.sum_ms and p.longest_ms < best.longest_ms * (1 - MARGIN):
                best = p
        why = (
            f"the shortest predicted longest pause ({best.longest_ms:.0f} ms, "
            f"{best.sum_ms:.0f} ms in all against {stop.sum_ms:.0f} ms for stop-and-copy)"
        )
    skipped = "".join(f"; {n} not possible: {r}" for n, r in unavailable.items() if n != HYBRID)
    return Choice(best.method, f"auto: {best.method}, {why}{skipped}", preds)
