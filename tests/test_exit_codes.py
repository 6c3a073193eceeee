"""The CLI's exit status: one mapping from errors (phaul.errors.EXIT_CODES), and
`migrate`'s cases run through the real CLI against a scripted agent stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from phaul import cli
from phaul.channels import messages
from phaul.channels.client import error_from_rpc
from phaul.errors import (
    Busy,
    Conflict,
    ExitCode,
    InDoubt,
    InvalidInput,
    LinkBroken,
    NotFound,
    PhaulError,
    Refused,
    ToolFailed,
    Unreachable,
    exit_code,
)
from phaul.migration.report import Report, Result
from phaul.rpc import phaul_pb2 as pb


@pytest.mark.parametrize("err, code", [
    (InvalidInput("bad size"), ExitCode.REFUSED),
    (NotFound("no container 'x'"), ExitCode.REFUSED),
    (Conflict("preflight failed: ct-id on beta"), ExitCode.REFUSED),
    (Refused("not an admin"), ExitCode.REFUSED),
    (Unreachable("agent alpha is unreachable"), ExitCode.REFUSED),
    (Busy("alpha already runs 4 migrations"), ExitCode.BUSY),
    (ToolFailed("runc create failed"), ExitCode.FAILED),
    (LinkBroken("did not answer in time"), ExitCode.FAILED),
    (InDoubt("the stream broke"), ExitCode.IN_DOUBT),
    (PhaulError("something else"), ExitCode.FAILED),
])  # fmt: skip
def test_each_error_has_one_exit_code(err: PhaulError, code: ExitCode) -> None:
    assert exit_code(err) == err.exit_code == code


def test_the_codes_are_the_documented_numbers() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4]
    assert "4 busy" in cli.MIGRATE_EPILOG and "3 in doubt" in cli.MIGRATE_EPILOG


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("status, cls, code", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Busy, ExitCode.BUSY),
    (grpc.StatusCode.FAILED_PRECONDITION, Conflict, ExitCode.REFUSED),
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidInput, ExitCode.REFUSED),
    (grpc.StatusCode.NOT_FOUND, NotFound, ExitCode.REFUSED),
    (grpc.StatusCode.PERMISSION_DENIED, Refused, ExitCode.REFUSED),
    (grpc.StatusCode.ABORTED, ToolFailed, ExitCode.FAILED),
    (grpc.StatusCode.UNAVAILABLE, Unreachable, ExitCode.REFUSED),
    (grpc.StatusCode.DEADLINE_EXCEEDED, LinkBroken, ExitCode.FAILED),
    (grpc.StatusCode.CANCELLED, LinkBroken, ExitCode.FAILED),
])  # fmt: skip
def test_remote_errors_keep_their_exit_code(status: grpc.StatusCode, cls: type[PhaulError], code: ExitCode) -> None:
    err = error_from_rpc(_RpcError(status, "why"), "alpha")
    assert type(err) is cls and err.exit_code == code


# -- migrate, with the agent's stream scripted ------------------------------------------


class _Agent:
    """Stands in for phaul.channels.client.Agent: yields `events`, then raises `error` if given."""

    def __init__(self, events: list[pb.MigrateEvent], error: PhaulError | None, ready: bool = True) -> None:
        self.events, self.error, self.ready = events, error, ready

    def wait_ready(self, timeout: float) -> None:
        if not self.ready:
            raise Unreachable("agent alpha is unreachable (no connection in 20 s)")

    def stream(self, method: str, request: Any, timeout: float | None = None) -> Iterator[Any]:
        assert method == "Migrate" and request.ct_id == "web" and request.dest_name == "beta"
        yield from self.events
        if self.error is not None:
            raise self.error

    def __enter__(self) -> _Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _hosts_file(tmp_path: Path) -> Path:
    f = tmp_path / "hosts.json"
    f.write_text(json.dumps({"pki": {"ca": "ca.crt", "cert": "admin.crt", "key": "admin.key"}, "hosts": {
        "alpha": {"address": "127.0.0.1:7001"}, "beta": {"address": "127.0.0.1:7002"}}}))
    return f


def _progress() -> pb.MigrateEvent:
    return pb.MigrateEvent(progress=pb.Progress(phase="precopy", round=1, message="round 1"))


def _report(result: Result) -> pb.MigrateEvent:
    report = Report(migration_id="m-1", ct="web", source="alpha", destination="beta", result=result)
    return pb.MigrateEvent(report=messages.report_to_proto(report))


@pytest.mark.parametrize("events, error, ready, code", [
    ([_progress(), _report(Result.OK)], None, True, ExitCode.OK),
    ([_progress(), _report(Result.ROLLED_BACK)], None, True, ExitCode.FAILED),
    ([_report(Result.FAILED)], None, True, ExitCode.FAILED),
    ([_progress(), _report(Result.IN_DOUBT)], None, True, ExitCode.IN_DOUBT),
    # the stream broke mid-migration: whatever the error, the outcome is unknown
    ([_progress()], Unreachable("agent alpha is unreachable: Socket closed"), True, ExitCode.IN_DOUBT),
    ([_progress()], LinkBroken("call failed (CANCELLED)"), True, ExitCode.IN_DOUBT),
    ([_progress()], ToolFailed("rsync failed"), True, ExitCode.IN_DOUBT),
    # the stream ended without a report
    ([_progress()], None, True, ExitCode.IN_DOUBT),
    ([], None, True, ExitCode.IN_DOUBT),
    # broken before any event, once connected: the agent may have started it
    ([], LinkBroken("call failed (INTERNAL)"), True, ExitCode.IN_DOUBT),
    # the agent's own answers before anything starts
    ([], Busy("alpha already runs 4 migrations", "try again when one has ended"), True, ExitCode.BUSY),
    ([], Conflict("preflight failed: ct-id on beta"), True, ExitCode.REFUSED),
    ([], NotFound("no container 'web'"), True, ExitCode.REFUSED),
    ([], Refused("alpha does not migrate to beta"), True, ExitCode.REFUSED),
    # never connected: nothing was asked
    ([], None, False, ExitCode.REFUSED),
])  # fmt: skip
def test_migrate_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    events: list[pb.MigrateEvent], error: PhaulError | None, ready: bool, code: ExitCode,
) -> None:
    monkeypatch.setattr(cli, "_agent", lambda args: _Agent(events, error, ready))
    rc = cli.main(["--hosts-file", str(_hosts_file(tmp_path)), "--host", "alpha", "migrate", "web", "beta", "--json"])
    out, err = capsys.readouterr()
    assert rc == code, (out, err)
    if code == ExitCode.IN_DOUBT and not out:
        shown = json.loads(err)
        assert shown["exit_code"] == 3 and "recover" in shown["hint"], shown
    if out:
        assert json.loads(out)["migration_id"] == "m-1"


def test_migrate_in_doubt_without_json_names_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_agent", lambda args: _Agent([_progress()], Unreachable("Socket closed"), True))
    assert cli.main(["--hosts-file", str(_hosts_file(tmp_path)), "--host", "alpha", "migrate", "web", "beta"]) == 3
    err = capsys.readouterr().err
    assert "may have started" in err and "phaul --host alpha recover" in err


def _started() -> pb.MigrateEvent:
    return pb.MigrateEvent(started=pb.Started(migration_id="m-1"))


def test_migrate_prints_its_id_before_anything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--hosts-file", str(_hosts_file(tmp_path)), "--host", "alpha", "migrate", "web", "beta"]
    monkeypatch.setattr(cli, "_agent", lambda args: _Agent([_started(), _progress(), _report(Result.OK)], None, True))
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "migration m-1" and "m-1" in out.splitlines()[1]  # then the report's table
    assert cli.main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["migration_id"] == "m-1" and err == ""  # stdout: the report alone, which carries it
    monkeypatch.setattr(cli, "_agent", lambda args: _Agent([_started(), _progress()], Unreachable("Socket closed"), True))
    assert cli.main([*argv, "--json"]) == 3
    out, err = capsys.readouterr()
    shown = json.loads(err)
    assert out == "" and "migration m-1 to beta may have started" in shown["error"]
    assert "`phaul --host alpha recover m-1`" in shown["hint"]
