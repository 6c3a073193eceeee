"""The CLI's JSON outputs: one document per command, each carrying
`schema_version` and described by a JSON Schema in phaul/schemas/ (shipped in
the package; tests/test_json_schemas.py validates representative outputs).

The CLI builds every --json document (and the rows of its tables) with these
functions and nothing else, so the schemas, the tests and what scripts see
cannot drift apart. A list output is an object: {"schema_version": 1,
"containers": [...]}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phaul.errors import PhaulError

if TYPE_CHECKING:
    from phaul.containers import ContainerInfo
    from phaul.fleet.evacuate import Evacuation
    from phaul.linux.doctor import Check
    from phaul.migration.report import Report

SCHEMA_VERSION = 1  # bumped when a field is removed or changes meaning (adding one does not)
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
# command -> its schema (phaul/schemas/NAME.json)
SCHEMAS = {
    "migrate": "report", "ct list": "containers", "pki list": "certificates", "doctor": "doctor", "check": "checks",
    "migrations": "migrations", "recover": "outcomes", "lab status": "lab-status", "error": "error",
    "evacuate": "evacuation", "migrations --follow": "follow", "abort": "abort", "copy": "report",
    "standby status": "standby-status", "failover": "failover",
}  # fmt: skip

Document = dict[str, Any]


def schema_path(name: str) -> Path:
    """The JSON Schema file `name` (a value of SCHEMAS)."""
    return SCHEMA_DIR / f"{name}.json"


def dumps(document: Document) -> str:
    """A document as the CLI prints it."""
    return json.dumps(document, indent=2)


def dumps_line(document: Document) -> str:
    """A document as one line (JSON lines: `migrations --follow --json`)."""
    return json.dumps(document)


def _doc(**fields: Any) -> Document:
    return {"schema_version": SCHEMA_VERSION, **fields}


def error(err: PhaulError) -> str:
    """An error as --json prints it on stderr, one line (schema: error)."""
    return json.dumps(_doc(error=err.message, hint=err.hint, exit_code=int(err.exit_code), kind=type(err).__name__))


def usage_error(message: str, exit_code: int) -> str:
    """A command-line mistake argparse found, as --json prints it (schema: error)."""
    return json.dumps(_doc(error=message, hint="see `phaul --help`", exit_code=exit_code, kind="UsageError"))


def report(r: Report) -> Document:
    """`phaul migrate --json` (schema: report)."""
    return _doc(**r.to_dict())


def containers(infos: Iterable[ContainerInfo]) -> Document:
    """`phaul ct list --json` (schema: containers)."""
    return _doc(containers=[asdict(i) for i in infos])


def certificates(rows: Iterable[dict[str, Any]]) -> Document:
    """`phaul pki list --json` (schema: certificates); rows from phaul.channels.pki.listing."""
    return _doc(certificates=list(rows))


def doctor(checks: Iterable[Check]) -> Document:
    """`phaul doctor --json` (schema: doctor)."""
    rows = [asdict(c) for c in checks]
    return _doc(checks=rows, ok=not any(r["status"] == "failure" for r in rows))


def preflight(ct: str, source: str, dest: str, results: Iterable[Any]) -> Document:
    """`phaul check --json` (schema: checks); `results` are CheckResult messages or dataclasses."""
    rows = [{"name": c.name, "status": str(c.status), "message": c.message, "host": c.host} for c in results]
    return _doc(ct=ct, source=source, destination=dest, checks=rows, ok=not any(r["status"] == "failure" for r in rows))


def migrations(records: Iterable[Any]) -> Document:
    """`phaul migrations --json` (schema: migrations); `records` are MigrationRecord messages."""
    return _doc(migrations=[
        {"migration_id": r.migration_id, "role": r.role, "ct": r.ct, "peer": r.peer, "state": r.state, "step": r.step,
         "started_at": r.started_at, "updated_at": r.updated_at, "error": r.error, "steps": list(r.steps)}
        for r in records
    ])  # fmt: skip


def outcomes(items: Iterable[Any]) -> Document:
    """`phaul recover --json` (schema: outcomes); `items` are RecoverOutcome messages."""
    return _doc(outcomes=[{"migration_id": o.migration_id, "role": o.role, "result": o.result, "message": o.message}
                          for o in items])


def follow_event(e: Any) -> Document:
    """One line of `phaul migrations --follow --json` (schema: follow); `e` is a FollowEvent message."""
    p, r = e.progress, e.report
    ended = e.HasField("report")
    return _doc(
        migration_id=e.migration_id, ct=e.ct, source=e.source, destination=e.destination,
        event="end" if ended else "progress", phase="" if ended else p.phase, round=p.round, bytes_sent=p.bytes_sent,
        total_bytes=e.total_bytes, rate=p.rate, dirty_rate=p.dirty_rate, predicted_pause_ms=p.predicted_frozen_ms,
        message=p.message, result=r.result if ended else "", error=r.error, aborted_by=r.aborted_by,
    )


def abort(asked: Any, result: str, r: Report | None) -> Document:
    """`phaul abort --json` (schema: abort); `asked` is the AbortReply message, `r` the report once it ended."""
    return _doc(
        migration_id=asked.migration_id, ct=asked.ct, destination=asked.destination, step=asked.step, result=str(result),
        aborted_by=r.aborted_by if r is not None else "", error=r.error if r is not None else "",
    )


def lab_status(status: dict[str, Any]) -> Document:
    """`phaul lab status --json` (schema: lab-status); `status` from phaul.testing.lab's LabStatus.to_dict."""
    return _doc(**status)


def evacuation(e: Evacuation) -> Document:
    """`phaul evacuate --json` (schema: evacuation)."""
    return _doc(source=e.source, dry_run=e.dry_run, parallel=e.parallel, exit_code=int(e.exit_code()), containers=[
        {"ct": r.ct, "destination": r.dest, "outcome": r.outcome.value, "reason": r.reason, "migration_id": r.migration_id,
         "pause_longest_ms": r.pause_longest_ms, "pause_total_ms": r.pause_total_ms, "bytes_sent": r.bytes_sent}
        for r in e.rows
    ])  # fmt: skip


def standby_status(rows: Iterable[dict[str, Any]]) -> Document:
    """`phaul standby status --json` (schema: standby-status); rows from phaul.standby.cli.status_rows."""
    return _doc(standbys=list(rows))


def failover(reply: Any, total_ms: float) -> Document:
    """`phaul failover --json` (schema: failover); `reply` a FailoverReply."""
    return _doc(ct=reply.ct, primary=reply.primary, checkpoint_at=reply.checkpoint_at, restore_ms=reply.restore_ms,
                fence=reply.fence, total_ms=total_ms)
