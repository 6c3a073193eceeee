"""Pre-copy rounds: when they stop, and what a restore costs.

(Which memory method runs is `phaul.memory.choice`'s.) `ConvergencePolicy` watches the
rounds: after each one it predicts the frozen time of a final dump taken now
from the measured dirty rate, transfer rate, dump cost and restore cost, and
says whether to stop. `phaul.memory.rounds.run_rounds` drives a method's rounds under a policy.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from phaul.config import MigrationOptions
from phaul.linux.fsutil import write_atomic
from phaul.memory.page_delta import PAGE

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class RoundFigures:
    """What one pre-copy round measured; the policy's only input."""

    round: int  # from 1
    pages: int  # pages in the round's dump
    changed_pages: int  # pages that differed from what the destination held (round 1: all)
    bytes_sent: int  # memory bytes the round sent (pages and the small images)
    send_ms: float  # how long sending them took
    dump_frozen_ms: float  # the dump's freeze up to its end: what the final dump will cost again
    local_ms: float  # other work the final round repeats: computing and applying the delta
    interval_s: float  # from the previous round's snapshot to this one's (0 in round 1)
    window_s: float  # from this round's snapshot until a final dump started now would freeze
    restore_ms: float  # predicted restore + commit + resume on the destination (RestoreCosts)
    frozen_ms: float = 0.0  # how long this round kept the container frozen: what another round costs it
    fs_ms: float = 0.0  # how long this round's file system sync took (the final one runs alongside the dump)


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str  # "" while rounds go on; else one of ConvergencePolicy.REASONS
    detail: str  # a sentence for the report
    predicted_frozen_ms: float
    dirty_rate: float  # bytes/s, 0 while unknown (round 1)
    remaining_bytes: int  # what the final round would send
    transfer_rate: float  # bytes/s


@dataclass
class ConvergencePolicy:
    """Decides after each round whether to go on pre-copying.

    Prediction of the frozen time of a final dump taken now: the dump's freeze
    (the lower of the last two rounds') + the delta and apply work of the last
    round + the transfer of
    what will have changed (dirty rate x time since the last snapshot, plus the
    small images) at the measured rate + the restore, commit and resume on the
    destination (`RoundFigures.restore_ms`, from `RestoreCosts`); the final file
    system sync runs from the freeze on, alongside all that but the restore, so
    it counts only where it takes longer (`RoundFigures.fs_ms` of the last round).

    Stops (first that holds): the prediction is within `max_downtime_ms`
    ("downtime-target"); another round could only bring the container's summed
    pauses (every round's freeze, and the final one at its least: the dump and
    the restore) beyond `pause_budget_ms`, what a single stop-and-copy is
    predicted to cost ("pause-budget"); what is left to copy adds less than `negligible` of the
    prediction, or less than the freeze one more round would cost the
    container, so no further round can pay off ("converged"); the remaining work failed to shrink by `shrink` in
    `max_stalls` rounds ("no-progress": the dirty rate keeps up with the
    transfer); `max_rounds` rounds ran ("max-rounds").
    """

    REASONS = ("downtime-target", "pause-budget", "converged", "no-progress", "max-rounds")

    max_downtime_ms: float = MigrationOptions.max_downtime_ms
    max_rounds: int = MigrationOptions.max_rounds
    pause_budget_ms: float = 0.0  # 0: none
    shrink: float = 0.10
    max_stalls: int = 2
    negligible: float = 0.10
    default_rate: float = 100e6  # bytes/s until a round measured one
    default_overhead_ms: float = 30.0  # per transfer, until a small round measured it
    history: list[RoundFigures] = field(default_factory=list)
    stalls: int = 0

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")

    def observe(self, fig: RoundFigures) -> Decision:
        """Take round `fig` into account and decide."""
        prev = self.history[-1] if self.history else None
        self.history.append(fig)
        rate, overhead = self._transfer_model()
        small = max(0, fig.bytes_sent - fig.changed_pages * PAGE) if fig.round > 1 else self._small_bytes(fig)
        total = fig.pages * PAGE
        if prev is None or fig.interval_s <= 0:
            dirty_rate = 0.0
            dirty = total  # unknown: assume everything changes
        else:
            dirty_rate = fig.changed_pages * PAGE / fig.interval_s
            dirty = min(total, int(dirty_rate * fig.window_s))
        remaining = dirty + small
        dirty_ms = dirty / rate * 1000
        # The final dump costs what the recent ones did; the lower of the last two filters out a
        # round slowed by something passing (a cold page cache, a busy CPU).
        dump_ms = min(f.dump_frozen_ms for f in self.history[-2:])
        memory_ms = dump_ms + fig.local_ms + overhead + remaining / rate * 1000
        predicted = max(memory_ms, fig.fs_ms) + fig.restore_ms

        def decide(stop: bool, reason: str = "", detail: str = "") -> Decision:
            return Decision(stop, reason, detail, predicted, dirty_rate, remaining, rate)

        paused = sum(f.frozen_ms for f in self.history)
        least_final = dump_ms + fig.restore_ms
        if self.pause_budget_ms and fig.round < self.max_rounds and paused + fig.frozen_ms + least_final > self.pause_budget_ms:
            if prev is None or predicted > self.max_downtime_ms:
                return decide(
                    True, "pause-budget",
                    f"another round would bring the pauses to at least {paused + fig.frozen_ms + least_final:.0f} ms in all, "
                    f"more than a single stop-and-copy's predicted {self.pause_budget_ms:.0f} ms",
                )
        if prev is not None:
            if predicted <= self.max_downtime_ms:
                return decide(
                    True, "downtime-target", f"predicted frozen time {predicted:.0f} ms <= {self.max_downtime_ms:.0f} ms"
                )
            if dirty_ms <= self.negligible * predicted:
                return decide(
                    True, "converged",
                    f"what still changes adds {dirty_ms:.0f} ms to a predicted {predicted:.0f} ms freeze; "
                    "more rounds cannot shorten it",
                )
            if dirty_ms <= fig.frozen_ms:
                return decide(
                    True, "converged",
                    f"another round would freeze the container for about {fig.frozen_ms:.0f} ms to save at most "
                    f"{dirty_ms:.0f} ms of a predicted {predicted:.0f} ms freeze",
                )
            if fig.changed_pages > (1 - self.shrink) * prev.changed_pages:
                self.stalls += 1
                if self.stalls >= self.max_stalls:
                    return decide(
                        True, "no-progress",
                        f"the remaining work did not shrink by {self.shrink:.0%} in {self.stalls} rounds "
                        f"(dirty rate {dirty_rate / MiB:.1f} MiB/s, transfer {rate / MiB:.1f} MiB/s)",
                    )
        if fig.round >= self.max_rounds:
            return decide(True, "max-rounds", f"{self.max_rounds} pre-copy round{'s' if self.max_rounds > 1 else ''} ran")
        return decide(False)

    def _transfer_model(self) -> tuple[float, float]:
        """(bytes/s, fixed ms per transfer) from the rounds so far."""
        big = [f for f in self.history if f.bytes_sent >= MiB and f.send_ms > 0]
        rate = max((f.bytes_sent / (f.send_ms / 1000) for f in big), default=self.default_rate)
        small = [max(0.0, f.send_ms - f.bytes_sent / rate * 1000) for f in self.history[1:]]
        overhead = min(small) if small else self.default_overhead_ms
        return rate, overhead

    @staticmethod
    def _small_bytes(fig: RoundFigures) -> int:
        return max(0, fig.bytes_sent - fig.pages * PAGE)


