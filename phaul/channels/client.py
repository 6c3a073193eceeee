"""gRPC channels to agents over mutual TLS, and errors carried across them.

Agents and the CLI use `connect()`; a failed call raises the same PhaulError
subclass the agent raised, so callers handle remote and local errors alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from phaul.channels.transport import Credentials
from phaul.endpoint import parse_endpoint
from phaul.errors import Busy, Conflict, InvalidInput, LinkBroken, NotFound, PhaulError, Refused, ToolFailed, Unreachable
from phaul.rpc import phaul_pb2_grpc as pb_grpc

UNREACHABLE_HINT = "check that its agent runs (`phaul lab status`) and that both sides use certificates from the same CA"
MAX_MESSAGE = 16 << 20
KEEPALIVE_MS = 3000  # ping an idle connection this often; a peer silent as long again is dead

_TO_CODE: list[tuple[type[PhaulError], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ToolFailed, grpc.StatusCode.ABORTED),
    (Refused, grpc.StatusCode.PERMISSION_DENIED),
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def status_code(err: PhaulError) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def error_from_rpc(err: grpc.RpcError, target: str) -> PhaulError:
    """A PhaulError for a failed call: the agent's own error, or a transport problem."""
    code = err.code()
    details = err.details() or ""
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Refused(
            f"agent {target} refused the call: {details}", "add this certificate's name to the agent's --admins or --peers list"
        )
    for cls, c in _TO_CODE:
        if code == c:
            return cls(details)
    if code == grpc.StatusCode.UNKNOWN and details:
        return PhaulError(details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unreachable(f"agent {target} is unreachable: {details}", UNREACHABLE_HINT)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return LinkBroken(f"agent {target} did not answer in time", "check the agent's log and the link")
    return LinkBroken(f"call to agent {target} failed ({code.name}): {details}", "check the agent's log and the link")


@dataclass
class Agent:
    """A connected agent: `call("Method", request)` returns the reply or raises PhaulError."""

    target: str
    channel: grpc.Channel
    stub: pb_grpc.AgentStub

    def call(self, method: str, request: Any, timeout: float = 60.0) -> Any:
        fn: Callable[..., Any] = getattr(self.stub, method)
        try:
            return fn(request, timeout=timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from None

    def stream(self, method: str, request: Any, timeout: float | None = None) -> Iterator[Any]:
        fn: Callable[..., Any] = getattr(self.stub, method)
        try:
            yield from fn(request, timeout=timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from None

    def wait_ready(self, timeout: float) -> None:
        """Connect (TLS included) within `timeout` s, or raise Unreachable: nothing was asked of the agent."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unreachable(f"agent {self.target} is unreachable (no connection in {timeout:g} s)", UNREACHABLE_HINT) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(target: str, server_name: str, creds: Credentials) -> Agent:
    """A channel to the agent at `target` ('HOST:PORT' as phaul.endpoint parses it, or
    'unix:/path') whose certificate must name `server_name` (whatever address or host
    name it is dialed at), authenticated with `creds`."""
    dial = target if target.startswith("unix:") else parse_endpoint(target, f"address of {server_name}").grpc_target
    tls = grpc.ssl_channel_credentials(
        root_certificates=creds.ca.read_bytes(),
        private_key=creds.key.read_bytes(),
        certificate_chain=creds.cert.read_bytes(),
    )
    options = [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        # A dead link or peer fails the calls on it within about 2 x KEEPALIVE_MS,
        # however long their deadlines are.
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # and a connection attempt to an unreachable host gives up after this long
        ("grpc.min_reconnect_backoff_ms", KEEPALIVE_MS),
    ]
    channel = grpc.secure_channel(dial, tls, options=options)
    return Agent(target, channel, pb_grpc.AgentStub(channel))
