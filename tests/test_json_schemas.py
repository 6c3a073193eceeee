"""Every --json output against its JSON Schema (phaul/schemas/), produced the way the CLI
produces it: through `phaul.cli.main` with a scripted agent, or the same phaul.output
functions with realistic objects. Each output must also have every field documented."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from phaul import cli, output
from phaul.fleet import migrate_call
from phaul.channels import messages, pki
from phaul.checks import CheckResult, CheckState
from phaul.containers import ContainerInfo
from phaul.errors import Busy, InDoubt, InvalidInput, NotFound
from phaul.linux import doctor
from phaul.migration.journal import JournalEntry
from phaul.migration.recovery import Outcome
from phaul.migration.report import Report, Result, Round
from phaul.rpc import phaul_pb2 as pb
from phaul.testing.lab import HostStatus, LabStatus


def _schema(name: str) -> dict[str, Any]:
    return json.loads(output.schema_path(name).read_text())  # type: ignore[no-any-return]


def _undocumented(instance: Any, schema: dict[str, Any], root: dict[str, Any], where: str = "$") -> list[str]:
    """Paths of the fields in `instance` its schema does not name (a field added without its schema)."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    found: list[str] = []
    if isinstance(instance, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in instance.items():
            if props is not None and key in props:
                found += _undocumented(value, props[key], root, f"{where}.{key}")
            elif isinstance(extra, dict):
                found += _undocumented(value, extra, root, f"{where}.{key}")
            else:
                found.append(f"{where}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += _undocumented(item, schema["items"], root, f"{where}[{i}]")
    return found


def check(name: str, text: str) -> dict[str, Any]:
    """`text` (what the CLI printed) is valid against schema `name` and fully documented by it."""
    instance = json.loads(text)
    schema = _schema(name)
    jsonschema.Draft202012Validator(schema).validate(instance)
    assert _undocumented(instance, schema, schema) == []
    assert instance["schema_version"] == output.SCHEMA_VERSION == 1
    return instance  # type: ignore[no-any-return]


def test_every_schema_is_a_valid_schema_and_every_command_has_one() -> None:
    files = {p.stem for p in output.SCHEMA_DIR.glob("*.json")}
    assert files == set(output.SCHEMAS.values())
    for name in files:
        jsonschema.Draft202012Validator.check_schema(_schema(name))


def test_the_checks_fail_on_a_wrong_or_undocumented_output() -> None:
    good = output.dumps(output.containers([ContainerInfo(id="web", state="running", pid=7)]))
    check("containers", good)
    with pytest.raises(jsonschema.ValidationError):
        check("containers", good.replace('"running"', '"flying"'))
    with pytest.raises(jsonschema.ValidationError):
        check("containers", json.dumps({"containers": []}))  # no schema_version
    with pytest.raises(AssertionError):
        check("containers", good.replace('"pid"', '"new_field": 1, "pid"'))


# -- through the CLI, with a scripted agent ------------------------------------------


class _Agent:
    def __init__(self, replies: dict[str, Any], events: list[pb.MigrateEvent] | None = None) -> None:
        self.replies, self.events = replies, events or []

    def call(self, method: str, request: Any, timeout: float = 60.0) -> Any:
        return self.replies[method]

    def stream(self, method: str, request: Any, timeout: float | None = None) -> Iterator[Any]:
        yield from self.events

    def wait_ready(self, timeout: float) -> None:
        pass

    def __enter__(self) -> _Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    f = tmp_path / "hosts.json"
    f.write_text(json.dumps({"pki": {"ca": "ca.crt", "cert": "admin.crt", "key": "admin.key"}, "hosts": {
        "alpha": {"address": "10.213.7.11:7473"}, "beta": {"address": "10.213.7.12:7473"}}}))
    return f


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], hosts_file: Path, agent: _Agent,
         *argv: str) -> tuple[int, str, str]:
    def fake(args: Any) -> _Agent:
        cli._host(args)
        return agent

    monkeypatch.setattr(cli, "_agent", fake)
    rc = cli.main(["--hosts-file", str(hosts_file), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _report(result: Result, **kw: Any) -> Report:
    return Report(
        migration_id="m-20261207-1a2b", ct="web", source="alpha", destination="beta", result=result,
        memory_method="precopy", method_reason="auto: predicted pause 120 ms <= 300 ms",
        rounds=[Round(pages_dumped=65536, pages_sent=65536, bytes_sent=268435456, frozen_ms=35.0, duration_ms=2100.0,
                      fs_bytes_sent=4096, predicted_frozen_ms=140.0, dirty_rate=1.5e6),
                Round(pages_dumped=900, pages_sent=900, bytes_sent=3686400, frozen_ms=180.0, duration_ms=400.0)],
        frozen_ms=180.0, total_ms=3400.5, bytes_sent=272125952, fs_bytes_sent=8192,
        criu_ms={"freezing": 1.2, "memdump": 40.0, "runc_restore": 250.0}, phases_ms={"dump": 90.0, "restore": 70.0},
        started_at="2026-12-07T10:37:12Z", stop_reason="predicted freeze within --max-downtime", **kw,
    )  # fmt: skip


@pytest.mark.parametrize("report", [
    _report(Result.OK),
    _report(Result.ROLLED_BACK, error="restore on beta failed: runc restore exited 1"),
    _report(Result.IN_DOUBT, error="beta did not answer the commit"),
    Report(migration_id="m-2", ct="db", source="alpha", destination="beta", result=Result.OK, memory_method="postcopy",
           postcopy_ms=820.0, postcopy_bytes=1 << 28),
])  # fmt: skip
def test_migrate(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], hosts_file: Path,
                 report: Report) -> None:
    events = [pb.MigrateEvent(progress=pb.Progress(phase="precopy", round=1)),
              pb.MigrateEvent(report=messages.report_to_proto(report))]
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({}, events), "--host", "alpha", "migrate", report.ct,
                      "beta", "--json")
    shown = check("report", out)
    assert rc == migrate_call.exit_code(report) and shown["result"] == report.result
    assert shown["pauses_ms"] == report.pauses_ms