# -- costs, measured -------------------------------------------------------------


@dataclass
class RestoreCosts:
    """Times this source measured per destination for a number of pages, kept in a
    small JSON file: restore + commit + resume (the defaults' model), and with other
    defaults a pre-copy round's freeze or a transfer (`dump_costs`, `send_costs`).
    `estimate` scales the recent ones to a memory size (a line through them);
    without any it uses the default model."""

    path: Path
    default_ms: float = 250.0
    ms_per_mib: float = 1.0  # until samples of two sizes fit a line (the lab: 0.5 at 256 MiB, 1.0 at 1 GiB)
    fit_span_mib: float = 32.0
    keep: int = 16

    def estimate(self, dest: str, pages: int) -> float:
        """The ms for a dump of `pages`: a line through the destination's samples,
        its slope fitted once their sizes span `fit_span_mib` (else `ms_per_mib`)."""
        mib = pages * PAGE / MiB
        samples = [(p * PAGE / MiB, ms) for p, ms in self._load().get(dest, [])]
        if not samples:
            return self.default_ms + self.ms_per_mib * mib
        sizes = [x for x, _ in samples]
        slope = self.ms_per_mib
        if max(sizes) - min(sizes) >= self.fit_span_mib:
            slope = max(0.0, statistics.linear_regression(sizes, [ms for _, ms in samples]).slope)
        base = statistics.median(ms - slope * x for x, ms in samples)
        return max(0.0, base + slope * mib)

    def record(self, dest: str, pages: int, ms: float) -> None:
        data = self._load()
        data[dest] = (data.get(dest, []) + [[int(pages), round(float(ms), 1)]])[-self.keep :]
        try:
            write_atomic(self.path, json.dumps(data))
        except OSError as e:
            log.warning("cannot keep measured costs in %s: %s", self.path, e)

    def _load(self) -> dict[str, list[list[float]]]:
        try:
            data = json.loads(self.path.read_text())
            return {str(k): [[int(p), float(m)] for p, m in v] for k, v in data.items()}
        except (OSError, ValueError, TypeError):
            return {}


def dump_costs(path: Path) -> RestoreCosts:
    """A pre-copy round's freeze (the lab: about 100 ms + 0.6 ms/MiB, more on a busy host)."""
    return RestoreCosts(path, default_ms=100.0, ms_per_mib=0.6)


def send_costs(path: Path) -> RestoreCosts:
    """A transfer of pages to the destination (the lab: about 250 MB/s, 30 ms to start)."""
    return RestoreCosts(path, default_ms=30.0, ms_per_mib=1000 * MiB / 250e6)
