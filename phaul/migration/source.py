"""The source side of a migration: the state machine.

preflight -> pre-copy rounds of memory and files while the container runs
(phaul.memory.rounds under phaul.memory.policy, with a phaul.memory.methods
method; with stop-and-copy a file system pre-sync only) -> freeze and final
dump (held at the commit gate) -> final sync and memory transfer -> restore
held stopped on the destination -> commit (the source copy is killed) ->
resume on the destination -> clean-up.

The invariant: until the destination holds a restored copy, the source copy is
running or frozen at the gate and resumes on any failure; the source copy is
destroyed only after the destination holds its copy; the destination copy runs
only after the source copy is gone. What a failure does at each point is
phaul.migration.failure's; this module only runs the steps and records what it
holds (`Held`) as it goes.

Post-copy (phaul.memory.lazy_link) changes the last two steps: CRIU leaves the
private memory in the dumped tree and serves it once the dump is complete (the
tree frozen by phaul, its segment port down); the destination restores without
it, its keeper holding every task's userfaultfd; the commit then only marks the
source tree as never to run again, and after the resume the only complete state
is split between the destination's memory and the frozen source tree, until the
last page has left (`postcopy`, the report's `postcopy_ms`); then the tree is
killed. If the pages stop for good in that window the destination's copy is
killed before any task could read a missing page: `failed`, the container lost.

Offline moves and copies (phaul.migration.offline: `--offline`, a container that is
not running, `phaul copy`) take the `offline` method: `_offline_phase` stops the
container instead of dumping it and the destination starts it afresh.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from phaul.agent.host import Host
from phaul.channels import messages
from phaul.channels.client import Agent, connect
from phaul.channels.fs_sync import FsSync, RsyncFsSync, RsyncSender, SyncStats
from phaul.channels.transport import TlsEndpoint, rsh_env, write_secret
from phaul.checks import CheckState
from phaul.config import MigrationOptions
from phaul.containers import ContainerConfig
from phaul.endpoint import parse_endpoint
from phaul.errors import Conflict, PhaulError, Refused, ToolFailed
from phaul.linux import criu, freezer, network, procfs
from phaul.linux.doctor import criu_path, criu_version, features
from phaul.memory import choice, lazy_link, methods, policy
from phaul.memory.choice import MiB
from phaul.memory.page_delta import PAGE
from phaul.memory.page_stream import PageStream
from phaul.memory.rounds import run_rounds
from phaul.migration import failure, offline, preflight
from phaul.migration.cancel import Aborted, Cancellation
from phaul.migration.copies import wait_until
from phaul.migration.logs import MigrationLog
from phaul.migration.report import Report, Result, Round
from phaul.migration.steps import StepPoint, precopy_round
from phaul.rpc import phaul_pb2 as pb
from phaul.validate import check_id

log = logging.getLogger(__name__)

CT_EXCLUDES = ("criu.conf",)
RESTORE_COSTS = "restore-costs.json"  # policy.RestoreCosts, per destination
DUMP_COSTS = "dump-costs.json"  # policy.dump_costs, per destination
SEND_COSTS = "send-costs.json"  # policy.send_costs, per destination
LOST_MARK = "was lost on"  # in the destination's Finish error when its keeper killed the copy (phaul.migration.dest)
ARRIVING_MARK = "are still arriving"  # in its Finish error while its keeper works (phaul.migration.dest)
POSTCOPY_MIN_RATE = 1 << 20  # bytes/s: a post-copy that moves slower than this for its whole memory has failed
PAGE_HUB = "page-hub.sock"  # post-copy: the page hub's unix socket, in the migration's directory
DIRTY_RATE_GUESS = 16 * MiB  # bytes/s a container rewrites, for auto's prediction before any round measured it


Emit = Callable[[pb.Progress], None]


def source_costs(state_dir: Path, dest: str, memory: int) -> tuple[float, float]:
    """(ms to send, ms to restore) `memory` bytes to `dest`, as this host's migrations there measured them."""
    pages = memory // PAGE
    return (policy.send_costs(state_dir / SEND_COSTS).estimate(dest, pages),
            policy.RestoreCosts(state_dir / RESTORE_COSTS).estimate(dest, pages))


@dataclass
class Held:
    """What the migration holds at this moment; the failure rules read it."""

    dest: Agent | None = None  # the destination's agent, connected
    prepared: bool = False  # the destination prepared the migration (Abort removes it)
    gate: criu.CommitGate | None = None  # the final dump's commit gate
    dump: subprocess.Popen[bytes] | None = None  # the final dump (runc checkpoint), held at the gate
    committed: bool = False  # the source copy is destroyed: the destination's copy is the one
    method: methods.MemoryMethod | None = None
    freeze: network.FreezeSignal | None = None  # addressed containers: when the final dump begins
    page_link: TlsEndpoint | None = None  # post-copy: where the destination fetches pages (phaul.memory.lazy_link)
    lazy_port: int = 0  # post-copy: the port of 127.0.0.1 CRIU serves the pages on
    page_hub: subprocess.Popen[bytes] | None = None  # post-copy: holds CRIU's page-server connection (page_relay.Hub)
    lost: bool = False  # post-copy failed after the resume: no copy of the container is left
    stopped: bool = False  # offline: the source copy was stopped (a rollback starts it again)
    starting: bool = False  # offline: the destination was told to start its copy (the commit)


