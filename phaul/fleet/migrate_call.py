"""One migration as the CLI drives it: the source agent's Migrate stream, to its report."""

from __future__ import annotations

from collections.abc import Callable

from phaul.channels import messages
from phaul.channels.client import Agent
from phaul.controls import LeftRunning, migrate_events
from phaul.errors import ExitCode, InDoubt, LinkBroken, PhaulError, Unreachable
from phaul.migration.report import Report, Result
from phaul.rpc import phaul_pb2 as pb

CONNECT_TIMEOUT = 20.0  # s: connect before asking, so that unreachable means "nothing started"
IN_DOUBT_HINT = "see `phaul --host {host} migrations`, then settle it with `phaul --host {host} recover`"

ProgressSink = Callable[[pb.Progress], None]


def run(
    agent: Agent, request: pb.MigrateRequest, source: str, on_progress: ProgressSink | None = None,
    ctrl_c_aborts: bool = False,
) -> Report:
    """Ask the source agent `agent` (host `source`) to run `request` and return its report.
    `ctrl_c_aborts`: Ctrl-C asks the agent to abort it and the report still comes; a second
    one raises LeftRunning (phaul.controls.migrate_events).

    Raises the agent's own refusal (nothing changed: InvalidInput, Conflict, Busy...) as it is,
    Unreachable when no connection was made, and InDoubt when the migration may have started
    and its stream broke or ended without a report."""
    agent.wait_ready(CONNECT_TIMEOUT)
    started = False
    report: Report | None = None
    events = migrate_events(agent, request, source) if ctrl_c_aborts else agent.stream("Migrate", request)
    try:
        for event in events:
            started = True  # the agent sends events only once the migration runs
            if event.HasField("progress") and on_progress is not None:
                on_progress(event.progress)
            elif event.HasField("report"):
                report = messages.report_from_proto(event.report)
    except LeftRunning:
        raise
    except PhaulError as e:
        if started or not agent_decided(e):
            raise InDoubt(
                f"the migration of {request.ct_id} to {request.dest_name} may have started, and its stream broke: {e.message}",
                IN_DOUBT_HINT.format(host=source),
            ) from e
        raise  # the agent refused it before anything changed (or is busy)
    if report is None:
        raise InDoubt(f"the agent on {source} ended the migration of {request.ct_id} without a report",
                      IN_DOUBT_HINT.format(host=source))
    return report


def agent_decided(err: PhaulError) -> bool:
    """Whether `err` is the agent's own answer (it refused, or is busy) rather than a broken call."""
    return not isinstance(err, LinkBroken | Unreachable) and type(err) is not PhaulError


def exit_code(report: Report) -> ExitCode:
    """ok: 0; rolled back or failed (the report says where the container is): 1; in doubt: 3."""
    return {Result.OK: ExitCode.OK, Result.IN_DOUBT: ExitCode.IN_DOUBT}.get(report.result, ExitCode.FAILED)


def progress_line(p: pb.Progress) -> str:
    """One line of live progress; pre-copy rounds show their figures."""
    if p.phase == "precopy" and p.round:
        dirty = f"{p.dirty_rate / (1 << 20):6.1f} MiB/s" if p.dirty_rate else f"{'-':>11}"
        return (
            f"  round {p.round:<3} sent {p.bytes_sent / (1 << 20):8.1f} MiB at {p.rate / (1 << 20):6.1f} MiB/s"
            f"  dirty {dirty}  predicted freeze {p.predicted_frozen_ms:6.0f} ms  {p.message}"
        )
    return f"  {p.phase:<11} {p.message}"
