"""`phaul agent`: serves the agent protocol over mutual TLS only.

Every request is checked: the caller's certificate must come from the CA and,
when an allow list is configured, name an allowed host; IDs are validated
before anything touches the state directory.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import grpc

from phaul import __version__, messages
from phaul.client import MAX_MESSAGE, status_code
from phaul.containers.runc import RuncContainers
from phaul.dest import Destination
from phaul.doctor import criu_path, criu_version
from phaul.errors import InvalidInput, PhaulError
from phaul.faults import Fault
from phaul.host import Host
from phaul.rpc import phaul_pb2 as pb
from phaul.rpc import phaul_pb2_grpc as pb_grpc
from phaul.source import MigrateOptions, SourceMigration
from phaul.transport import Credentials, parse_endpoint
from phaul.validate import check_id

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
F = TypeVar("F", bound=Callable[..., Any])


def _peer_name(context: grpc.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else ""


def _rpc(fn: F) -> F:
    """Check the caller against the allow list and turn PhaulErrors into statuses."""

    @wraps(fn)
    def wrapper(self: Servicer, request: Any, context: grpc.ServicerContext) -> Any:
        peer = _peer_name(context)
        if self.host.allow and peer not in self.host.allow:
            log.warning("refused %s from %r (not in the allow list)", fn.__name__, peer)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{peer or 'this client'} is not allowed on {self.host.name}")
        try:
            return fn(self, request, context)
        except PhaulError as e:
            log.info("%s from %s: %s", fn.__name__, peer, e.message)
            context.abort(status_code(e), str(e))
        except Exception as e:
            log.exception("%s from %s failed", fn.__name__, peer)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in the agent: {e}")

    return wrapper  # type: ignore[return-value]


class Servicer(pb_grpc.AgentServicer):
    """The agent protocol on one host."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.dest = Destination(host)

    @_rpc
    def Info(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.HostInfo:
        v = criu_version(criu_path() or "")
        return pb.HostInfo(
            protocol_version=PROTOCOL_VERSION, name=self.host.name, phaul_version=__version__,
            criu_version=".".join(map(str, v)) if v else "", address=self.host.listen,
        )

    # -- containers -------------------------------------------------------------

    @_rpc
    def CreateContainer(self, request: pb.ContainerConfig, context: grpc.ServicerContext) -> pb.ContainerInfo:
        return messages.info_to_proto(self.host.containers.create(messages.config_from_proto(request)))

    @_rpc
    def StartContainer(self, request: pb.StartRequest, context: grpc.ServicerContext) -> pb.ContainerInfo:
        info = self.host.containers.start(check_id(request.id), list(request.args) or None)
        return messages.info_to_proto(info)

    @_rpc
    def ExecContainer(self, request: pb.ExecRequest, context: grpc.ServicerContext) -> pb.ExecReply:
        if not request.args:
            raise InvalidInput("no command given", "write the command after `--`")
        timeout = min(request.timeout or 60.0, 3600.0)
        r = self.host.containers.exec(check_id(request.id), list(request.args), timeout)
        return pb.ExecReply(returncode=r.returncode, stdout=r.stdout[-MAX_MESSAGE // 4 :], stderr=r.stderr[-MAX_MESSAGE // 4 :])

    @_rpc
    def ListContainers(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.ContainerList:
        return pb.ContainerList(containers=[messages.info_to_proto(i) for i in self.host.containers.list()])

    @_rpc
    def StopContainer(self, request: pb.ContainerRef, context: grpc.ServicerContext) -> pb.ContainerInfo:
        return messages.info_to_proto(self.host.containers.stop(check_id(request.id)))

    @_rpc
    def DestroyContainer(self, request: pb.ContainerRef, context: grpc.ServicerContext) -> pb.Empty:
        self.host.containers.destroy(check_id(request.id))
        return pb.Empty()

    # -- migration, source side --------------------------------------------------

    def Migrate(self, request: pb.MigrateRequest, context: grpc.ServicerContext) -> Iterator[pb.MigrateEvent]:
        """Runs the migration in its own thread, so that a client going away
        never interrupts it half-way; streams progress, then the report."""
        peer = _peer_name(context)
        if self.host.allow and peer not in self.host.allow:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{peer} is not allowed on {self.host.name}")
        events: queue.Queue[pb.MigrateEvent] = queue.Queue()
        try:
            options = MigrateOptions(
                tcp="close" if request.tcp_close else "keep",
                precopy=request.precopy or "auto",
                max_rounds=request.max_rounds or 8,
                max_downtime_ms=request.max_downtime_ms or 300,
                bandwidth=request.bandwidth,
                fault=Fault.parse(request.fault, self.host.fault_injection),
            )
            if options.precopy not in ("auto", "off"):
                raise InvalidInput(f"unknown pre-copy mode {options.precopy!r}", "use auto or off")
            migration = SourceMigration(
                self.host, request.ct_id, request.dest_name, request.dest_address, options,
                lambda p: events.put(pb.MigrateEvent(progress=p)),
            )
            migration.preflight()
        except PhaulError as e:
            context.abort(status_code(e), str(e))

        def run() -> None:
            report = migration.run()
            events.put(pb.MigrateEvent(report=report.to_proto()))

        threading.Thread(target=run, name=f"migrate-{migration.id}", daemon=True).start()
        while True:
            event = events.get()
            yield event
            if event.HasField("report"):
                return

    # -- migration, destination side ----------------------------------------------

    @_rpc
    def Prepare(self, request: pb.PrepareRequest, context: grpc.ServicerContext) -> pb.PrepareReply:
        peer = _peer_name(context)
        if peer != request.source_name:
            raise InvalidInput(f"the caller's certificate names {peer!r}, not the source {request.source_name!r}")
        address = self.dest.prepare(
            request.migration_id, request.source_name, messages.config_from_proto(request.config), request.criu_version,
            Fault.parse(request.fault, self.host.fault_injection),
        )
        v = criu_version(criu_path() or "")
        return pb.PrepareReply(data_address=address, criu_version=".".join(map(str, v or ())))

    @_rpc
    def Restore(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.RestoreReply:
        stats = self.dest.restore(request.migration_id)
        return pb.RestoreReply(criu_ms=stats, restore_ms=stats.get("runc_restore", 0.0))

    @_rpc
    def Resume(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.Empty:
        self.dest.resume(request.migration_id)
        return pb.Empty()

    @_rpc
    def Abort(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.Empty:
        self.dest.abort(request.migration_id)
        return pb.Empty()

    @_rpc
    def Finish(self, request: pb.MigrationRef, context: grpc.ServicerContext) -> pb.Empty:
        self.dest.finish(request.migration_id)
        return pb.Empty()


def serve(
    name: str, listen: str, state_dir: Path, creds: Credentials, socket: Path | None = None,
    allow: frozenset[str] = frozenset(), fault_injection: bool = False,
) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    check_id(name, "host name")
    parse_endpoint(listen)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    host = Host(name, state_dir, creds, listen, RuncContainers(state_dir, name), allow, fault_injection)
    servicer = Servicer(host)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)],
    )
    pb_grpc.add_AgentServicer_to_server(servicer, server)
    tls = grpc.ssl_server_credentials(
        [(creds.key.read_bytes(), creds.cert.read_bytes())],
        root_certificates=creds.ca.read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(listen, tls)
    if socket is not None:
        socket.unlink(missing_ok=True)
        server.add_secure_port(f"unix:{socket}", tls)
    server.start()
    if socket is not None:
        socket.chmod(0o600)
    log.info("agent %s listening on %s%s (mutual TLS), state in %s", name, listen, f" and {socket}" if socket else "", state_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("agent %s stopping", name)
    server.stop(grace=2).wait()
    servicer.dest.close_all()
    if socket is not None:
        socket.unlink(missing_ok=True)
