"""The source side of a migration: the state machine.

preflight -> file system pre-sync -> freeze and final dump (held at the commit
gate) -> final sync and image transfer -> restore held stopped on the
destination -> commit (the source copy is killed) -> resume on the
destination -> clean-up.

The invariant: until the destination holds a restored copy, the source copy is
running or frozen at the gate and resumes on any failure; the source copy is
destroyed only after the destination holds its copy; the destination copy runs
only after the source copy is gone.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from phaul import criu, messages
from phaul.client import Agent, connect
from phaul.doctor import criu_path, criu_version
from phaul.errors import Conflict, PhaulError, ToolFailed
from phaul.faults import Fault
from phaul.fs_sync import RsyncSender
from phaul.host import Host
from phaul.report import Report, Round
from phaul.rpc import phaul_pb2 as pb
from phaul.transport import parse_endpoint
from phaul.validate import check_id

log = logging.getLogger(__name__)

DUMP_TIMEOUT = 300.0
RESTORE_TIMEOUT = 300.0
CT_EXCLUDES = ("criu.conf",)


@dataclass
class MigrateOptions:
    tcp: str = "keep"  # keep | close
    precopy: str = "auto"  # auto | off
    max_rounds: int = 8
    max_downtime_ms: int = 300
    bandwidth: int = 0  # bytes/s for pre-copy rounds, 0 = unlimited
    fault: Fault | None = None  # tests only


Emit = Callable[[pb.Progress], None]


class SourceMigration:
    """Moves container `ct_id` from `host` to the agent `dest_name` at `dest_address`."""

    def __init__(
        self, host: Host, ct_id: str, dest_name: str, dest_address: str, options: MigrateOptions, emit: Emit
    ) -> None:
        self.host = host
        self.ct_id = check_id(ct_id)
        self.dest_name = check_id(dest_name, "destination host name")
        self.dest_address = dest_address
        parse_endpoint(dest_address)
        self.options = options
        self.emit = emit
        self.id = uuid.uuid4().hex[:12]
        self.dir = host.migration_dir(self.id)
        self.report = Report(
            migration_id=self.id, ct=self.ct_id, source=host.name, destination=dest_name,
            started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        self._dest: Agent | None = None
        self._prepared = False
        self._gate: criu.CommitGate | None = None
        self._dump: subprocess.Popen[bytes] | None = None
        self._committed = False
        self._sender: RsyncSender
        self._t0 = time.monotonic()

    # -- the state machine -------------------------------------------------

    def preflight(self) -> None:
        """Check both hosts and open the data channel. Raises PhaulError with
        nothing changed anywhere when the migration cannot go ahead."""
        self._t0 = time.monotonic()
        try:
            self._preflight()
        except BaseException:
            if self._dest is not None:
                self._dest.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def run(self) -> Report:
        """Migrate (after `preflight`); never raises. The report says what happened."""
        t0 = self._t0
        try:
            self._migrate()
            self.report.result = "ok"
        except Exception as e:  # every failure ends in a report
            if not isinstance(e, PhaulError):
                log.exception("migration %s failed unexpectedly", self.id)
            self.report.error = str(e)
            self.report.result = self._recover_from_failure()
        finally:
            self._clear_criu_config()
            if self._dest is not None:
                self._dest.close()
            self.report.total_ms = (time.monotonic() - t0) * 1000
            self._save_report()
        log.info("migration %s of %s to %s: %s", self.id, self.ct_id, self.dest_name, self.report.result)
        return self.report

    def _preflight(self) -> None:
        ct = self.host.containers
        self._phase("preflight", f"checking {self.ct_id} on {self.host.name} and {self.dest_name}")
        info = ct.info(self.ct_id)
        if info.state != "running":
            raise Conflict(
                f"container {self.ct_id} is {info.state} on {self.host.name}, not running",
                f"start it (`phaul --host {self.host.name} ct start {self.ct_id}`) or move it while stopped by copying",
            )
        config = ct.config(self.ct_id)
        my_criu = criu_version(criu_path() or "")
        if my_criu is None:
            raise ToolFailed(f"{self.host.name} has no usable CRIU", "run `make setup`")
        self._dest = connect(self.dest_address, self.dest_name, self.host.creds)
        self._dest.call("Info", pb.Empty(), timeout=10)
        self.dir.mkdir(parents=True)
        reply = self._dest.call(
            "Prepare",
            pb.PrepareRequest(
                migration_id=self.id, source_name=self.host.name, config=messages.config_to_proto(config),
                criu_version=".".join(map(str, my_criu)),
                fault=f"{self.options.fault.step}:{self.options.fault.kind}" if self.options.fault else "",
            ),
            timeout=30,
        )
        self._prepared = True
        _, port = parse_endpoint(reply.data_address)
        dest_ip, _ = parse_endpoint(self.dest_address)
        self._sender = RsyncSender(self.host.creds, f"{dest_ip}:{port}", self.dest_name, self.options.bandwidth)

    def _migrate(self) -> None:
        ct = self.host.containers
        assert self._dest is not None
        sender = self._sender
        self._phase("fs-presync", "copying the root file system while the container runs")
        ct_dir = ct.container_dir(self.ct_id)
        presync = sender.push(ct_dir, "ct", CT_EXCLUDES)
        self.report.fs_bytes_sent += presync.bytes_sent
        self._phase("fs-presync", f"root file system copied ({presync.bytes_sent} bytes)", presync.bytes_sent)

        self._phase("dump", "freezing and dumping")
        round_ = self._final_dump()
        self.report.memory_method = "stop-and-copy"

        self._phase("transfer", "final file system sync and image transfer while frozen")
        t_transfer = time.monotonic()
        fs_final = sender.push(ct_dir, "ct", CT_EXCLUDES)
        images = sender.push(self.dir / "images", "images")
        round_.fs_bytes_sent = fs_final.bytes_sent
        round_.bytes_sent = images.bytes_sent
        self.report.fs_bytes_sent += fs_final.bytes_sent
        self.report.criu_ms["transfer"] = (time.monotonic() - t_transfer) * 1000

        self._phase("restore", f"restoring on {self.dest_name}, held stopped")
        restored = self._dest.call("Restore", pb.MigrationRef(migration_id=self.id), timeout=RESTORE_TIMEOUT)
        for key in ("restore", "forking", "runc_restore"):
            if key in restored.criu_ms:
                self.report.criu_ms[key] = restored.criu_ms[key]

        self._phase("commit", f"destroying the copy on {self.host.name}")
        self._commit()
        self._dump_stats(round_)

        self._phase("resume", f"starting the copy on {self.dest_name}")
        self._dest.call("Resume", pb.MigrationRef(migration_id=self.id), timeout=60)
        frozen_ms = (time.time_ns() - self._gate.frozen_at_ns()) / 1e6 if self._gate else 0.0
        self.report.frozen_ms = frozen_ms
        round_.frozen_ms = frozen_ms
        round_.duration_ms = frozen_ms
        self.report.rounds.append(round_)
        self.report.bytes_sent = self.report.fs_bytes_sent + sum(r.bytes_sent for r in self.report.rounds)

        self._phase("cleanup", "removing temporary state")
        try:
            self._dest.call("Finish", pb.MigrationRef(migration_id=self.id), timeout=30)
        except PhaulError as e:
            log.warning("migration %s: destination clean-up: %s", self.id, e)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _final_dump(self) -> Round:
        """Freeze and dump into the migration's image directory, holding the
        dumped container frozen at the commit gate."""
        ct = self.host.containers
        images, work = self.dir / "images", self.dir / "work"
        images.mkdir()
        work.mkdir()
        self._gate = criu.CommitGate(self.dir / "gate")
        ct.criu_config_path(self.ct_id).write_text(self._gate.criu_options())
        args = ct.checkpoint_cmd(self.ct_id, images, work, tcp_established=self.options.tcp == "keep")
        with open(work / "runc-checkpoint.log", "wb") as out:
            self._dump = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            self._gate.wait_reached(self._dump, DUMP_TIMEOUT)
        except ToolFailed as e:
            raise ToolFailed(f"{e.message}:\n{criu.log_tail(work / 'dump.log')}", "see the CRIU log in the agent's state directory") from None
        return Round()

    def _commit(self) -> None:
        """Let CRIU kill the frozen source copy, then remove what is left of it."""
        assert self._gate is not None and self._dump is not None
        if not self._gate.release(commit=True):
            raise ToolFailed("the dumped container was not waiting at the commit gate")
        self._committed = True
        rc = self._dump.wait(timeout=60)
        if rc != 0:
            log.warning("migration %s: runc checkpoint ended with %d after commit", self.id, rc)
        self.host.containers.destroy(self.ct_id)

    def _dump_stats(self, round_: Round) -> None:
        """CRIU's dump statistics, written once the dump has ended."""
        stats = criu.read_stats(self.dir / "work", "dump")
        for key in ("freezing", "frozen", "memdump", "memwrite"):
            if key in stats:
                self.report.criu_ms[key] = stats[key]
        round_.pages_dumped = int(stats.get("pages_written", 0))
        round_.pages_sent = round_.pages_dumped

    # -- failure handling -----------------------------------------------------

    def _recover_from_failure(self) -> str:
        """Settle after a failure: before commit, resume the source and remove the
        destination's copy (rolled_back); after commit, try to get the
        destination's copy running (ok) or report in_doubt."""
        if self._committed:
            for _ in range(3):
                try:
                    assert self._dest is not None
                    self._dest.call("Resume", pb.MigrationRef(migration_id=self.id), timeout=30)
                    return "ok"
                except PhaulError as e:
                    log.error("migration %s: resuming on %s failed: %s", self.id, self.dest_name, e)
                    time.sleep(1)
            return "in_doubt"
        source_ok = self._resume_source()
        if self._prepared and self._dest is not None:
            try:
                self._dest.call("Abort", pb.MigrationRef(migration_id=self.id), timeout=60)
            except PhaulError as e:
                log.error("migration %s: removing the copy on %s failed: %s", self.id, self.dest_name, e)
                self.report.error += f"; the destination may keep partial state: {e}"
        shutil.rmtree(self.dir, ignore_errors=True)
        return "rolled_back" if source_ok else "failed"

    def _resume_source(self) -> bool:
        """Make sure the source copy runs again; True if it does."""
        if self._gate is not None and self._dump is not None and self._dump.poll() is None:
            self._gate.release(commit=False)
            try:
                self._dump.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.error("migration %s: the dump did not end after abort", self.id)
        try:
            return self.host.containers.info(self.ct_id).state == "running"
        except PhaulError:
            return False

    # -- helpers ------------------------------------------------------------------

    def _phase(self, phase: str, message: str, bytes_sent: int = 0) -> None:
        log.info("migration %s: %s: %s", self.id, phase, message)
        if self.options.fault is not None and self.options.fault.kind == "fail":
            self.options.fault.at(phase)
        self.emit(pb.Progress(phase=phase, message=message, bytes_sent=bytes_sent))

    def _clear_criu_config(self) -> None:
        try:
            path = self.host.containers.criu_config_path(self.ct_id)
            if path.parent.exists():
                path.write_text("")
        except PhaulError:
            pass

    def _save_report(self) -> None:
        reports = self.host.state_dir / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        (reports / f"{self.id}.json").write_text(self.report.to_json())