def test_copy(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], hosts_file: Path) -> None:
    report = Report(migration_id="m-3", ct="web", source="alpha", destination="beta", result=Result.OK,
                    memory_method="offline", method_reason="cold copy of web as web2: its file system, its command "
                    "started afresh, address 10.0.0.9/24")
    events = [pb.MigrateEvent(progress=pb.Progress(phase="transfer")), pb.MigrateEvent(report=messages.report_to_proto(report))]
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({}, events), "--host", "alpha", "copy", "web", "beta",
                      "--as", "web2", "--ip", "10.0.0.9/24", "--json")
    shown = check("report", out)
    assert rc == 0 and shown["memory_method"] == "offline"


def test_ct_list(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], hosts_file: Path) -> None:
    infos = [
        ContainerInfo(id="web", state="running", pid=4242, memory_used=12 << 20, memory_limit=256 << 20, ip="10.213.7.50"),
        ContainerInfo(id="batch", state="stopped", exit_status="exit 0"),
        ContainerInfo(id="new", state="created"),
    ]
    reply = pb.ContainerList(containers=[messages.info_to_proto(i) for i in infos])
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({"ListContainers": reply}), "ct", "list", "--json")
    shown = check("containers", out)
    assert rc == 0 and [c["id"] for c in shown["containers"]] == ["web", "batch", "new"]
    assert shown["containers"][1]["pid"] is None and shown["containers"][0]["memory_limit"] == 256 << 20
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({"ListContainers": pb.ContainerList()}), "ct", "list",
                      "--json")
    assert check("containers", out)["containers"] == []


def test_check(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], hosts_file: Path) -> None:
    results = [
        CheckResult("criu", CheckState.PASS, "4.2.1 on both hosts", "alpha"),
        CheckResult("memory", CheckState.WARNING, "beta has 300 MiB free for 256 MiB", "beta"),
        CheckResult("ct-id", CheckState.FAILURE, "beta already has a container web", "beta"),
    ]
    reply = pb.CheckReply(checks=[messages.check_to_proto(c) for c in results])
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({"Check": reply}), "check", "web", "beta", "--json",
                      "--host", "alpha")
    shown = check("checks", out)
    assert rc == 1 and shown["ok"] is False and (shown["source"], shown["destination"]) == ("alpha", "beta")
    assert [c["status"] for c in shown["checks"]] == ["pass", "warning", "failure"]


def test_migrations_and_recover(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                hosts_file: Path) -> None:
    entries = [
        (JournalEntry("m-1", "source", "web", "beta", "10.213.7.12:7473", "commit", ["begin", "dump", "commit"],
                      "2026-12-07T10:00:00Z", "2026-12-07T10:00:04Z", Result.OK), "ok"),
        (JournalEntry("m-2", "destination", "db", "alpha", step="restore", steps=["prepare", "restore"],
                      error="link lost"), "in_doubt"),
    ]
    reply = pb.MigrationList(migrations=[messages.record_to_proto(e, state) for e, state in entries])
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({"ListMigrations": reply}), "migrations", "--json")
    shown = check("migrations", out)
    assert rc == 0 and [m["state"] for m in shown["migrations"]] == ["ok", "in_doubt"]

    outcomes = [Outcome("m-2", "source", Result.ROLLED_BACK, "db runs on alpha"),
                Outcome("m-3", "destination", Result.IN_PROGRESS, "the migration is still running on this agent")]
    reply = pb.RecoverReply(outcomes=[messages.outcome_to_proto(o) for o in outcomes])
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({"Recover": reply}), "recover", "--json")
    shown = check("outcomes", out)
    assert rc == 3 and [o["result"] for o in shown["outcomes"]] == ["rolled_back", "in_progress"]


