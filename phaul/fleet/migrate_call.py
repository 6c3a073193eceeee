"""One migration as the CLI drives it: the source agent's Migrate stream, to its report."""

from __future__ import annotations

from collections.abc import Callable

from phaul.channels import messages
from phaul.channels.client import Agent
from phaul.errors import ExitCode, InDoubt, LinkBroken, PhaulError, Unreachable
from phaul.fleet.controls import LeftRunning, migrate_events
from phaul.migration.report import Report, Result
from phaul.rpc import phaul_pb2 as pb

CONNECT_TIMEOUT = 20.0  # s: connect before asking, so that unreachable means "nothing started"
IN_DOUBT_HINT = "see `phaul --host {host} migrations`, then settle it with `phaul --host {host} recover{id}`"

ProgressSink = Callable[[pb.Progress], None]
StartedSink = Callable[[str], None]  # gets the migration's ID, before anything else


def run(
    agent: Agent, request: pb.MigrateRequest, source: str, on_progress: ProgressSink | None = None,
    on_started: StartedSink | None = None, ctrl_c_aborts: bool = False,
) -> Report:
    """Ask the source agent `agent` (host `source`) to run `request` and return its report.
    `ctrl_c_aborts`: Ctrl-C asks the agent to abort it and the report still comes; a second
    one raises LeftRunning (phaul.fleet.controls.migrate_events).

    Raises the agent's own refusal (nothing changed: InvalidInput, Conflict, Busy...) as it is,
    Unreachable when no connection was made, and InDoubt when the migration may have started
    and its stream broke or ended without a report."""
    agent.wait_ready(CONNECT_TIMEOUT)
    started = False
    mid = ""
    report: Report | None = None
    events = migrate_events(agent, request, source) if ctrl_c_aborts else agent.stream("Migrate", request)
    try:
        for event in events:
            started = True  # the agent sends events only once the migration runs
            if event.HasField("started"):
                mid = event.started.migration_id
                if on_started is not None:
                    on_started(mid)
            elif event.HasField("progress") and on_progress is not None:
                on_progress(event.progress)
            elif event.HasField("report"):
                report = messages.report_from_proto(event.report)
    except LeftRunning:
        raise
    except PhaulError as e:
        if started or not agent_decided(e):
            raise InDoubt(
                f"the migration {mid or 'of ' + request.ct_id} to {request.dest_name} may have started, and its stream "
                f"broke: {e.message}", in_doubt_hint(source, mid),
            ) from e
        raise  # the agent refused it before anything changed (or is busy)
    if report is None:
        raise InDoubt(f"the agent on {source} ended the migration {mid or 'of ' + request.ct_id} without a report",
                      in_doubt_hint(source, mid))
    return report


def in_doubt_hint(host: str, migration_id: str) -> str:
    """What to run when a migration's outcome is unknown (its ID, once the agent said it)."""
    return IN_DOUBT_HINT.format(host=host, id=f" {migration_id}" if migration_id else "")


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
