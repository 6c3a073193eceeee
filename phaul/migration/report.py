"""The migration report: one dataclass, printed as a table or as JSON."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class Result(StrEnum):
    """How a migration ended (its report, its journal, settling it); the values are what
    the JSON, the protocol and the journal files say."""

    OK = "ok"  # the container runs on the destination
    ROLLED_BACK = "rolled_back"  # it runs on the source
    IN_DOUBT = "in_doubt"  # not settled yet: the peer could not be asked
    FAILED = "failed"  # no copy could be run
    REFUSED = "refused"  # never started (the journal's; preflight refused it)
    IN_PROGRESS = "in_progress"  # still under way (listings and recovery outcomes only)


RESULTS = (Result.OK, Result.ROLLED_BACK, Result.IN_DOUBT, Result.FAILED)  # a Report's
# The timings in the order things happen (set in any order; protobuf maps keep none); others follow by name.
CRIU_ORDER = (
    "freezing", "frozen", "memdump", "memwrite", "transfer", "image_check", "lazy_start", "restore", "forking", "runc_restore",
    "lazy_held",
)
PHASE_ORDER = (
    "dump", "transfer", "transfer.fs", "transfer.memory", "transfer.delta", "transfer.delta.compare",
    "transfer.stream", "transfer.delta_transfer", "transfer.apply", "transfer.apply_dest", "restore", "commit", "resume",
)


@dataclass
class Round:
    """One memory round: a pre-copy round, or the final (frozen) dump."""

    pages_dumped: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    frozen_ms: float = 0.0
    duration_ms: float = 0.0
    fs_bytes_sent: int = 0
    predicted_frozen_ms: float = 0.0
    dirty_rate: float = 0.0


@dataclass
class Report:
    """What one migration did. `result` is one of RESULTS."""

    migration_id: str
    ct: str
    source: str
    destination: str
    result: Result = Result.FAILED
    memory_method: str = "stop-and-copy"
    rounds: list[Round] = field(default_factory=list)
    frozen_ms: float = 0.0
    total_ms: float = 0.0
    bytes_sent: int = 0
    fs_bytes_sent: int = 0
    criu_ms: dict[str, float] = field(default_factory=dict)
    error: str = ""
    stop_reason: str = ""
    method_reason: str = ""  # why memory_method ran (phaul.memory.choice)
    postcopy_ms: float = 0.0  # post-copy: from the resume until every page was on the destination
    postcopy_bytes: int = 0  # post-copy: the pages that crossed after the resume (counted in bytes_sent)
    started_at: str = ""
    phases_ms: dict[str, float] = field(default_factory=dict)  # phaul's timings of the frozen phase
    aborted_by: str = ""  # rolled back on request (`phaul abort`, Ctrl-C on migrate): who asked

    @property
    def pauses_ms(self) -> list[float]:
        """Every pause the container had, in order: each pre-copy round's freeze (a dump that
        leaves it running still holds it still while CRIU dumps) and the final one."""
        return [r.frozen_ms for r in self.rounds if r.frozen_ms > 0]

    def to_dict(self) -> dict[str, Any]:
        """The report as its JSON shows it (phaul/schemas/report.json, with phaul.output's schema_version)."""
        d = asdict(self)
        d["criu_ms"], d["phases_ms"] = self._timings()
        pauses = self.pauses_ms
        d.update(pauses_ms=pauses, pause_longest_ms=max(pauses, default=0.0), pause_total_ms=sum(pauses))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _timings(self) -> tuple[dict[str, float], dict[str, float]]:
        """criu_ms and phases_ms in the order things happen, whatever order they were set in."""
        return _ordered(self.criu_ms, CRIU_ORDER), _ordered(self.phases_ms, PHASE_ORDER)

    def to_table(self) -> str:
        """A human-readable summary: key figures, then one line per round."""
        lines = [
            f"migration {self.migration_id}: {self.ct} {self.source} -> {self.destination}: {self.result.upper()}",
        ]
        rows = [
            ("memory method", self.memory_method),
            ("frozen", f"{self.frozen_ms:.0f} ms"),
            ("pauses", _pauses(self.pauses_ms)),
            *([("post-copy", f"{_size(self.postcopy_bytes)} in {self.postcopy_ms:.0f} ms from the resume to the last page")]
              if self.postcopy_ms else []),
            ("total", f"{self.total_ms:.0f} ms"),
            ("sent", f"{_size(self.bytes_sent)} ({_size(self.fs_bytes_sent)} file system)"),
        ]
        if self.method_reason:
            rows.append(("method chosen", self.method_reason))
        if self.stop_reason:
            rows.append(("rounds stopped", self.stop_reason))
        for label, timings in zip(("CRIU", "while frozen"), self._timings(), strict=True):
            if timings:
                rows.append((label, ", ".join(f"{k} {v:.0f} ms" for k, v in timings.items())))
        if self.aborted_by:
            rows.append(("aborted by", self.aborted_by))
        if self.error:
            rows.append(("error", self.error))
        lines += [f"  {k:<15} {v}" for k, v in rows]
        if self.rounds:
            lines.append(
                f"  {'round':>5} {'pages':>9} {'sent pages':>10} {'sent':>10} {'fs sent':>10} {'frozen':>9} {'took':>9}"
                f" {'dirty':>12} {'predicted':>9}"
            )
            for i, r in enumerate(self.rounds, 1):
                lines.append(
                    f"  {i:>5} {r.pages_dumped:>9} {r.pages_sent:>10} {_size(r.bytes_sent):>10} "
                    f"{_size(r.fs_bytes_sent):>10} {r.frozen_ms:>6.0f} ms {r.duration_ms:>6.0f} ms"
                    + (f" {_size(r.dirty_rate):>10}/s" if r.dirty_rate else f" {'':>12}")
                    + (f" {r.predicted_frozen_ms:>6.0f} ms" if r.predicted_frozen_ms else "")
                )
        return "\n".join(lines)

    # -- assembly, while the migration runs ---------------------------------------------

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time the block as phase `phase` of the frozen phase (`phases_ms`), even when it fails."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases_ms[phase] = (time.monotonic() - t0) * 1000

    def take_criu_ms(self, stats: Mapping[str, float], keys: tuple[str, ...]) -> None:
        """Keep CRIU's own timings `keys` from `stats` (what CRIU or the destination measured)."""
        self.criu_ms.update({k: stats[k] for k in keys if k in stats})

    def add_final_round(self, final: Round) -> None:
        """The final (frozen) round ended: it is the last round, and the totals follow."""
        self.frozen_ms = final.frozen_ms
        self.rounds.append(final)
        self.bytes_sent = self.fs_bytes_sent + sum(r.bytes_sent for r in self.rounds) + self.postcopy_bytes

    def save(self, reports_dir: Path) -> None:
        """Keep the report as REPORTS_DIR/MIGRATION-ID.json."""
        reports_dir.mkdir(parents=True, exist_ok=True)
        (reports_dir / f"{self.migration_id}.json").write_text(self.to_json())


def _pauses(pauses: list[float]) -> str:
    if not pauses:
        return "none"
    each = ", ".join(f"{p:.0f}" for p in pauses)
    return f"{len(pauses)}, {sum(pauses):.0f} ms in all, longest {max(pauses):.0f} ms ({each} ms)"


def _ordered(timings: Mapping[str, float], order: tuple[str, ...]) -> dict[str, float]:
    rank = {k: i for i, k in enumerate(order)}
    return dict(sorted(timings.items(), key=lambda kv: (rank.get(kv[0], len(order)), kv[0])))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
