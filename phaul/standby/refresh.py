"""One refresh of a standby copy, driven by the primary's agent.

A refresh is a migration that stops before the restore (phaul.migration.source):
preflight and Prepare (`standby`: the standby host seeds the new checkpoint's root
file system with hard links of its current one, phaul.standby.store) -> an
incremental rsync of the root file system while the container runs -> a short
freeze in which CRIU dumps and the last file-system changes are synced, so that
memory and files are of the same instant -> the dump's commit gate is released
without the commit: the container runs on here, exactly as a migration rolled back
before its commit -> the images travel -> KeepStandby: the standby host checks
what arrived and makes it the recovery point. Any failure settles as a migration's
would before its commit (the container runs here; the standby host drops the
half-received refresh and keeps its last complete checkpoint).

The memory goes as one full dump each refresh, out of the freeze. What travels is a
page delta against the last kept refresh (`RefreshDelta`; the basis both hosts hold,
phaul.standby.basis): only the pages that changed since, or the whole images when
there is no basis.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from phaul.agent.host import Host
from phaul.channels.fs_sync import RsyncFsSync, SyncStats
from phaul.config import MigrationOptions
from phaul.errors import ToolFailed
from phaul.memory import choice
from phaul.memory.methods import Context, PageDeltaMethod
from phaul.migration.copies import ensure_running
from phaul.migration.report import Result
from phaul.migration.source import CT_EXCLUDES, SourceMigration
from phaul.rpc import phaul_pb2 as pb
from phaul.standby.basis import Bases
from phaul.standby.store import link_tree


class RefreshDelta(PageDeltaMethod):
    """The checkpoint travels as a page delta against `basis`, the last checkpoint the
    standby host kept (it seeded the new one's images with it at Prepare); the images
    go whole if the delta cannot be made or applied."""

    name = "standby-page-delta"
    precopy = False

    def __init__(self, ctx: Context, basis: Path) -> None:
        super().__init__(ctx)
        self.basis = basis

    def _rebase(self, images: Path) -> None:
        self.basis = images  # the old basis is phaul.standby.basis's, replaced once the refresh is kept


class StandbyRefresh(SourceMigration):
    """Pushes a consistent checkpoint of `ct_id` to the standby host `dest_name`."""

    standby = True

    def __init__(self, host: Host, ct_id: str, dest_name: str, dest_address: str) -> None:
        super().__init__(host, ct_id, dest_name, dest_address, MigrationOptions(method=choice.STOP_AND_COPY),
                         lambda p: None)
        self.checkpoint_at = 0.0  # wall-clock s just before the container was frozen
        self.pause_ms = 0.0  # from the freeze until it ran again
        self.bases = Bases(host.state_dir)
        self.basis = self.bases.get(ct_id, dest_name)
        self.standby_base = self.basis.gen if self.basis is not None else ""

    def _save_report(self) -> None:
        """Only the last refresh's report is kept (STATE/standby-out/reports/CT.json), and the
        journal of a refresh that ended well goes: a refresh every few seconds would fill both."""
        reports = self.host.state_dir / "standby-out" / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        (reports / f"{self.ct_id}.json").write_text(self.report.to_json())
        if self.report.result == Result.OK:
            self.journal.path(self.id, "source").unlink(missing_ok=True)

    def _choose_method(self) -> choice.Choice:
        return choice.Choice(choice.STOP_AND_COPY, "standby refresh: one full dump, the container left running")

    def _watch_freeze(self) -> str:
        return ""  # nothing moves: the standby host holds no frames

    def _migrate(self) -> None:
        fs = RsyncFsSync(self._sender, self.host.containers.container_dir(self.ct_id), "ct", CT_EXCLUDES)
        method = self.held.method = self._memory_method()
        if self.basis is not None and self.standby_base:  # the standby host seeded the images with it
            method = self.held.method = RefreshDelta(method.ctx, self.basis.images)
        self.report.memory_method = method.name
        self._phase("fs-presync", "copying what changed in the root file system while the container runs")
        self.report.fs_bytes_sent += fs.sync(live=True).bytes_sent
        method.prepare_final()
        try:
            self._phase("dump", "freezing, dumping and syncing the last changes")
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="standby-fs-sync") as pool:
                job: list[Future[SyncStats]] = []

                def start_fs_sync() -> None:
                    if not job:
                        job.append(pool.submit(fs.sync, live=False, bwlimit=0))

                self._final_dump(on_frozen=start_fs_sync)
                gate = self.held.gate
                assert gate is not None
                frozen_at = gate.frozen_at_ns()
                start_fs_sync()  # if CRIU froze the container itself
                final_fs = job[0].result()
            checkpoint = self.dir / "checkpoint"
            link_tree(self.dir / "images", checkpoint)  # the images stay, whatever runc does after the gate
            self._run_on()
            self.checkpoint_at, self.pause_ms = frozen_at / 1e9, (time.time_ns() - frozen_at) / 1e6
            self.report.frozen_ms = self.pause_ms
            self.report.fs_bytes_sent += final_fs.bytes_sent
            self._phase("transfer", f"sending the checkpoint to {self.dest_name}; the container runs")
            sent = method.send_final(checkpoint)
            self.report.bytes_sent += sent.bytes_sent
        finally:
            method.release()
        self._phase("keep", f"{self.dest_name} checks the checkpoint and keeps it")
        self.dest.call("KeepStandby", pb.MigrationRef(migration_id=self.id), timeout=self.host.timeouts.restore + 30)
        try:
            self.bases.replace(self.ct_id, self.dest_name, checkpoint, self.id)
        except OSError as e:  # the next refresh sends the images whole
            self.log.warning("cannot keep the basis of the next refresh's page delta: %s", e)
            self.bases.drop(self.ct_id)
        method.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run_on(self) -> None:
        """Release the gate without the commit: the dumped container runs on."""
        gate, dump = self.held.gate, self.held.dump
        assert gate is not None and dump is not None
        gate.release(commit=False)
        try:
            dump.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.log.error("runc checkpoint did not end after the gate let the container go")
        if not ensure_running(self.host, self.ct_id):
            raise ToolFailed(
                f"{self.ct_id} did not run again after its standby checkpoint",
                f"see {self.dir / 'work' / 'dump.log'}; start it: `phaul --host {self.host.name} ct start {self.ct_id}`",
            )

