"""The source side of a migration: the state machine.

preflight -> pre-copy rounds of memory and files while the container runs
(phaul.memory.policy, phaul.memory.methods; with --precopy=off a file system
pre-sync only) -> freeze and final dump (held at the commit gate) -> final
sync and memory transfer -> restore held stopped on the destination -> commit
(the source copy is killed) -> resume on the destination -> clean-up.

The invariant: until the destination holds a restored copy, the source copy is
running or frozen at the gate and resumes on any failure; the source copy is
destroyed only after the destination holds its copy; the destination copy runs
only after the source copy is gone.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phaul.linux import criu
from phaul.linux import freezer
from phaul.memory import policy as iterative_dump
from phaul.memory import methods as memory_methods
from phaul.channels import messages
from phaul.linux import network
from phaul.migration import preflight
from phaul.linux import procfs
from phaul.migration import recovery
from phaul.channels import transport
from phaul.channels.client import Agent, connect
from phaul.linux.doctor import criu_path, criu_version, features
from phaul.errors import Conflict, PhaulError, ToolFailed
from phaul.testing.faults import Fault
from phaul.channels.fs_sync import RsyncSender
from phaul.agent.host import Host
from phaul.migration.report import Report, Result, Round
from phaul.checks import CheckState
from phaul.rpc import phaul_pb2 as pb
from phaul.memory.page_stream import PageStream
from phaul.channels.transport import parse_endpoint, rsh_env
from phaul.validate import check_id

log = logging.getLogger(__name__)

DUMP_TIMEOUT = 300.0
RESTORE_TIMEOUT = 300.0
CT_EXCLUDES = ("criu.conf",)
RESTORE_COSTS = "restore-costs.json"  # iterative_dump.RestoreCosts, per destination


@dataclass
class MigrateOptions:
    tcp: str = "keep"  # keep | close
    precopy: str = "auto"  # auto | off
    max_rounds: int = 8
    max_downtime_ms: int = 300
    bandwidth: int = 0  # bytes/s for pre-copy rounds, 0 = unlimited
    fault: Fault | None = None  # tests only
    force: tuple[str, ...] = ()  # preflight checks whose failure does not stop the migration


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
        self.emit = self._round_boundaries(emit)
        self.id = uuid.uuid4().hex[:12]
        self.dir = host.migration_dir(self.id)
        self.report = Report(
            migration_id=self.id, ct=self.ct_id, source=host.name, destination=dest_name,
            started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        self._dest: Agent | None = None
        self._prepared = False
        self._gate: criu.CommitGate | None = None
        self._freeze: network.FreezeSignal | None = None  # addressed containers: when the final dump begins
        self._dump: subprocess.Popen[bytes] | None = None
        self._committed = False
        self._sender: RsyncSender
        self._method: memory_methods.MemoryMethod | None = None
        self._t0 = time.monotonic()
        self.journal = host.journal
        self._journaled = ""  # the last step journaled

    # -- the state machine -------------------------------------------------

    def preflight(self) -> None:
        """Check both hosts and open the data channel. Raises PhaulError with
        nothing changed anywhere when the migration cannot go ahead."""
        self._t0 = time.monotonic()
        self.journal.begin(self.id, "source", self.ct_id, self.dest_name, self.dest_address)
        try:
            self._preflight()
        except BaseException as e:
            if self._dest is not None:
                if self._prepared:
                    try:
                        self._dest.call("Abort", pb.MigrationRef(migration_id=self.id), timeout=60)
                    except PhaulError as ex:
                        log.warning("migration %s: removing what %s prepared: %s", self.id, self.dest_name, ex)
                self._dest.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.journal.settle(self.id, "source", Result.REFUSED, str(e))
            raise

    def run(self) -> Report:
        """Migrate (after `preflight`); never raises. The report says what happened."""
        t0 = self._t0
        try:
            self._migrate()
            self.report.result = Result.OK
        except Exception as e:  # every failure ends in a report
            if not isinstance(e, PhaulError):
                log.exception("migration %s failed unexpectedly", self.id)
            self.report.error = str(e)
            self.report.result = self._recover_from_failure()
        finally:
            self._stop_network_watch()
            self._journal_result()
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
        checks = preflight.run(self.host, self.ct_id, self._dest, self.dest_name)
        for c in checks:
            if c.status != CheckState.PASS:
                log.warning("migration %s: preflight %s on %s: %s: %s", self.id, c.name, c.host, c.status, c.message)
        refused = preflight.refusal(checks, self.options.force)
        if refused is not None:
            raise refused
        self.dir.mkdir(parents=True)
        reply = self._dest.call(
            "Prepare",
            pb.PrepareRequest(
                migration_id=self.id, source_name=self.host.name, config=messages.config_to_proto(config),
                criu_version=".".join(map(str, my_criu)),
                fault=f"{self.options.fault.step}:{self.options.fault.kind}" if self.options.fault else "",
                tcp_close=self.options.tcp == "close",
                source_address=self.host.listen,
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
        ct_dir = ct.container_dir(self.ct_id)
        cap = self.options.bandwidth
        method = self._method = self._memory_method()
        self.report.memory_method = method.name

        def fs_sync(bwlimit: int, live: bool = True) -> int:
            return sender.push(ct_dir, "ct", CT_EXCLUDES, bwlimit=bwlimit, live=live).bytes_sent

        if method.precopy:
            self._phase("precopy", f"pre-copying memory ({method.name}) and files while the container runs")
            try:
                self._precopy(method, lambda: fs_sync(cap))
            except memory_methods.PrecopyDumpFailed as e:  # CRIU cannot dump it and leave it running: stop and copy
                log.warning("migration %s: pre-copy failed, falling back to stop-and-copy: %s", self.id, e)
                self.report.stop_reason = f"pre-copy failed ({e.message.splitlines()[0]}); stop-and-copy"
                method.cleanup()
                method = self._method = memory_methods.StopAndCopy(method.ctx)
                self.report.memory_method = method.name
        else:
            self._phase("fs-presync", "copying the root file system while the container runs")
            presync = fs_sync(cap)
            self.report.fs_bytes_sent += presync
            self.report.stop_reason = "pre-copy off: a single stop-and-copy" if self.options.precopy == "off" else ""
            self._phase("fs-presync", f"root file system copied ({presync} bytes)", presync)

        method.prepare_final()
        try:
            self._final_phase(method, lambda: fs_sync(0, live=False))  # frozen: every file must go
        finally:
            method.release()

        self._phase("cleanup", "removing temporary state")
        try:
            self._dest.call("Finish", pb.MigrationRef(migration_id=self.id), timeout=30)
        except PhaulError as e:
            log.warning("migration %s: destination clean-up: %s", self.id, e)
        method.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _final_phase(self, method: memory_methods.MemoryMethod, final_fs_sync: Callable[[], int]) -> None:
        """Freeze, dump, send, restore, commit, resume: the container is frozen throughout."""
        assert self._dest is not None
        self._phase("dump", "freezing and dumping")
        # Once the container is frozen its files stop changing: the final file
        # system sync then runs while CRIU is still dumping memory.
        fs_job = _Job(final_fs_sync, "final-fs-sync")
        try:
            round_ = self._final_dump(parent=method.final_parent(), on_frozen=fs_job.start)
            assert self._gate is not None
            frozen_at = self._gate.frozen_at_ns()
            phases = self.report.phases_ms
            phases["dump"] = (_mtime_ns(self._gate.dir / "reached", time.time_ns()) - frozen_at) / 1e6

            self._phase("transfer", "final file system sync and memory transfer while frozen")
            t_transfer = time.monotonic()
            fs_job.start()  # if CRIU froze the container itself
            sent = method.send_final(self.dir / "images")
            phases["transfer.memory"] = (time.monotonic() - t_transfer) * 1000
            fs_final = fs_job.result()
        finally:
            fs_job.wait()
        transfer_ms = (time.monotonic() - t_transfer) * 1000
        round_.fs_bytes_sent = fs_final
        round_.bytes_sent = sent.bytes_sent
        round_.pages_sent = sent.pages_sent
        self.report.fs_bytes_sent += fs_final
        phases.update({"transfer": transfer_ms, "transfer.fs": fs_job.ms})
        phases.update({f"transfer.{k}": v for k, v in sent.phases_ms.items()})
        self.report.criu_ms["transfer"] = phases["transfer"]

        self._phase("restore", f"restoring on {self.dest_name}, held stopped")
        t_restore = time.monotonic()
        restored = self._dest.call("Restore", pb.MigrationRef(migration_id=self.id), timeout=RESTORE_TIMEOUT)
        phases["restore"] = (time.monotonic() - t_restore) * 1000
        for key in ("restore", "forking", "runc_restore"):
            if key in restored.criu_ms:
                self.report.criu_ms[key] = restored.criu_ms[key]

        self._phase("commit", f"destroying the copy on {self.host.name}")
        t_commit = time.monotonic()
        self._commit()
        phases["commit"] = (time.monotonic() - t_commit) * 1000

        self._phase("resume", f"starting the copy on {self.dest_name}")
        t_resume = time.monotonic()
        self._dest.call("Resume", pb.MigrationRef(migration_id=self.id), timeout=60)
        phases["resume"] = (time.monotonic() - t_resume) * 1000
        frozen_ms = (time.time_ns() - frozen_at) / 1e6
        self._remove_source()
        self.report.frozen_ms = frozen_ms
        round_.frozen_ms = frozen_ms
        round_.duration_ms = frozen_ms
        self._dump_stats(round_)
        round_.pages_sent = sent.pages_sent
        self.report.rounds.append(round_)
        self.report.bytes_sent = self.report.fs_bytes_sent + sum(r.bytes_sent for r in self.report.rounds)
        iterative_dump.RestoreCosts(self.host.state_dir / RESTORE_COSTS).record(
            self.dest_name, round_.pages_dumped, (time.monotonic() - t_restore) * 1000
        )

    def _memory_method(self) -> memory_methods.MemoryMethod:
        """The memory method for this host and the options (iterative_dump.choose_method)."""
        name = iterative_dump.choose_method(self.options.precopy, features())
        ct = self.host.containers
        ctx = memory_methods.Context(
            ct=ct, ct_id=self.ct_id, dir=self.dir, sender=self._sender, apply_pages=self._apply_pages,
            bandwidth=self.options.bandwidth, tcp_established=True, freezer=ct.freezer_state(self.ct_id),
            open_stream=self._open_page_stream,
        )
        return memory_methods.METHODS[name](ctx)

    def _precopy(self, method: memory_methods.MemoryMethod, fs_sync: Callable[[], int]) -> None:
        """Pre-copy rounds until the convergence policy stops them."""
        policy = iterative_dump.ConvergencePolicy(
            max_downtime_ms=self.options.max_downtime_ms, max_rounds=self.options.max_rounds
        )
        costs = iterative_dump.RestoreCosts(self.host.state_dir / RESTORE_COSTS)

        def progress(fig: iterative_dump.RoundFigures, row: Round, d: iterative_dump.Decision) -> None:
            k = fig.round
            rate = fig.bytes_sent / (fig.send_ms / 1000) if fig.send_ms > 0 else 0.0  # the memory transfer's own rate
            self.emit(pb.Progress(
                phase="precopy", round=k, bytes_sent=row.bytes_sent + row.fs_bytes_sent, rate=rate,
                dirty_rate=d.dirty_rate, predicted_frozen_ms=d.predicted_frozen_ms,
                message=f"round {k}: {row.pages_sent} of {row.pages_dumped} pages sent"
                + (f"; stopping: {d.reason}" if d.stop else ""),
            ))

        result = iterative_dump.run_rounds(
            method, policy, fs_sync, progress, lambda pages: costs.estimate(self.dest_name, pages),
            sequential_fs=self.options.bandwidth > 0,
        )
        self.report.rounds.extend(result.rounds)
        self.report.fs_bytes_sent += result.fs_bytes_sent
        self.report.stop_reason = result.stop_reason

    def _open_page_stream(self) -> PageStream:
        """A TLS stream to the destination's page receiver, ready before the freeze."""
        assert self._dest is not None
        reply = self._dest.call("OpenPageStream", pb.MigrationRef(migration_id=self.id), timeout=30)
        return PageStream({**os.environ, **rsh_env(self.host.creds, reply.address, self.dest_name)})

    def _apply_pages(self) -> float:
        """Ask the destination to apply the page delta just pushed; its ms."""
        assert self._dest is not None
        reply = self._dest.call("ApplyPages", pb.ApplyPagesRequest(migration_id=self.id), timeout=RESTORE_TIMEOUT)
        return float(reply.apply_ms)

    def _final_dump(self, parent: Path | None = None, on_frozen: Callable[[], None] | None = None) -> Round:
        """Freeze and dump into the migration's image directory, holding the
        dumped container frozen at the commit gate. `parent`: the images of the
        last pre-dump round (soft-dirty pre-copy), relative to the image directory.
        `on_frozen` runs as soon as the gate script has frozen the container itself,
        while CRIU still dumps (not at all when CRIU does the freezing)."""
        ct = self.host.containers
        images, work = self.dir / "images", self.dir / "work"
        images.mkdir()
        work.mkdir()
        self._gate = criu.CommitGate(self.dir / "gate", freezer=ct.freezer_state(self.ct_id))
        ct.criu_config_path(self.ct_id).write_text(self._gate.criu_options() + self._watch_freeze())
        # Connections always travel; with --tcp=close the destination ends them cleanly (FIN) before it runs.
        args = ct.checkpoint_cmd(self.ct_id, images, work, tcp_established=True, parent_path=parent)
        with open(work / "runc-checkpoint.log", "wb") as out:
            self._dump = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            if on_frozen is not None:
                gate, dump = self._gate, self._dump
                deadline = time.monotonic() + DUMP_TIMEOUT
                while not gate.frozen() and dump.poll() is None and time.monotonic() < deadline:
                    if (gate.dir / "reached").exists():
                        break
                    time.sleep(0.001)
                if gate.frozen():
                    on_frozen()
            self._gate.wait_reached(self._dump, DUMP_TIMEOUT)
        except ToolFailed as e:
            raise ToolFailed(f"{e.message}:\n{criu.log_tail(work / 'dump.log')}", "see the CRIU log in the agent's state directory") from None
        return Round()

    def _commit(self) -> None:
        """Let CRIU kill the frozen source copy; return once none of its processes
        can run again and its address is off this host's bridge. The rest of its
        removal (`_remove_source`) waits until the destination's copy runs."""
        assert self._gate is not None and self._dump is not None
        gate = self._gate
        if not gate.release(commit=True):
            raise ToolFailed("the dumped container was not waiting at the commit gate (its CRIU or the gate ended)")
        # The gate script acknowledges what it read; only then is the commit certain
        # (whether runc and CRIU are still alive or not).
        recovery.wait_until(lambda: gate.verdict() is not None or not gate.waiting(), 10.0, 0.002)
        if gate.verdict() is None:
            self._dump.wait(timeout=60)
        if gate.verdict() != "commit":  # the gate gave up waiting and resumed the source copy
            raise ToolFailed("the commit gate ended without the commit (it timed out); the source copy runs again")
        self._committed = True
        # CRIU kills the dumped processes (never a graceful stop: their life goes on
        # on the destination); runc's own clean-up after that need not be waited for.
        dump = self._dump
        if not recovery.wait_until(lambda: self._source_dead() or dump.poll() is not None, 10.0, 0.002):
            dump.wait(timeout=60)
        if not recovery.wait_until(self._source_dead, 0.05, 0.002):  # its CRIU died before it killed them
            log.warning("migration %s: CRIU ended without killing the source copy; killing it", self.id)
            self.host.containers.kill(self.ct_id)
            if not recovery.wait_until(self._source_dead, 10.0, 0.002):
                raise ToolFailed(
                    f"the source copy of {self.ct_id} did not die after the commit",
                    f"kill it: `phaul --host {self.host.name} ct destroy {self.ct_id}`, then `phaul recover {self.id}`",
                )
        if self.host.containers.config(self.ct_id).ip:
            network.unplug(self.ct_id)  # before the destination plugs the same address in
        self._journal_step("source-destroyed")

    def _source_dead(self) -> bool:
        """True once no process of the source copy can run again (all gone or
        zombies); without a freezer cgroup to look into, once its dump has ended."""
        state = self._method.ctx.freezer if self._method is not None else None
        if state is None:
            return self._dump is None or self._dump.poll() is not None
        return not any(procfs.alive(p) for p in freezer.pids(state))

    def _remove_source(self) -> None:
        """Remove what is left of the killed source copy (runc state, cgroups, files). Idempotent."""
        if self._dump is not None:
            rc = self._dump.wait(timeout=60)
            if rc != 0:
                log.warning("migration %s: runc checkpoint ended with %d after commit", self.id, rc)
        if not self.host.containers.container_dir(self.ct_id).exists():
            return
        try:
            self.host.containers.destroy(self.ct_id, timeout=0)
        except PhaulError as e:
            log.error("migration %s: removing the killed source copy of %s: %s", self.id, self.ct_id, e)
            self.report.error += f"; the source copy's remains are left on {self.host.name}: {e.message} (`phaul ct destroy {self.ct_id}`)"

    def _dump_stats(self, round_: Round) -> None:
        """CRIU's dump statistics, written once the dump has ended."""
        stats = criu.read_stats(self.dir / "work", "dump")
        for key in ("freezing", "frozen", "memdump", "memwrite"):
            if key in stats:
                self.report.criu_ms[key] = stats[key]
        round_.pages_dumped = int(stats.get("pages_written", 0))
        round_.pages_sent = round_.pages_dumped

    # -- failure handling -----------------------------------------------------

    def _recover_from_failure(self) -> Result:
        """Settle after a failure: before commit, resume the source and remove the
        destination's copy (rolled_back); after commit, try to get the
        destination's copy running (ok) or report in_doubt."""
        link = max(5.0, transport.LINK_TIMEOUT)  # how long a call may wait on a link that may be dead
        if self._committed:
            self._remove_source()
            if not self._resume_dest(deadline=time.monotonic() + 3 * link):
                return Result.IN_DOUBT  # the images stay until the migration settles (phaul recover)
            self._finish_after_failure()
            return Result.OK
        self._stop_network_watch()
        source_ok = self._resume_source()
        if not source_ok and self._prepared and recovery.source_copy(self.host, self.ct_id, self.dir) == "gone":
            # The source copy died (e.g. CRIU was killed while it held it): a copy the
            # destination holds restored is now the only one.
            if self._dest_state(link) == recovery.DestState.RESTORED and self._resume_dest(time.monotonic() + 3 * link):
                self._committed = True
                self.host.containers.destroy(self.ct_id, timeout=0)
                self._finish_after_failure()
                return Result.OK
        if self._prepared and self._dest is not None:
            try:
                self._dest.call("Abort", pb.MigrationRef(migration_id=self.id), timeout=3 * link)
            except PhaulError as e:
                log.error("migration %s: removing the copy on %s failed: %s", self.id, self.dest_name, e)
                self.report.error += f"; the destination may keep partial state: {e}"
        if source_ok:  # the segment may have learned the destination meanwhile
            network.reannounce(self.host.containers, self.ct_id)
        self._cleanup_method()
        shutil.rmtree(self.dir, ignore_errors=True)
        return Result.ROLLED_BACK if source_ok else Result.FAILED

    def _cleanup_method(self) -> None:
        """Close what the memory method holds (streams, round images), whatever happened."""
        if self._method is not None:
            try:
                self._method.cleanup()
            except Exception as e:  # keep settling
                log.warning("migration %s: memory method clean-up: %s", self.id, e)

    def _finish_after_failure(self) -> None:
        """The destination's copy runs after all: drop what the migration kept here and there."""
        try:
            assert self._dest is not None
            self._dest.call("Finish", pb.MigrationRef(migration_id=self.id), timeout=max(5.0, transport.LINK_TIMEOUT))
        except PhaulError as e:
            log.warning("migration %s: destination clean-up: %s (its resolver finishes it)", self.id, e)
        self._cleanup_method()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _resume_dest(self, deadline: float) -> bool:
        """Tell the destination to run its copy, retrying until `deadline`; True once it runs."""
        assert self._dest is not None
        while True:
            try:
                self._dest.call("Resume", pb.MigrationRef(migration_id=self.id), timeout=max(5.0, transport.LINK_TIMEOUT))
                return True
            except PhaulError as e:
                log.error("migration %s: resuming on %s failed: %s", self.id, self.dest_name, e)
            if time.monotonic() > deadline:
                return False
            time.sleep(1)

    def _dest_state(self, timeout: float) -> str | None:
        try:
            assert self._dest is not None
            return str(self._dest.call("MigrationStatus", pb.MigrationRef(migration_id=self.id), timeout=timeout).state)
        except PhaulError:
            return None

    def _resume_source(self) -> bool:
        """Make sure the source copy runs again; True if it does."""
        if self._gate is not None and self._dump is not None and self._dump.poll() is None:
            self._gate.release(commit=False)
            try:
                self._dump.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.error("migration %s: the dump did not end after abort", self.id)
        return recovery.ensure_running(self.host, self.ct_id)  # thaws a copy whose CRIU died at the gate

    # -- the container's address (phaul.linux.network) -----------------------------------

    def _watch_freeze(self) -> str:
        """For an addressed container: CRIU options that signal the start of the
        final dump, and a watcher that then asks the destination to hold the
        container's traffic. "" for a container without an address."""
        if self.host.containers.config(self.ct_id).ip is None:
            return ""
        dest = self._dest
        assert dest is not None
        self._freeze = network.FreezeSignal(self.dir / "net")
        self._freeze.start(lambda: dest.call("HoldTraffic", pb.MigrationRef(migration_id=self.id), timeout=10))
        return self._freeze.criu_options()

    def _stop_network_watch(self) -> None:
        if self._freeze is not None:
            self._freeze.stop()

    # -- helpers ------------------------------------------------------------------

    def _phase(self, phase: str, message: str, bytes_sent: int = 0) -> None:
        log.info("migration %s: %s: %s", self.id, phase, message)
        self._journal_step(phase)
        if self.options.fault is not None:
            self.options.fault.at(phase, state_dir=self.host.state_dir, migration_id=self.id)
        self.emit(pb.Progress(phase=phase, message=message, bytes_sent=bytes_sent))

    def _round_boundaries(self, emit: Emit) -> Emit:
        """Progress passes through; the end of pre-copy round k is the boundary of
        step "precopy-K" (K = k + 1): journaled, and a fault may happen there."""

        def wrapped(p: pb.Progress) -> None:
            emit(p)
            if p.phase == "precopy" and p.round > 0:
                step = f"precopy-{p.round + 1}"
                self._journal_step(step)
                if self.options.fault is not None:
                    self.options.fault.at(step, state_dir=self.host.state_dir, migration_id=self.id)

        return wrapped

    def _journal_step(self, step: str) -> None:
        """Journal `step` durably before acting on it (once per step)."""
        if step != self._journaled:
            self.journal.record(self.id, "source", step)
            self._journaled = step

    def _journal_result(self) -> None:
        try:
            if self.report.result == Result.IN_DOUBT:
                self.journal.mark_in_doubt(self.id, "source", self.report.error)
            else:
                self.journal.settle(self.id, "source", self.report.result, self.report.error)
        except (OSError, PhaulError) as e:
            log.error("migration %s: cannot journal the result %s: %s", self.id, self.report.result, e)

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


def _mtime_ns(path: Path, default: int) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return default


class _Job:
    """`fn` in a thread of its own, started at most once; `result()` returns
    its value or raises its exception in the caller's thread."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._fn = fn
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.ms = 0.0

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            self._box["value"] = self._fn()
        except BaseException as e:  # re-raised by result()
            self._box["error"] = e
        finally:
            self.ms = (time.monotonic() - t0) * 1000

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def wait(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()

    def result(self) -> Any:
        self.start()
        self.wait()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]