class SourceMigration:
    """Moves container `ct_id` from `host` to the agent `dest_name` at `dest_address`."""

    standby = False  # a standby refresh (phaul.standby.refresh): the destination keeps a checkpoint
    standby_base = ""  # a refresh: the kept checkpoint it can send a page delta against; "" once refused

    def __init__(
        self, host: Host, ct_id: str, dest_name: str, dest_address: str, options: MigrationOptions, emit: Emit
    ) -> None:
        self.host = host
        self.ct_id = check_id(ct_id)
        self.dest_name = check_id(dest_name, "destination host name")
        self.dest_address = dest_address
        self._dest = parse_endpoint(dest_address, "destination address")
        self.options = options
        self.emit = self._round_boundaries(emit)
        self.id = uuid.uuid4().hex[:12]
        self.log = MigrationLog(log, self.id)
        self.dir = host.migration_dir(self.id)
        self.report = Report(
            migration_id=self.id, ct=self.ct_id, source=host.name, destination=dest_name,
            started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        self.held = Held()
        self.cancel = Cancellation()  # `abort` asks; the steps check (phaul.migration.cancel)
        self._sender: RsyncSender
        self._secret = ""  # the destination's data-channel secret (Prepare's reply)
        self._memory_bytes = 0  # the container's memory, as preflight measured it
        self._choice = choice.Choice(choice.STOP_AND_COPY, "")  # preflight chooses
        self._cost_inputs = choice.CostInputs(0, 0.0)  # ... from these figures
        self._t0 = time.monotonic()
        self.journal = host.journal
        self._journaled = ""  # the last step journaled
        self.dest_config: ContainerConfig | None = None  # what the destination creates (a copy's own ID and address)
        self.start_dest = False  # offline: the destination runs the command (the source copy ran)

    @property
    def offline(self) -> bool:
        """An offline move or a copy (phaul.migration.offline)."""
        return self._choice.method == choice.OFFLINE

    @property
    def dest(self) -> Agent:
        """The destination's agent (connected by `preflight`)."""
        assert self.held.dest is not None, "preflight connects the destination"
        return self.held.dest

    # -- the state machine -------------------------------------------------

    def preflight(self) -> None:
        """Check both hosts and open the data channel. Raises PhaulError with
        nothing changed anywhere when the migration cannot go ahead."""
        self._t0 = time.monotonic()
        self.journal.begin(self.id, "source", self.ct_id, self.dest_name, self.dest_address)
        try:
            self._preflight()
        except BaseException as e:
            self.close_page_link()
            failure.undo_preflight(self)
            self.journal.settle(self.id, "source", Result.REFUSED, str(e))
            raise

    def run(self) -> Report:
        """Migrate (after `preflight`); never raises. The report says what happened."""
        try:
            self._migrate()
            self.report.result = Result.OK
        except Exception as e:  # every failure ends in a report
            if not isinstance(e, PhaulError):
                self.log.exception("failed unexpectedly")
            self.report.error = str(e)
            if self.cancel.requested_by and not self.held.committed:  # what failed was ended by the abort
                self.report.aborted_by = self.cancel.requested_by
                self.report.error = Aborted(f"aborted by {self.cancel.requested_by}").message
            self.report.result = failure.settle(self)
        finally:
            self.stop_network_watch()
            self.close_page_link()
            self._journal_result()
            self._clear_criu_config()
            if self.held.dest is not None:
                self.held.dest.close()
            self.report.total_ms = (time.monotonic() - self._t0) * 1000
            self._save_report()
        self.log.info("%s to %s: %s", self.ct_id, self.dest_name, self.report.result)
        return self.report

    def _save_report(self) -> None:
        self.report.save(self.host.state_dir / "reports")

    def _preflight(self) -> None:
        ct = self.host.containers
        self._phase("preflight", f"checking {self.ct_id} on {self.host.name} and {self.dest_name}")
        info = ct.info(self.ct_id)
        config = self.dest_config = ct.config(self.ct_id)
        # A paused container is not moved offline unasked: its memory would be lost (preflight refuses it).
        cold = self.options.offline or bool(self.options.copy_as) or info.state not in ("running", "paused")
        if cold:
            self.start_dest = info.state in ("running", "paused")
            self.journal.record(self.id, "source", offline.COPY_MARK if self.options.copy_as else offline.OFFLINE_MARK)
        if self.options.copy_as:
            self.dest_config, note = offline.copy_config(config, self.options.copy_as, self.options.copy_ip)
            self.report.method_reason = note
        my_criu = criu_version(criu_path() or "")
        if my_criu is None and not cold:
            raise ToolFailed(f"{self.host.name} has no usable CRIU", "run `make setup`")
        dest = self.held.dest = connect(self.dest_address, self.dest_name, self.host.creds)
        dest.call("Info", pb.Empty(), timeout=10)
        checks, needs = preflight.run(self.host, self.ct_id, dest, self.dest_name, self.dest_config if cold else None)
        self._memory_bytes = needs.memory if needs is not None else 0
        for c in checks:
            if c.status != CheckState.PASS:
                self.log.warning("preflight %s on %s: %s: %s", c.name, c.host, c.status, c.message)
        refused = preflight.refusal(checks, self.options.force)
        if refused is not None:
            raise refused
        self._choice = self._offline_choice(info.state) if cold else self._choose_method()
        self.dir.mkdir(parents=True)
        page_link = self._open_page_link() if self._choice.method in choice.LAZY else ""
        reply = dest.call(
            "Prepare",
            pb.PrepareRequest(
                migration_id=self.id, source_name=self.host.name, config=messages.config_to_proto(self.dest_config),
                criu_version=".".join(map(str, my_criu or ())), offline=cold, start=self.start_dest,
                need_bytes=needs.disk if needs is not None else 0,
                tcp_close=self.options.tcp == "close",
                source_address=self.host.advertised, page_link=page_link, standby=self.standby,
                standby_base=self.standby_base,
            ),
            timeout=30,
        )
        self.held.prepared = True
        # the destination names the port only: its address is the one this host dialed
        data = self._dest.with_port(parse_endpoint(reply.data_address, "data channel address").port)
        if not reply.secret:
            raise Refused(f"{self.dest_name} gave no data-channel secret", f"upgrade phaul on {self.dest_name}")
        self._secret = reply.secret  # in memory and in the environment of rsync and the page stream only
        if reply.standby_base != self.standby_base:
            self.standby_base = ""  # the destination does not hold it (any more): the images go whole
        if page_link:  # and for post-copy's page link, in a 0600 file its endpoint's command reads
            write_secret(self.dir / "page-link.secret", self._secret)
        self._sender = RsyncSender(
            self.host.creds, str(data), self.dest_name, self.host.timeouts.link, self._secret,
            self.options.bandwidth, self.cancel,
        )

    def _migrate(self) -> None:
        fs = RsyncFsSync(self._sender, self.host.containers.container_dir(self.ct_id), "ct", CT_EXCLUDES)
        method = self.held.method = self._memory_method()
        self.report.memory_method = method.name

        if isinstance(method, methods.Offline):
            self._offline_phase(fs)
        elif method.precopy:
            self._phase("precopy", f"pre-copying memory ({method.name}) and files while the container runs")
            try:
                self._precopy(method, fs)
            except methods.PrecopyDumpFailed as e:  # CRIU cannot dump it and leave it running: stop and copy
                self.log.warning("pre-copy failed, falling back to stop-and-copy: %s", e)
                self.report.stop_reason = f"pre-copy failed ({e.message.splitlines()[0]}); stop-and-copy"
                method.cleanup()
                method = self.held.method = methods.StopAndCopy(method.ctx)
                self.report.memory_method = method.name
        else:
            self._phase("fs-presync", "copying the root file system while the container runs")
            presync = fs.sync(live=True).bytes_sent
            self.report.fs_bytes_sent += presync
            self._phase("fs-presync", f"root file system copied ({presync} bytes)", presync)

        if not isinstance(method, methods.Offline):
            method.prepare_final()
            try:
                self._final_phase(method, fs)
            finally:
                method.release()

        self._phase("cleanup", "removing temporary state")
        try:
            self.dest.call("Finish", pb.MigrationRef(migration_id=self.id), timeout=30)
        except PhaulError as e:
            self.log.warning("destination clean-up: %s", e)
        method.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _final_phase(self, method: methods.MemoryMethod, fs: FsSync) -> None:
        """Freeze, dump, send, restore, commit, resume: the container is frozen throughout."""
        report = self.report
        self._phase("dump", "freezing and dumping")
        # Once the container is frozen its files stop changing: the final file system
        # sync (every file must go: no bandwidth cap, not live) runs while CRIU still dumps.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="final-fs-sync") as pool:
            fs_job: list[Future[SyncStats]] = []

            def start_fs_sync() -> None:
                if not fs_job:
                    fs_job.append(pool.submit(fs.sync, live=False, bwlimit=0))

            final = self._final_dump(parent=method.final_parent(), on_frozen=start_fs_sync)
            gate = self.held.gate
            assert gate is not None
            if method.lazy:
                self._start_page_server()
            frozen_at = gate.frozen_at_ns()
            report.phases_ms["dump"] = (_mtime_ns(gate.dir / "reached", time.time_ns()) - frozen_at) / 1e6

            self._phase("transfer", "final file system sync and memory transfer while frozen")
            with report.timed("transfer"):
                start_fs_sync()  # if CRIU froze the container itself
                with report.timed("transfer.memory"):
                    sent = method.send_final(self.dir / "images")
                fs_final = fs_job[0].result()
        final.fs_bytes_sent = fs_final.bytes_sent
        final.bytes_sent = sent.bytes_sent
        final.pages_sent = sent.pages_sent
        report.fs_bytes_sent += fs_final.bytes_sent
        report.phases_ms["transfer.fs"] = fs_final.duration_ms
        report.phases_ms.update({f"transfer.{k}": v for k, v in sent.phases_ms.items()})
        report.criu_ms["transfer"] = report.phases_ms["transfer"]

        self._phase("restore", f"restoring on {self.dest_name}, held stopped")
        t_restore = time.monotonic()
        with report.timed("restore"):
            restored = self.dest.call(
                "Restore", pb.MigrationRef(migration_id=self.id), timeout=self.host.timeouts.restore + 30
            )
        report.take_criu_ms(restored.criu_ms, ("image_check", "restore", "forking", "runc_restore", "lazy_start", "lazy_held"))

        self._phase("commit", f"destroying the copy on {self.host.name}")
        with report.timed("commit"):
            self._commit()

        self._phase("resume", f"starting the copy on {self.dest_name}")
        with report.timed("resume"):
            self.dest.call("Resume", pb.MigrationRef(migration_id=self.id), timeout=60)
        final.frozen_ms = final.duration_ms = (time.time_ns() - frozen_at) / 1e6
        if method.lazy:
            self._await_pages()
        self.remove_source()
        stats = criu.read_stats(self.dir / "work", "dump")  # written once the dump has ended
        # CRIU's own "frozen" of a lazy dump runs until its last page left: not a pause of the container
        keys = ("freezing", "memdump", "memwrite") if method.lazy else ("freezing", "frozen", "memdump", "memwrite")
        report.take_criu_ms(stats, keys)
        final.pages_dumped = int(stats.get("pages_written", 0))
        report.add_final_round(final)
        self._costs()[0].record(
            self.dest_name, final.pages_dumped, (time.monotonic() - t_restore) * 1000
        )

    def _offline_phase(self, fs: FsSync) -> None:
        """Offline (phaul.migration.offline): sync while it runs, stop it, sync again, the
        destination creates it from its configuration and starts it (the commit: the
        source copy is stopped by then), then the source copy is destroyed. A copy stops
        nothing and destroys nothing."""
        assert self.dest_config is not None
        copy, running, report = bool(self.options.copy_as), self.start_dest, self.report
        if running:
            self._phase("fs-presync", "copying the root file system while the container runs")
            report.fs_bytes_sent += fs.sync(live=True).bytes_sent
        t_stop = time.monotonic()
        if running and not copy:
            self._phase("dump", f"stopping {self.ct_id} (SIGTERM, SIGKILL after {offline.STOP_TIMEOUT:g} s)")
            self.held.stopped = True
            with report.timed("stop"):
                self.host.containers.stop(self.ct_id, timeout=offline.STOP_TIMEOUT)
        self._phase("transfer", "final file system sync")
        with report.timed("transfer"):
            final = fs.sync(live=copy and running, bwlimit=0)
        report.fs_bytes_sent += final.bytes_sent
        name = self.dest_config.id
        self._phase("restore", f"creating {name} on {self.dest_name} from its configuration")
        with report.timed("restore"):
            self.dest.call("Restore", pb.MigrationRef(migration_id=self.id), timeout=self.host.timeouts.restore + 30)
        self._phase("resume", f"starting {name} on {self.dest_name}" if running else f"leaving {name} stopped there")
        self.cancel.commit_point()  # an abort asked before this rolls back; one asked after is refused
        self.held.starting = True
        with report.timed("resume"):
            self.dest.call("Resume", pb.MigrationRef(migration_id=self.id), timeout=120)
        self.held.committed = True
        pause = (time.monotonic() - t_stop) * 1000 if running and not copy else 0.0  # stop to running there
        report.add_final_round(Round(fs_bytes_sent=final.bytes_sent, frozen_ms=pause, duration_ms=pause))
        if not copy:
            self.remove_source()
            self._journal_step("source-destroyed")

    def _offline_choice(self, state: str) -> choice.Choice:
        """The `offline` method, and why (phaul.migration.offline)."""
        if self.options.copy_as:
            why = self.report.method_reason
        elif state != "running":
            why = f"{self.ct_id} is {state}: moved offline (its files; its command is not started on {self.dest_name})"
        else:
            why = "asked for: --offline (stop, sync, start: the command starts afresh on the destination)"
        self.report.method_reason = why
        return choice.Choice(choice.OFFLINE, why)

    def _choose_method(self) -> choice.Choice:
        """The memory method for the options and these hosts (phaul.memory.choice)."""
        pages, mib = self._memory_bytes // methods.PAGE, max(1.0, self._memory_bytes / MiB)

        def line(costs: policy.RestoreCosts) -> tuple[float, float]:  # (fixed ms, ms per MiB) at this size
            fixed = costs.estimate(self.dest_name, 0)
            return fixed, max(0.0, costs.estimate(self.dest_name, pages) - fixed) / mib

        (restore_fixed, restore_per), (dump_fixed, dump_per), (_, send_per) = map(line, self._costs())
        costs = self._cost_inputs = choice.CostInputs(
            memory_bytes=self._memory_bytes, dirty_rate=DIRTY_RATE_GUESS, dump_fixed_ms=dump_fixed,
            dump_ms_per_mib=dump_per, rate=MiB / (send_per / 1000) if send_per > 0 else 250e6,
            restore_fixed_ms=restore_fixed, restore_ms_per_mib=restore_per,
        )
        unavailable = {}
        if self.options.method in choice.LAZY or (self.options.method == "auto" and choice.AUTO_POSTCOPY):
            lazy_ok, lazy_why = lazy_link.available()  # may raise fs.pipe-max-size: only when post-copy may run
            if not lazy_ok:
                unavailable.update({m: f"{self.host.name}: {lazy_why}" for m in choice.LAZY})
        try:
            picked = choice.choose(self.options.method, features(), costs, self.options.max_downtime_ms, unavailable)
        except choice.MethodUnavailable as e:
            raise Conflict(str(e), "use --method precopy or stop-and-copy") from None
        self.report.method_reason = picked.reason
        return picked

    def _costs(self) -> tuple[policy.RestoreCosts, policy.RestoreCosts, policy.RestoreCosts]:
        """What this host measured per destination: restores, pre-copy rounds' freezes, transfers."""
        state = self.host.state_dir
        return (
            policy.RestoreCosts(state / RESTORE_COSTS), policy.dump_costs(state / DUMP_COSTS),
            policy.send_costs(state / SEND_COSTS),
        )

    def _memory_method(self) -> methods.MemoryMethod:
        """The memory method `preflight` chose, ready to run."""
        name = self._choice.method
        ct = self.host.containers
        ctx = methods.Context(
            ct=ct, ct_id=self.ct_id, dir=self.dir, sender=self._sender, apply_pages=self._apply_pages,
            dump_timeout=self.host.timeouts.dump,
            bandwidth=self.options.bandwidth, tcp_established=True, freezer=ct.freezer_state(self.ct_id),
            open_stream=self._open_page_stream, keep_basis=self._keep_basis,
        )
        return methods.METHODS[name](ctx)

    def _precopy(self, method: methods.MemoryMethod, fs: FsSync) -> None:
        """Pre-copy rounds until the convergence policy stops them."""
        # auto chose pre-copy for a shorter longest pause within stop-and-copy's sum: the rounds keep to it
        budget = choice.predict(choice.STOP_AND_COPY, self._cost_inputs).sum_ms if self.options.method == "auto" else 0.0
        rules = policy.ConvergencePolicy(
            max_downtime_ms=self.options.max_downtime_ms, max_rounds=self.options.max_rounds, pause_budget_ms=budget,
        )
        costs, dumps, sends = self._costs()

        def progress(fig: policy.RoundFigures, row: Round, d: policy.Decision) -> None:
            k = fig.round
            dumps.record(self.dest_name, fig.pages, fig.frozen_ms)
            if fig.bytes_sent >= MiB:
                sends.record(self.dest_name, fig.bytes_sent // methods.PAGE, fig.send_ms)
            rate = fig.bytes_sent / (fig.send_ms / 1000) if fig.send_ms > 0 else 0.0  # the memory transfer's own rate
            self.emit(pb.Progress(
                phase="precopy", round=k, bytes_sent=row.bytes_sent + row.fs_bytes_sent, rate=rate,
                dirty_rate=d.dirty_rate, predicted_frozen_ms=d.predicted_frozen_ms,
                message=f"round {k}: {row.pages_sent} of {row.pages_dumped} pages sent"
                + (f"; stopping: {d.reason}" if d.stop else ""),
            ))

        result = run_rounds(
            method, rules, fs, progress, lambda pages: costs.estimate(self.dest_name, pages),
            sequential_fs=self.options.bandwidth > 0,
        )
        self.report.rounds.extend(result.rounds)
        self.report.fs_bytes_sent += result.fs_bytes_sent
        self.report.stop_reason = result.stop_reason

    def _open_page_link(self) -> str:
        """Post-copy: the endpoint the destination fetches pages from (its certificate
        only, then the secret; phaul.memory.lazy_link.serve relays each connection to the
        page hub, which holds CRIU's page server on 127.0.0.1). Returns its ADDR:PORT on
        this agent's address."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.held.lazy_port = int(s.getsockname()[1])
        endpoint = self.held.page_link = TlsEndpoint(
            self.host.creds, self.host.address, self.dest_name,
            [sys.executable, "-m", "phaul.memory.lazy_link", "serve", self.dir / "page-link.secret", self.dir / PAGE_HUB],
            self.host.timeouts.link, self.dir / "page-link.sealed", self.dir,
        )
        endpoint.open(self.dir / "page-link.log")
        return self.host.advertised_port(endpoint.port)

    def close_page_link(self) -> None:
        """Post-copy: end the page link and its hub (which ends CRIU's page server). Idempotent."""
        if self.held.page_link is not None:
            self.held.page_link.close()
            self.held.page_link = None
        hub = self.held.page_hub
        if hub is not None:
            if hub.poll() is None:
                hub.kill()
            hub.wait()
            self.held.page_hub = None

    def _open_page_stream(self) -> PageStream:
        """A TLS stream to the destination's page receiver, ready before the freeze."""
        reply = self.dest.call("OpenPageStream", pb.MigrationRef(migration_id=self.id), timeout=30)
        at = self._dest.with_port(parse_endpoint(reply.address, "page stream address").port)
        env = {**os.environ, **rsh_env(self.host.creds, str(at), self.dest_name, self.host.timeouts.link)}
        stream = PageStream(env, self._secret)
        self.cancel.watch(stream.proc)  # an abort ends the final transfer
        return stream

    def _keep_basis(self) -> None:
        """Hybrid: the destination keeps the images it holds now, the last round's."""
        self.dest.call("KeepBasis", pb.MigrationRef(migration_id=self.id), timeout=30)

    def _apply_pages(self) -> float:
        """Ask the destination to apply the page delta just pushed; its ms."""
        reply = self.dest.call("ApplyPages", pb.ApplyPagesRequest(migration_id=self.id), timeout=self.host.timeouts.restore)
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
        gate = self.held.gate = criu.CommitGate(self.dir / "gate", self.host.timeouts.gate, freezer=ct.freezer_state(self.ct_id))
        lazy = self.held.lazy_port if self.held.method is not None and self.held.method.lazy else 0
        ct.set_criu_options(
            self.ct_id, gate.criu_options() + self._watch_freeze() + (lazy_link.SOURCE_CRIU_OPTIONS if lazy else "")
        )
        # Connections always travel; with --tcp=close the destination ends them cleanly (FIN) before it runs.
        # Post-copy leaves the tree running as far as CRIU is concerned (phaul's freezer holds it
        # still): a restore that fails can then still roll back, the network lock lifted by CRIU.
        args = ct.checkpoint_cmd(
            self.ct_id, images, work, tcp_established=True, parent_path=parent, lazy_port=lazy, leave_running=bool(lazy),
        )
        with open(work / "runc-checkpoint.log", "wb") as out:
            dump = self.held.dump = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        timeout = self.host.timeouts.dump
        try:
            if on_frozen is not None:
                deadline = time.monotonic() + timeout
                while not gate.frozen() and dump.poll() is None and time.monotonic() < deadline:
                    if (gate.dir / "reached").exists():
                        break
                    time.sleep(0.001)
                if gate.frozen():
                    on_frozen()
            gate.wait_reached(dump, timeout)
        except ToolFailed as e:
            failure = criu.explain_log(work / "dump.log")
            raise ToolFailed(
                f"{e.message}: {failure}\n{criu.log_tail(work / 'dump.log')}", f"{failure.fix}; CRIU's log: {work / 'dump.log'}"
            ) from None
        return Round()

    def _commit(self) -> None:
        """Let CRIU kill the frozen source copy; return once none of its processes
        can run again and its address is off this host's bridge. The rest of its
        removal (`remove_source`) waits until the destination's copy runs."""
        gate, dump = self.held.gate, self.held.dump
        assert gate is not None and dump is not None
        self.cancel.commit_point()  # an abort asked before this rolls back; one asked after is refused
        if self.held.method is not None and self.held.method.lazy:
            # Post-copy: the destination holds its copy and every task's userfaultfd; the
            # frozen source tree (serving pages) never runs again. _await_pages ends it.
            self.held.committed = True
            if self.host.containers.config(self.ct_id).ip:
                network.unplug(self.ct_id)
            self._journal_step("source-destroyed")
            return
        if not gate.release(commit=True):
            raise ToolFailed("the dumped container was not waiting at the commit gate (its CRIU or the gate ended)")
        # The gate script acknowledges what it read; only then is the commit certain
        # (whether runc and CRIU are still alive or not).
        wait_until(lambda: gate.verdict() is not None or not gate.waiting(), 10.0, 0.002)
        if gate.verdict() is None:
            dump.wait(timeout=60)
        if gate.verdict() != "commit":  # the gate gave up waiting and resumed the source copy
            raise ToolFailed("the commit gate ended without the commit (it timed out); the source copy runs again")
        self.held.committed = True
        # CRIU kills the dumped processes (never a graceful stop: their life goes on
        # on the destination); runc's own clean-up after that need not be waited for.
        if not wait_until(lambda: self._source_dead() or dump.poll() is not None, 10.0, 0.002):
            dump.wait(timeout=60)
        if not wait_until(self._source_dead, 0.05, 0.002):  # its CRIU died before it killed them
            self.log.warning("CRIU ended without killing the source copy; killing it")
            self.host.containers.kill(self.ct_id)
            if not wait_until(self._source_dead, 10.0, 0.002):
                raise ToolFailed(
                    f"the source copy of {self.ct_id} did not die after the commit",
                    f"kill it: `phaul --host {self.host.name} ct destroy {self.ct_id}`, then `phaul recover {self.id}`",
                )
        if self.host.containers.config(self.ct_id).ip:
            network.unplug(self.ct_id)  # before the destination plugs the same address in
        self._journal_step("source-destroyed")

    def _start_page_server(self) -> None:
        """Post-copy, the dump complete: let CRIU go on to serve the pages. It lifts its
        network lock then, so an addressed container's port on the segment goes down first
        (nothing reaches or leaves the frozen tree); phaul's freezer keeps the tree still."""
        if self.host.containers.config(self.ct_id).ip:
            network.isolate(self.ct_id)
        gate = self.held.gate
        assert gate is not None
        method = self.held.method
        basis = ["--basis", str(method.page_basis)] if method is not None and method.page_basis is not None else []
        with open(self.dir / "page-hub.log", "ab") as out:  # its own session: it outlives this agent
            self.held.page_hub = subprocess.Popen(
                [sys.executable, "-m", "phaul.memory.lazy_link", "hub", str(self.dir / PAGE_HUB),
                 str(self.held.lazy_port), "--linger", str(self.host.timeouts.link * 5), *basis],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )
        if not gate.release(commit=True):
            raise ToolFailed("the dumped container was not waiting at the commit gate (its CRIU or the gate ended)")

    def end_lazy_dump(self) -> None:
        """Post-copy, before the commit: make CRIU give up serving pages and put the source
        back on its segment; the caller thaws the tree (failure rules). Idempotent."""
        self.close_page_link()  # ends the hub's connection: CRIU's transfer fails
        dump = self.held.dump
        if dump is not None and dump.poll() is None:
            with contextlib.suppress(OSError):  # nobody connected yet: CRIU waits in accept()
                socket.create_connection(("127.0.0.1", self.held.lazy_port), timeout=1).close()
            try:
                dump.wait(timeout=10)
            except subprocess.TimeoutExpired:
                dump.kill()  # its network lock is lifted already; the freezer holds the tree
                dump.wait()
        if self.host.containers.config(self.ct_id).ip:
            network.rejoin(self.ct_id)

    def _await_pages(self) -> None:
        """Post-copy, the destination running: wait until CRIU has served the last page
        (its dump ends), then ask the destination whether every page arrived. Raises
        ToolFailed when the container was lost (`Held.lost`)."""
        dump = self.held.dump
        assert dump is not None
        t0 = time.monotonic()
        self._phase("postcopy", f"{self.ct_id} runs on {self.dest_name}; its memory follows")
        limit = max(self.host.timeouts.dump, self._memory_bytes / POSTCOPY_MIN_RATE)
        try:
            rc = dump.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.log.error("post-copy did not end within %.0f s: ending the source's page server", limit)
            dump.kill()
            rc = dump.wait()
        self.report.postcopy_ms = (time.monotonic() - t0) * 1000
        self.close_page_link()
        self.host.containers.kill(self.ct_id)  # the frozen tree: it dies before it could run
        try:
            self.report.postcopy_bytes = self.finish_postcopy()
        except PhaulError as e:
            why = "" if rc == 0 else f" (the source's page server ended with {rc}; see {self.dir / 'work' / 'dump.log'})"
            raise ToolFailed(f"post-copy failed: {e.message}{why}", e.hint) from None

    def finish_postcopy(self, patient: bool = True) -> int:
        """Post-copy, the source's page server gone: ask the destination, `patient`ly until
        its keeper has ended (a broken link may still be dialled again meanwhile, for twice
        --link-timeout). Returns the bytes that came after the resume. Raises PhaulError
        when the destination could not say, with `Held.lost` set when it lost the copy."""
        link = self.host.timeouts.link
        # the link's TCP give-up, the re-dial, the keeper's own end
        deadline = time.monotonic() + (link * 6 + 30 if patient else 0)
        while True:
            try:
                finished = self.dest.call("Finish", pb.MigrationRef(migration_id=self.id), timeout=link * 2 + 30)
                return int(finished.postcopy_bytes)
            except PhaulError as e:
                self.held.lost = LOST_MARK in e.message  # else the destination could not say (yet)
                if self.held.lost or ARRIVING_MARK not in e.message or time.monotonic() > deadline:
                    raise

    @property
    def step(self) -> str:
        """The step it has reached (the last journaled)."""
        return self._journaled or "preflight"

    def abort(self, by: str) -> None:
        """Ask the migration to abort (`by`: who asks): before the commit it rolls back
        (`run`'s report says so); after it, raises Conflict saying why it cannot."""
        where = "runs" if self._journaled in ("resume", "postcopy", "cleanup") else "is starting"
        self.cancel.request(
            by, f"migration {self.id} is already committed: {self.ct_id} {where} on {self.dest_name}",
            lambda: self.journal.record(self.id, "source", "abort-requested", by=by),
        )
        self.log.warning("abort asked by %s", by)

    def _source_dead(self) -> bool:
        """True once no process of the source copy can run again (all gone or
        zombies); without a freezer cgroup to look into, once its dump has ended."""
        state = self.held.method.ctx.freezer if self.held.method is not None else None
        if state is None:
            return self.held.dump is None or self.held.dump.poll() is not None
        return not any(procfs.alive(p) for p in freezer.pids(state))

    def remove_source(self) -> None:
        """Remove what is left of the killed source copy (runc state, cgroups, files). Idempotent."""
        if self.held.dump is not None:
            rc = self.held.dump.wait(timeout=60)
            if rc != 0:
                self.log.warning("runc checkpoint ended with %d after commit", rc)
        if self.options.copy_as or not self.host.containers.container_dir(self.ct_id).exists():
            return  # a copy's source is never removed
        try:
            self.host.containers.destroy(self.ct_id, timeout=0)
        except PhaulError as e:
            self.log.error("removing the killed source copy of %s: %s", self.ct_id, e)
            self.report.error += (
                f"; the source copy's remains are left on {self.host.name}: {e.message} (`phaul ct destroy {self.ct_id}`)"
            )

    # -- the container's address (phaul.linux.network) -----------------------------------

    def _watch_freeze(self) -> str:
        """For an addressed container: CRIU options that signal the start of the
        final dump, and a watcher that then asks the destination to hold the
        container's traffic. "" for a container without an address."""
        if self.host.containers.config(self.ct_id).ip is None:
            return ""
        dest = self.dest
        freeze = self.held.freeze = network.FreezeSignal(self.dir / "net")
        freeze.start(lambda: dest.call("HoldTraffic", pb.MigrationRef(migration_id=self.id), timeout=10))
        return freeze.criu_options()

    def stop_network_watch(self) -> None:
        if self.held.freeze is not None:
            self.held.freeze.stop()

    # -- helpers ------------------------------------------------------------------

    def _phase(self, phase: str, message: str, bytes_sent: int = 0) -> None:
        # A step boundary: an abort asked before it (or while the step's hook held it) rolls
        # back from here; one asked during preflight at the first step after it, so that it
        # rolls back like any other (preflight's own failures are refusals).
        boundary = phase != "preflight"
        if boundary:
            self.cancel.check()
        self.log.info("%s: %s", phase, message)
        self._journal_step(phase)
        self._hook(phase)
        if boundary:
            self.cancel.check()
        self.emit(pb.Progress(phase=phase, message=message, bytes_sent=bytes_sent))

    def _round_boundaries(self, emit: Emit) -> Emit:
        """Progress passes through; the end of pre-copy round k is the boundary of
        step "precopy-K" (K = k + 1): journaled, and the host's hook is called there."""

        def wrapped(p: pb.Progress) -> None:
            emit(p)
            if p.phase == "precopy" and p.round > 0:
                step = precopy_round(p.round)
                self._journal_step(step)
                self._hook(step)
                self.cancel.check()

        return wrapped

    def _hook(self, step: str) -> None:
        """The host's step hook (phaul.migration.steps), as `step` begins."""
        self.host.hook.at(step, StepPoint(self.id, "source", self.host.state_dir))

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
            self.log.error("cannot journal the result %s: %s", self.report.result, e)

    def _clear_criu_config(self) -> None:
        try:
            if self.host.containers.container_dir(self.ct_id).exists():
                self.host.containers.set_criu_options(self.ct_id)
        except (OSError, PhaulError):
            pass


def _mtime_ns(path: Path, default: int) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return default
