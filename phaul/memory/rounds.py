"""Driving pre-copy rounds: a memory method's rounds, each with a file system
sync beside it, until the convergence policy (phaul.memory.policy) says stop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from phaul.channels.fs_sync import FsSync, SyncStats
from phaul.memory.methods import MemoryMethod
from phaul.memory.policy import ConvergencePolicy, Decision, RoundFigures
from phaul.migration.report import Round

log = logging.getLogger(__name__)

Progress = Callable[[RoundFigures, Round, Decision], None]  # after each round


@dataclass
class RoundsResult:
    rounds: list[Round]
    stop_reason: str
    fs_bytes_sent: int


def run_rounds(
    method: MemoryMethod,
    policy: ConvergencePolicy,
    fs: FsSync,
    progress: Progress,
    restore_estimate: Callable[[int], float],
    sequential_fs: bool = False,
) -> RoundsResult:
    """Run `method`'s pre-copy rounds until `policy` says stop; each round also
    syncs the root file system through `fs` while the container runs, alongside
    the memory unless `sequential_fs` (a bandwidth cap that must hold for both
    together)."""
    rounds: list[Round] = []
    fs_total = 0
    prev_snapshot_ns = 0
    decision: Decision | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fs-round") as pool:
        for k in range(1, policy.max_rounds + 1):
            t0 = time.monotonic()
            fs_job: Future[SyncStats] | None = None if sequential_fs else pool.submit(fs.sync, live=True)
            try:
                dump, sent = method.precopy_round(k)
            finally:
                if fs_job is not None:
                    fs_job.exception()  # wait for it; its error is raised below, in this thread
            fs_stats = fs.sync(live=True) if fs_job is None else fs_job.result()
            fs_total += fs_stats.bytes_sent
            end_ns = time.time_ns()
            fig = RoundFigures(
                round=k, pages=dump.pages, changed_pages=sent.pages_sent, bytes_sent=sent.bytes_sent,
                send_ms=sent.send_ms, dump_frozen_ms=dump.dump_frozen_ms, local_ms=sent.local_ms,
                interval_s=(dump.snapshot_ns - prev_snapshot_ns) / 1e9 if prev_snapshot_ns else 0.0,
                window_s=(end_ns - dump.snapshot_ns) / 1e9 + dump.startup_ms / 1000,
                restore_ms=restore_estimate(dump.pages), frozen_ms=dump.frozen_ms, fs_ms=fs_stats.duration_ms,
            )
            prev_snapshot_ns = dump.snapshot_ns
            decision = policy.observe(fig)
            row = Round(
                pages_dumped=dump.pages, pages_sent=sent.pages_sent, bytes_sent=sent.bytes_sent,
                frozen_ms=dump.frozen_ms, duration_ms=(time.monotonic() - t0) * 1000, fs_bytes_sent=fs_stats.bytes_sent,
                predicted_frozen_ms=decision.predicted_frozen_ms, dirty_rate=decision.dirty_rate,
            )
            rounds.append(row)
            log.info(
                "pre-copy round %d: %d pages dumped, %d sent (%d bytes), frozen %.0f ms, predicted final freeze %.0f ms%s",
                k, row.pages_dumped, row.pages_sent, row.bytes_sent, row.frozen_ms, row.predicted_frozen_ms,
                f"; stop: {decision.reason}" if decision.stop else "",
            )
            progress(fig, row, decision)
            if decision.stop:
                break
    assert decision is not None
    return RoundsResult(rounds, f"{decision.reason}: {decision.detail}", fs_total)