def test_follow_and_abort(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], hosts_file: Path) -> None:
    report = messages.report_to_proto(_report(Result.ROLLED_BACK, error="aborted by admin (`phaul abort`)",
                                              aborted_by="admin (`phaul abort`)"))
    head = {"migration_id": "m-20261207-1a2b", "ct": "web", "source": "alpha", "destination": "beta"}
    events = [
        pb.FollowEvent(**head, progress=pb.Progress(phase="fs-presync", message="copying", bytes_sent=4096),
                       total_bytes=4096),
        pb.FollowEvent(**head, progress=pb.Progress(phase="precopy", round=1, bytes_sent=1 << 26, rate=9e7, dirty_rate=2e6,
                                                    predicted_frozen_ms=140.0, message="round 1"),
                       total_bytes=(1 << 26) + 4096),
        pb.FollowEvent(**head, report=report, total_bytes=(1 << 26) + 4096),
    ]
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({}, events), "--host", "alpha", "migrations", "--follow",
                      "m-20261207-1a2b", "--json")
    lines = [check("follow", line) for line in out.splitlines()]
    assert rc == 1 and [e["event"] for e in lines] == ["progress", "progress", "end"]
    assert lines[1]["predicted_pause_ms"] == 140.0 and lines[2]["result"] == "rolled_back"
    assert lines[2]["aborted_by"] == "admin (`phaul abort`)"

    asked = pb.AbortReply(migration_id="m-20261207-1a2b", ct="web", destination="beta", step="precopy")
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({"AbortMigration": asked}, events), "--host", "alpha",
                      "abort", "m-20261207-1a2b", "--json")
    shown = check("abort", out)
    assert rc == 0 and shown["result"] == "rolled_back" and shown["step"] == "precopy"
    rc, out, _ = _run(monkeypatch, capsys, hosts_file, _Agent({"AbortMigration": asked}), "--host", "alpha",
                      "abort", "m-20261207-1a2b", "--no-wait", "--json")
    assert rc == 0 and check("abort", out)["result"] == "aborting"


def test_pki_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "alpha", ips=["10.213.7.11"])
    pki.issue(d, "alpha", ips=["10.213.7.11"])
    pki.issue(d, "admin")
    pki.revoke(d, "admin")
    assert cli.main(["pki", "list", "--dir", str(d), "--json"]) == 0
    shown = check("certificates", capsys.readouterr().out)
    assert [c["status"] for c in shown["certificates"]] == ["replaced", "valid", "revoked"]


def test_doctor() -> None:
    checks = [doctor._check_pycriu(), doctor._check_workloads(), doctor._check_root(), doctor._check_pipe_max_size(),
              doctor.Check("criu", CheckState.FAILURE, "no `criu` on PATH", doctor.SETUP_FIX)]
    shown = check("doctor", output.dumps(output.doctor(checks)))
    assert shown["ok"] is False and shown["checks"][-1]["fix"] == doctor.SETUP_FIX
    assert check("doctor", output.dumps(output.doctor(checks[:1])))["ok"] is True


def test_lab_status() -> None:
    st = LabStatus(
        lab_dir="/var/lib/phaul-lab", subnet="10.213.0.0/24", namespaces={"phaul-alpha": True, "phaul-beta": False},
        hosts={"alpha": HostStatus("alpha", "phaul-alpha", True, "10.213.0.11:7473", 1234, True, "/x/alpha.sock", True),
               "beta": HostStatus("beta", "phaul-beta", False)},
        client={"netns": "phaul-client", "address": "10.213.0.100", "netns_present": True}, problems=["no phaul-beta"],
    )  # fmt: skip
    shown = check("lab-status", output.dumps(output.lab_status(st.to_dict())))
    assert shown["healthy"] is False and shown["hosts"]["alpha"]["agent_pid"] == 1234


@pytest.mark.parametrize("err", [
    InvalidInput("invalid container ID 'Bad/ID'", "use letters, digits, '.', '_' and '-'"),
    NotFound("no host 'gamma' in /etc/phaul/hosts.json", "known hosts: alpha, beta"),
    Busy("alpha already runs 4 migrations", "try again when one has ended"),
    InDoubt("the migration of web to beta may have started, and its stream broke", "phaul recover"),
])  # fmt: skip
def test_errors(err: Exception) -> None:
    shown = check("error", output.error(err))  # type: ignore[arg-type]
    assert shown["exit_code"] == err.exit_code and shown["kind"] == type(err).__name__  # type: ignore[attr-defined]


def test_errors_from_the_cli_and_from_argparse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--hosts-file", str(tmp_path / "none.json"), "ct", "list", "--json"]) == 2
    assert check("error", capsys.readouterr().err)["kind"] == "NotFound"
    with pytest.raises(SystemExit):
        cli.main(["migrate", "web", "--json"])
    assert check("error", capsys.readouterr().err)["kind"] == "UsageError"
