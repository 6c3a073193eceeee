"""`phaul agent`: serves the agent protocol over mutual TLS only.

Every request is checked before anything is touched:
- the caller's certificate must come from the CA and name an admin (container
  and migration management: the CLI) or a peer host (the destination-side and
  settling methods, and only for migrations that peer takes part in), as the
  agent's `--admins` and `--peers` lists say;
- every field is bounded (string lengths, list sizes, no NUL), IDs and names
  are checked by charset and length, and every path built from them must stay
  inside the state directory with no symbolic link on the way;
- messages are limited in size, calls between agents carry deadlines, idle
  or dead connections are detected by keepalives, and the number of
  concurrent calls and migrations is bounded.
No shell command is ever built from received data.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from functools import wraps
from typing import Any, TypeVar

import grpc

from phaul import __version__
from phaul.agent import peers as peers_mod
from phaul.agent.budget import Budget, CallBudgets
from phaul.agent.config import restart_needed
from phaul.agent.host import Host, check_access
from phaul.agent.notify import Notifier
from phaul.agent.running import RunningMigrations
from phaul.agent.signals import Signal, Signals
from phaul.channels import messages
from phaul.channels.client import KEEPALIVE_MS, MAX_MESSAGE, connect, status_code
from phaul.channels.revocation import RevocationList
from phaul.config import AgentConfig, MigrationOptions
from phaul.containers import ContainerConfig, workloads
from phaul.containers.debian import RootfsCache
from phaul.containers.runc import RuncContainers, _check_config
from phaul.endpoint import agent_endpoints, parse_endpoint
from phaul.errors import Busy, Conflict, InvalidInput, NotFound, PhaulError, Refused
from phaul.linux import procfs, pycriu_module
from phaul.linux.doctor import criu_path, criu_version
from phaul.memory import choice
from phaul.migration import preflight
from phaul.migration.dest import Destination
from phaul.migration.journal import JournalEntry
from phaul.migration.recovery import Active, Recovery
from phaul.migration.source import SourceMigration, source_costs
from phaul.migration.steps import NO_HOOK, StepHook
from phaul.rpc import phaul_pb2 as pb
from phaul.rpc import phaul_pb2_grpc as pb_grpc
from phaul.standby import failover
from phaul.standby.schedule import ACTIVE, Standbys
from phaul.standby.store import StandbyStore
from phaul.validate import check_args, check_id, check_message, confined

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
F = TypeVar("F", bound=Callable[..., Any])

# Who may call what. Methods called by another agent during a migration (a new
# agent-to-agent method must be named here, or peers are refused it):
PEER_METHODS = frozenset({
    "Prepare", "HoldTraffic", "ApplyPages", "KeepBasis", "OpenPageStream", "Restore", "Resume", "Abort", "Finish",
    "MigrationStatus", "MigrationDecision", "PeerCheck",
    "KeepStandby", "DropStandby", "FenceStandby",
})
ANY_METHODS = frozenset({"Info", "StandbyList"})  # admins and peers (a peer sees only what concerns it)
# Every other method (containers, Migrate, ListMigrations, Recover, Check, AbortMigration,
# FollowMigration) is for admins only.

MAX_REQUEST = 1 << 20  # bytes: the largest request an agent accepts
EXEC_TIMEOUT_MAX = 600.0  # s
DEFAULT_INTERVAL_S = 30.0  # s: a standby's refresh interval when none is given


def host_error(e: OSError) -> str:
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def check_config(config: ContainerConfig) -> ContainerConfig:
    """A container configuration from the wire, validated (a copy)."""
    config = dataclasses.replace(config, args=list(config.args))
    _check_config(config)
    return config


def _allowed(host: Host, method: str, caller: str) -> bool:
    if method in PEER_METHODS:
        return caller in host.peers
    if method in ANY_METHODS:
        return caller in host.peers or caller in host.admins
    return caller in host.admins


def _authorize(host: Host, method: str, context: grpc.ServicerContext) -> str:
    """The caller's certificate name, if it may call `method` and its certificate is not
    revoked; else the call is aborted. (The data channels need the per-migration secret
    only a gRPC caller receives, so this check covers them too.)"""
    caller = _peer_name(context)
    if host.revocations is not None:
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        serial = host.revocations.revoked(pem) if pem else None
        if serial is not None or not pem:
            log.warning("refused %s from %r: certificate %s", method, caller, f"{serial:X} is revoked" if pem else "missing")
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate of {caller or 'this client'} ({serial:X}) is revoked on {host.name}"
                if pem else f"{host.name} got no client certificate",
            )
    if not _allowed(host, method, caller):
        log.warning("refused %s from %r", method, caller)
        role = "a peer host (--peers)" if method in PEER_METHODS else "an admin (--admins)"
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{caller or 'this client'} may not call {method} on {host.name}: only {role} may",
        )
    return caller


def _caller_class(host: Host, method: str, caller: str) -> str:
    """Whose budget (agent.budget) a call counts against."""
    if method in PEER_METHODS or (method in ANY_METHODS and caller not in host.admins):
        return "peer"
    return "admin"


def _peer_name(context: grpc.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else ""


def _rpc(fn: F) -> F:
    """Check the caller against the allow list and turn PhaulErrors into statuses."""

    @wraps(fn)
    def wrapper(self: Servicer, request: Any, context: grpc.ServicerContext) -> Any:
        peer = _authorize(self.host, fn.__name__, context)
        try:
            with self.budgets.call(_caller_class(self.host, fn.__name__, peer), peer):
                check_message(request)
                return fn(self, request, context)
        except PhaulError as e:
            log.info("%s from %s: %s", fn.__name__, peer, e.message)
            context.abort(status_code(e), str(e))
        except OSError as e:  # e.g. the state directory is full: say so, not "internal error"
            log.warning("%s from %s: %s", fn.__name__, peer, e)
            hint = "free space in the agent's state directory" if e.errno == errno.ENOSPC else "see the agent's log"
            context.abort(grpc.StatusCode.ABORTED, f"{host_error(e)}\n  hint: {hint}")
        except Exception as e:
            log.exception("%s from %s failed", fn.__name__, peer)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in the agent: {e}")

    return wrapper  # type: ignore[return-value]


class Servicer(pb_grpc.AgentServicer):
    """The agent protocol on one host."""

    def __init__(self, host: Host, config: AgentConfig) -> None:
        self.host = host
        self.config = config  # what the agent started with (SetPeers changes peers and revoked from it)
        self.max_migrations = config.max_migrations
        self.dest = Destination(host)
        self.journal = host.journal
        self.active = Active()
        self.running = RunningMigrations()  # the source migrations under way: abort, follow
        self.recovery = Recovery(host, self.journal, self.dest, self.active)
        self.standbys = Standbys(host)  # the standby copies of this host's containers (phaul.standby)
        self.standby_store = StandbyStore(host.state_dir, host.name)  # the checkpoints kept here for peers
        self._migrations = threading.BoundedSemaphore(self.max_migrations)
        limits = host.limits
        self.budgets = CallBudgets({
            "peer": Budget(limits.peer_calls, limits.peer_calls_each),
            "admin": Budget(limits.admin_calls, limits.admin_calls),
        })

    def _ct(self, ct_id: str) -> str:
        """A container ID from the wire whose directory stays inside the state directory."""
        check_id(ct_id)
        confined(self.host.containers.container_dir(ct_id), self.host.state_dir)
        return ct_id

    def _from_source(self, migration_id: str, caller: str) -> bool:
        """Destination-side calls name a migration this host receives, and come from
        its own source only (the peer the journal records). False: this host does not
        know the migration (the method says so, or does nothing)."""
        check_id(migration_id, "migration ID")
        confined(self.host.incoming_dir(migration_id), self.host.state_dir)
        m = self.dest.lookup(migration_id)
        source = m.source if m is not None else None
        if source is None:
            try:
                source = self.journal.get(migration_id, "destination").peer
            except NotFound:
                return False
        if caller != source:
            raise Refused(f"migration {migration_id} comes from {source}, not from {caller}")
        return True

    def _incoming(self, migration_id: str, caller: str) -> str:
        """`_from_source`, for methods that need the migration: NotFound when unknown."""
        if not self._from_source(migration_id, caller):
            raise NotFound(f"no migration {migration_id} on {self.host.name}", "the destination agent may have restarted")
        return migration_id

    @_rpc
    def Info(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.HostInfo:
        v = criu_version(criu_path() or "")
        committed = [c.memory_limit or c.memory_used or 0 for c in self.host.containers.list()]
        return pb.HostInfo(
            protocol_version=PROTOCOL_VERSION, name=self.host.name, phaul_version=__version__,
            criu_version=".".join(map(str, v)) if v else "", address=self.host.advertised,
            bridge=self.host.bridge or "",
            memory_available=procfs.mem_available() or 0, memory_committed=sum(committed), containers=len(committed),
        )

    # -- containers -------------------------------------------------------------

    @_rpc
    def CreateContainer(self, request: pb.ContainerConfig, context: grpc.ServicerContext) -> pb.ContainerInfo:
        self._ct(request.id)
        return messages.info_to_proto(self.host.containers.create(messages.config_from_proto(request)))

    @_rpc
    def StartContainer(self, request: pb.StartRequest, context: grpc.ServicerContext) -> pb.ContainerInfo:
        args = check_args(list(request.args)) if request.args else None
        stale = self.standbys.stale(self._ct(request.id))
        if stale is not None:
            raise Conflict(
                f"{request.id} failed over to {stale.host}: the copy on {self.host.name} is stale and stays stopped",
                f"destroy it (`phaul --host {self.host.name} ct destroy {request.id}`), then protect the running copy "
                f"from here: `phaul --host {stale.host} standby {request.id} {self.host.name}`",
            )
        info = self.host.containers.start(self._ct(request.id), args)
        return messages.info_to_proto(info)

    @_rpc
    def ExecContainer(self, request: pb.ExecRequest, context: grpc.ServicerContext) -> pb.ExecReply:
        args = check_args(list(request.args))
        if request.timeout < 0:
            raise InvalidInput(f"invalid timeout {request.timeout!r}", "give a number of seconds")
        timeout = min(request.timeout or 60.0, EXEC_TIMEOUT_MAX)
        r = self.host.containers.exec(self._ct(request.id), args, timeout)
        return pb.ExecReply(returncode=r.returncode, stdout=r.stdout[-MAX_MESSAGE // 4 :], stderr=r.stderr[-MAX_MESSAGE // 4 :])

    @_rpc
    def ListContainers(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.ContainerList:
        return pb.ContainerList(containers=[messages.info_to_proto(i) for i in self.host.containers.list()])

    @_rpc
    def StopContainer(self, request: pb.ContainerRef, context: grpc.ServicerContext) -> pb.ContainerInfo:
        return messages.info_to_proto(self.host.containers.stop(self._ct(request.id)))

    @_rpc
    def DestroyContainer(self, request: pb.ContainerRef, context: grpc.ServicerContext) -> pb.Empty:
        self.host.containers.destroy(self._ct(request.id))
        return pb.Empty()

    @_rpc
    def ContainerLogs(self, request: pb.LogsRequest, context: grpc.ServicerContext) -> pb.LogsReply:
        ct_id = self._ct(request.id)
        containers = self.host.containers
        if request.follow:
            chunk = containers.logs_since(ct_id, request.file_id, request.offset)
            data, file_id, offset = chunk.data, chunk.file_id, chunk.offset
        else:
            data, file_id, offset = containers.logs(ct_id, request.tail)[-MAX_MESSAGE // 2 :], 0, 0
        state = containers.info(ct_id).state
        return pb.LogsReply(data=data, file_id=file_id, offset=offset, state=state)

    # -- migration, source side --------------------------------------------------

    def Migrate(self, request: pb.MigrateRequest, context: grpc.ServicerContext) -> Iterator[pb.MigrateEvent]:
        """Runs the migration in its own thread, so that a client going away
        never interrupts it half-way; streams progress, then the report."""
        _authorize(self.host, "Migrate", context)
        events: queue.Queue[pb.MigrateEvent] = queue.Queue()
        migration: SourceMigration | None = None
        slot = False
        try:
            check_message(request)
            check_id(request.dest_name, "destination host name")
            if request.dest_name not in self.host.peers:
                raise Refused(
                    f"{self.host.name} does not migrate to {request.dest_name}",
                    f"add {request.dest_name} to the agent's --peers list",
                )
            if request.max_rounds > 1000 or request.max_downtime_ms > 3_600_000:
                raise InvalidInput("max_rounds or max_downtime_ms is out of range")
            slot = self._migrations.acquire(blocking=False)
            if not slot:
                raise Busy(f"{self.host.name} already runs {self.max_migrations} migrations", "try again when one has ended")
            defaults = MigrationOptions()
            options = MigrationOptions(
                tcp="close" if request.tcp_close else "keep",
                method=choice.ALIASES.get(request.method, request.method) or defaults.method,
                max_rounds=request.max_rounds or defaults.max_rounds,
                max_downtime_ms=request.max_downtime_ms or defaults.max_downtime_ms,
                bandwidth=request.bandwidth,
                force=preflight.check_force(list(request.force)),
                offline=request.offline, copy_as=check_id(request.copy_as, "copy ID (--as)") if request.copy_as else "",
                copy_ip=request.copy_ip,
            )
            if request.copy_ip and not request.copy_as:
                raise InvalidInput("an address (--ip) is for a copy only", "give the copy's ID with --as, or leave out --ip")
            if options.method not in choice.REQUESTS:
                raise InvalidInput(f"unknown memory method {options.method!r}", f"use one of {', '.join(choice.REQUESTS)}")
            protected = self.standbys.get(check_id(request.ct_id))
            if protected is not None and protected.state == ACTIVE:
                raise Conflict(
                    f"{request.ct_id} has a standby on {protected.host}: moving it would leave that standby stale",
                    f"stop it first (`phaul --host {self.host.name} standby stop {request.ct_id}`), migrate, "
                    f"then start a standby from the new host",
                )
            migration = SourceMigration(
                self.host, request.ct_id, request.dest_name, request.dest_address, options,
                lambda p: self._progress(events, migration, p),
            )
            self.active.add(migration.id)
            self.running.add(migration)
            migration.preflight()
        except PhaulError as e:
            if migration is not None:
                self.active.discard(migration.id)
                self.running.end(migration.id, pb.Report(migration_id=migration.id, result="refused", error=str(e)))
            if slot:
                self._migrations.release()
            context.abort(status_code(e), str(e))
        except Exception as e:
            if migration is not None:
                self.active.discard(migration.id)
                self.running.end(migration.id, pb.Report(migration_id=migration.id, result="refused", error=str(e)))
            if slot:
                self._migrations.release()
            log.exception("Migrate failed before it began")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in the agent: {e}")
        assert migration is not None
        running = migration

        def run() -> None:
            try:
                report = messages.report_to_proto(running.run())
                events.put(pb.MigrateEvent(report=report))
                self.running.end(running.id, report)
            finally:
                self.active.discard(running.id)
                self._migrations.release()

        # The ID goes first, before preflight's progress (sent only now: a refused preflight sends no event,
        # so the client knows nothing started). Nothing else puts events until the thread below starts.
        early = [events.get_nowait() for _ in range(events.qsize())]
        for event in (pb.MigrateEvent(started=pb.Started(migration_id=running.id)), *early):
            events.put(event)
        threading.Thread(target=run, name=f"migrate-{running.id}", daemon=True).start()
        while True:
            event = events.get()
            yield event
            if event.HasField("report"):
                return

    def _progress(self, events: queue.Queue[pb.MigrateEvent], migration: SourceMigration | None, p: pb.Progress) -> None:
        """A progress event: to Migrate's stream and to the migration's watchers."""
        events.put(pb.MigrateEvent(progress=p))
        if migration is not None:
            self.running.publish(migration.id, p)

    # -- control of running migrations ---------------------------------------------

    @_rpc
    def AbortMigration(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        """Abort a running migration (by ID, or the container's) before its commit; refused after."""
        via = "Ctrl-C on `phaul migrate`" if request.ct and not request.migration_id else "`phaul abort`"
        if request.migration_id:
            m = self.running.get(check_id(request.migration_id, "migration ID"))
            if m is None:
                raise self._not_running(request.migration_id)
        else:
            m = self.running.of_ct(self._ct(request.ct))
            if m is None:
                raise NotFound(f"no migration of {request.ct} runs on {self.host.name}",
                               f"see `phaul --host {self.host.name} migrations`")
        step = m.step
        m.abort(f"{_peer_name(context)} ({via})")
        return pb.AbortReply(migration_id=m.id, ct=m.ct_id, destination=m.dest_name, step=step)

    def _not_running(self, migration_id: str) -> PhaulError:
        """Why migration `migration_id`, not running here, cannot be aborted or followed live."""
        host = self.host.name
        try:
            e = self.journal.get(migration_id)
        except NotFound:
            return NotFound(f"no migration {migration_id} on {host}",
                            f"check the ID with `phaul --host {host} migrations` (or ask its source host with --host)")
        if e.role == "destination":
            return Conflict(f"{host} is the destination of migration {migration_id}; its source {e.peer} runs it",
                           f"phaul --host {e.peer} abort {migration_id}")
        if not e.settled:
            return Conflict(f"migration {migration_id} is in doubt on {host} (not running)",
                            f"settle it: `phaul --host {host} recover {migration_id}`")
        return Conflict(f"migration {migration_id} already ended on {host}: {e.result}"
                        + (f" ({e.error})" if e.error else ""), "nothing to abort")

    def FollowMigration(self, request: pb.FollowRequest, context: grpc.ServicerContext) -> Iterator[pb.FollowEvent]:
        """Progress of a running migration until its report; one ended shows how it ended."""
        _authorize(self.host, "FollowMigration", context)
        try:
            check_message(request)
            if request.migration_id:
                mid = check_id(request.migration_id, "migration ID")
            else:
                newest = self.running.newest()
                if newest is None:
                    raise NotFound(f"no migration runs on {self.host.name}",
                                   f"name one: `phaul --host {self.host.name} migrations --follow ID`")
                mid = newest.id
            events = self.running.watch(mid, context.is_active)
            if events is None:  # it ended (or never ran here): how it ended, from the journal
                e = self.journal.get(mid)
                if e.role != "source":
                    raise self._not_running(mid)
                events = iter([_ended(e, self.host.name)])
        except PhaulError as e:
            context.abort(status_code(e), str(e))
            return
        yield from events

    # -- migration, destination side ----------------------------------------------

    @_rpc
    def Prepare(self, request: pb.PrepareRequest, context: grpc.ServicerContext) -> pb.PrepareReply:
        peer = _peer_name(context)
        if peer != request.source_name:
            raise Refused(f"the caller's certificate names {peer!r}, not the source {request.source_name!r}")
        check_id(request.migration_id, "migration ID")
        confined(self.host.incoming_dir(request.migration_id), self.host.state_dir)
        if request.source_address:
            parse_endpoint(request.source_address, "source address")
        config = check_config(messages.config_from_proto(request.config))
        self._ct(config.id)
        if not request.need_bytes:
            raise InvalidInput("the source declared no size for the migration", "upgrade phaul on the source host")
        if request.criu_version and not re.fullmatch(r"\d{1,4}(\.\d{1,4}){0,3}", request.criu_version):
            raise InvalidInput(f"invalid CRIU version {request.criu_version[:40]!r}")
        if request.standby:
            if not request.source_address:
                raise InvalidInput("a standby refresh names no source address", "upgrade phaul on the source host")
            self.standby_store.check_refresh(config.id, peer)
        address, secret = self.dest.prepare(
            request.migration_id, request.source_name, config, request.criu_version, request.need_bytes,
            tcp_close=request.tcp_close, source_address=request.source_address, page_link=request.page_link,
            offline=request.offline, start=request.start, standby=request.standby,
        )
        m = self.dest.lookup(request.migration_id)
        base = ""
        if request.standby and m is not None:
            base = self.standby_store.seed(config.id, m.ct_dir, m.images_dir, request.standby_base)
        v = criu_version(criu_path() or "")
        return pb.PrepareReply(
            data_address=address, criu_version=".".join(map(str, v or ())), secret=secret, standby_base=base,
        )

    @_rpc
    def HoldTraffic(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.Empty:
        self._incoming(request.migration_id, _peer_name(context))
        self.dest.hold_traffic(request.migration_id)
        return pb.Empty()

    @_rpc
    def OpenPageStream(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.PageStreamReply:
        self._incoming(request.migration_id, _peer_name(context))
        return pb.PageStreamReply(address=self.dest.open_page_stream(request.migration_id))

    @_rpc
    def ApplyPages(self, request: pb.ApplyPagesRequest, context: grpc.ServicerContext) -> pb.ApplyPagesReply:
        self._incoming(request.migration_id, _peer_name(context))
        stats = self.dest.apply_pages(request.migration_id)
        return pb.ApplyPagesReply(pages_written=stats.pages_written, apply_ms=stats.ms)

    @_rpc
    def KeepBasis(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.Empty:
        self._incoming(request.migration_id, _peer_name(context))
        self.dest.keep_basis(request.migration_id)
        return pb.Empty()

    @_rpc
    def Restore(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.RestoreReply:
        self._incoming(request.migration_id, _peer_name(context))
        stats = self.dest.restore(request.migration_id)
        return pb.RestoreReply(criu_ms=stats, restore_ms=stats.get("runc_restore", 0.0))

    @_rpc
    def Resume(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.Empty:
        self._incoming(request.migration_id, _peer_name(context))
        self.dest.resume(request.migration_id)
        return pb.Empty()

    @_rpc
    def Abort(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.Empty:
        if self._from_source(request.migration_id, _peer_name(context)):  # an unknown ID: nothing of it is here
            self.dest.abort(request.migration_id)
        return pb.Empty()

    @_rpc
    def Finish(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.FinishReply:
        self._incoming(request.migration_id, _peer_name(context))
        return pb.FinishReply(postcopy_bytes=self.dest.finish(request.migration_id))

    # -- standby copies and failover (phaul.standby) -----------------------------------------

    @_rpc
    def Standby(self, request: pb.StandbyRequest, context: grpc.ServicerContext) -> pb.StandbyInfo:
        check_message(request)
        interval = request.interval_s or DEFAULT_INTERVAL_S
        s = self.standbys.start(self._ct(request.ct_id), request.host, request.host_address, interval,
                                request.max_lag_s or 3 * interval)
        return s.to_proto(self.host.name)

    @_rpc
    def StandbyStop(self, request: pb.ContainerRef, context: grpc.ServicerContext) -> pb.Empty:
        self.standbys.stop(self._ct(request.id))
        return pb.Empty()

    @_rpc
    def StandbyList(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.StandbyListReply:
        caller = _peer_name(context)
        infos = [s.to_proto(self.host.name) for s in self.standbys.list()] if caller in self.host.admins else []
        for kept, tomb in self.standby_store.list():
            primary = kept.source if kept is not None else str((tomb or {}).get("from", ""))
            if caller not in self.host.admins and caller != primary:
                continue  # a peer sees only its own containers' standbys
            infos.append(pb.StandbyInfo(
                ct=kept.ct if kept is not None else str((tomb or {}).get("ct", "")), role="standby", primary=primary,
                standby=self.host.name, checkpoint_at=kept.checkpoint_at if kept is not None else 0.0,
                state="failed-over" if tomb is not None else "active",
            ))
        return pb.StandbyListReply(standbys=infos)

    @_rpc
    def KeepStandby(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.KeepStandbyReply:
        self._incoming(request.migration_id, _peer_name(context))
        m = self.dest.keep(request.migration_id)
        self.journal.path(request.migration_id, "destination").unlink(missing_ok=True)  # settled: one per refresh
        try:
            taken = (m.images_dir / "inventory.img").stat().st_mtime
        except OSError:
            taken = time.time()
        return pb.KeepStandbyReply(checkpoint_at=self.standby_store.keep(m, taken).checkpoint_at)

    @_rpc
    def DropStandby(self, request: pb.ContainerRef, context: grpc.ServicerContext) -> pb.Empty:
        self.standby_store.drop(self._ct(request.id), _peer_name(context))
        return pb.Empty()

    @_rpc
    def FenceStandby(self, request: pb.ContainerRef, context: grpc.ServicerContext) -> pb.FenceReply:
        return pb.FenceReply(running=self.standbys.fence(self._ct(request.id), _peer_name(context)))

    @_rpc
    def Failover(self, request: pb.FailoverRequest, context: grpc.ServicerContext) -> pb.FailoverReply:
        done = failover.failover(self.host, self.dest, self.standby_store, self._ct(request.ct_id), request.fenced)
        return pb.FailoverReply(ct=done.ct, primary=done.primary, checkpoint_at=done.checkpoint_at,
                                restore_ms=done.restore_ms, fence=done.fence)

    # -- settling migrations (phaul.migration.recovery) -----------------------------------------

    @_rpc
    def MigrationStatus(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.MigrationState:
        """Asked by a migration's source: what this host holds of it."""
        self._from_source(request.migration_id, _peer_name(context))
        return pb.MigrationState(state=self.recovery.dest_state(request.migration_id))

    @_rpc
    def MigrationDecision(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.Decision:
        """Asked by a migration's destination: run its copy, remove it, or wait."""
        mid = check_id(request.migration_id, "migration ID")
        try:
            dest = self.journal.get(mid, "source").peer
        except NotFound:
            dest = None
        if dest is not None and dest != _peer_name(context):
            raise Refused(f"migration {mid} goes to {dest}, not to {_peer_name(context)}")
        decision, message = self.recovery.decision(mid)
        return pb.Decision(decision=decision, message=message)

    # -- preflight (phaul.migration.preflight) ------------------------------------------------------

    @_rpc
    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckReply:
        """`phaul check`: every preflight check of moving ct_id to dest_name, without moving it."""
        ct_id = self._ct(request.ct_id)
        check_id(request.dest_name, "destination host name")
        if request.dest_name not in self.host.peers:
            raise Refused(f"{self.host.name} does not migrate to {request.dest_name}", "add it to the agent's --peers list")
        parse_endpoint(request.dest_address, "destination address")
        try:  # a container that is not running moves offline, as `phaul migrate` would move it
            cold = self.host.containers.info(ct_id).state not in ("running", "paused")
        except NotFound:
            cold = False  # preflight says so
        with connect(request.dest_address, request.dest_name, self.host.creds) as dest:
            results, needs = preflight.run(self.host, ct_id, dest, request.dest_name,
                                           self.host.containers.config(ct_id) if cold else None)
        transfer_ms, restore_ms = source_costs(self.host.state_dir, request.dest_name, needs.memory if needs else 0)
        return pb.CheckReply(checks=[messages.check_to_proto(r) for r in results], transfer_ms=transfer_ms,
                             restore_ms=restore_ms)

    @_rpc
    def PeerCheck(self, request: pb.PeerCheckRequest, context: grpc.ServicerContext) -> pb.CheckReply:
        """Asked by a source: could this host take the container?"""
        if _peer_name(context) != request.source_name:
            raise Refused(f"the caller's certificate names {_peer_name(context)!r}, not the source {request.source_name!r}")
        config = check_config(messages.config_from_proto(request.config))
        self._ct(config.id)
        busy = self.dest.busy(config.id)
        results = preflight.dest_checks(self.host, request.source_name, request, config, busy)
        return pb.CheckReply(checks=[messages.check_to_proto(r) for r in results])

    @_rpc
    def ListMigrations(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.MigrationList:
        records = []
        for e in self.journal.entries():
            state = "in_progress" if e.migration_id in self.active else (e.result or "in_doubt")
            records.append(messages.record_to_proto(e, state))
        return pb.MigrationList(migrations=records[-200:])

    @_rpc
    def SetPeers(self, request: pb.SetPeersRequest, context: grpc.ServicerContext) -> pb.SetPeersReply:
        """Admins only: replace this agent's peers and add serials to its revocation list (phaul.agent.peers)."""
        update = peers_mod.PeersUpdate.parse(request.peers, request.revoked_serials, self.host.name)
        added, path = peers_mod.apply(self.host, self.config, update)
        return pb.SetPeersReply(peers=sorted(self.host.peers), revoked_added=added, revoked_list=str(path))

    @_rpc
    def Recover(self, request: pb.RecoverRequest, context: grpc.ServicerContext) -> pb.RecoverReply:
        if request.migration_id:
            check_id(request.migration_id, "migration ID")
            outcomes = [self.recovery.settle(request.migration_id)]
        else:
            outcomes = self.recovery.settle_all()
        return pb.RecoverReply(outcomes=[messages.outcome_to_proto(o) for o in outcomes])


def _ended(e: JournalEntry, host: str) -> pb.FollowEvent:
    """The last event of a source migration that ended: its journal's account."""
    report = pb.Report(migration_id=e.migration_id, result=e.result or "in_doubt", ct=e.ct, source=host,
                       destination=e.peer, error=e.error, started_at=e.started_at)
    return pb.FollowEvent(migration_id=e.migration_id, ct=e.ct, source=host, destination=e.peer, report=report)


def serve(config: AgentConfig, hook: StepHook = NO_HOOK, reread: Callable[[], AgentConfig] | None = None) -> None:
    """Run the agent with `config` until SIGTERM or SIGINT; on SIGHUP, take the peers, admins
    and revocation list of `reread()` (the configuration file read again). `hook` is called at
    each step boundary of its migrations (phaul.migration.steps; tests plug one in). The
    service manager is told of each (phaul.agent.notify)."""
    notifier = Notifier.from_environment()  # before any child is started: they must not inherit it
    signals = Signals()  # from now on SIGHUP reloads (its default would end the agent) and SIGTERM stops
    name, creds, socket = config.name, config.creds, config.socket
    check_id(name, "host name")
    bind, advertise = agent_endpoints(config.listen, config.advertise)
    listen = str(bind)
    bind.resolve()  # a host name that does not resolve fails here, not at the first migration
    state_dir = config.state_dir.resolve()
    config = peers_mod.effective(config, state_dir)  # what `phaul host add/remove` pushed, if anything
    peers, admins = config.peers, config.admins
    check_access(peers, admins)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    if why := pycriu_module.missing():
        log.warning("pycriu is missing (%s): this agent cannot dump or restore a container; %s", why, pycriu_module.FIX)
    programs = workloads.find(config.workload_dir)
    if programs.present():
        log.info("workload programs from %s (%s): %s", programs.path, programs.origin, ", ".join(programs.present()))
    else:
        log.warning("no workload programs in %s (%s): containers get none; %s", programs.path, programs.origin, workloads.FIX)
    kind = RuncContainers(state_dir, name, config.bridge, RootfsCache(config.cache_dir, config.build_netns), programs)
    host = Host(
        name, state_dir, creds, listen, kind, hook, config.bridge,
        peers=peers, admins=admins, timeouts=config.timeouts, limits=config.limits,
        revocations=RevocationList(config.revoked) if config.revoked is not None else None,
        advertise=str(advertise),
    )
    if host.revocations is not None:
        log.info("revocation list %s (%d serials)", config.revoked, len(host.revocations.serials()))
    servicer = Servicer(host, config)
    notifier.status("settling the migrations the journal left unfinished")
    for outcome in servicer.recovery.startup():
        log.info(
            "start-up recovery: migration %s (%s): %s: %s", outcome.migration_id, outcome.role, outcome.result, outcome.message
        )
    keepalive = [
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    limits = config.limits
    # Every budget can be used up at once and Migrate's streams still have threads.
    workers = limits.peer_calls + limits.admin_calls + config.max_migrations + 4
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST), ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_metadata_size", 16 << 10), *keepalive,
        ],
        maximum_concurrent_rpcs=workers,
    )
    pb_grpc.add_AgentServicer_to_server(servicer, server)
    tls = grpc.ssl_server_credentials(
        [(creds.key.read_bytes(), creds.cert.read_bytes())],
        root_certificates=creds.ca.read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(listen, tls)
    if socket is not None:
        socket.parent.mkdir(parents=True, exist_ok=True)
        socket.unlink(missing_ok=True)
        server.add_secure_port(f"unix:{socket}", tls)
    server.start()
    if socket is not None:
        socket.chmod(0o600)
    log.info(
        "agent %s listening on %s%s (mutual TLS), advertised as %s, state in %s",
        name, listen, f" and {socket}" if socket else "", advertise, state_dir,
    )
    servicer.recovery.start_resolver(config.timeouts.resolve_interval)
    servicer.standbys.resume_all()
    notifier.ready(f"serving on {listen}" + (f" and {socket}" if socket else ""))
    while signals.next() is Signal.RELOAD:
        _reload(host, config, lambda: peers_mod.effective(reread() if reread else config, state_dir), notifier)
    log.info("agent %s stopping", name)
    notifier.stopping("stopping: running calls get 2 s")
    servicer.recovery.stop()
    servicer.standbys.stop_all()
    server.stop(grace=2).wait()
    servicer.dest.close_all()
    if socket is not None:
        socket.unlink(missing_ok=True)


def _reload(host: Host, config: AgentConfig, reread: Callable[[], AgentConfig], notifier: Notifier) -> None:
    """SIGHUP: the peers, admins and revocation list of `reread()` for every call from now on; a
    configuration that cannot be read or is wrong leaves everything as it was (and says why)."""
    notifier.reloading("reloading peers, admins and the revocation list")
    try:
        fresh = reread()
        summary = host.reload(fresh)
    except Exception as e:  # whatever the file holds, the agent goes on serving
        message = e.message if isinstance(e, PhaulError) else f"{type(e).__name__}: {e}"
        log.error("reload refused, the previous peers, admins and revocation list stay: %s", e,
                  exc_info=not isinstance(e, PhaulError))
        notifier.ready(f"reload refused (previous configuration kept): {message}")
        return
    later = restart_needed(config, fresh)
    log.info("reloaded: %s%s", summary, f"; a restart applies the changed {', '.join(later)}" if later else "")
    notifier.ready(f"serving on {config.listen}; reloaded: {summary}")
