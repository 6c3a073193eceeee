"""The migration report's round trip through protobuf and its table (no lab)."""

from __future__ import annotations

import json

from phaul.channels import messages
from phaul.migration.report import Report, Round


def test_timings_come_back_in_the_order_things_happen() -> None:
    report = Report(
        migration_id="m1", ct="web", source="alpha", destination="beta", result="ok",
        rounds=[Round(pages_dumped=10, pages_sent=10, bytes_sent=40960, frozen_ms=5.0, duration_ms=9.0)],
        criu_ms={"runc_restore": 250.0, "memdump": 40.0, "freezing": 1.0, "transfer": 60.0},
        phases_ms={"resume": 50.0, "transfer.stream": 30.0, "restore": 260.0, "dump": 150.0, "transfer": 60.0,
                   "something.new": 1.0},
    )
    back = messages.report_from_proto(messages.report_to_proto(report))
    assert back == report
    for shown in (json.loads(back.to_json()), json.loads(report.to_json())):  # the CLI's and the source's file
        assert list(shown["criu_ms"]) == ["freezing", "memdump", "transfer", "runc_restore"]
        assert list(shown["phases_ms"]) == ["dump", "transfer", "transfer.stream", "restore", "resume", "something.new"]
    table = back.to_table()
    assert "while frozen    dump 150 ms, transfer 60 ms, transfer.stream 30 ms, restore 260 ms" in table
    assert "m1: web alpha -> beta: OK" in table


def test_every_pause_is_listed_rounds_and_final() -> None:
    report = Report(migration_id="m2", ct="db", source="alpha", destination="beta")
    assert "pauses          none" in report.to_table() and json.loads(report.to_json())["pauses_ms"] == []
    report.rounds = [Round(frozen_ms=310.0, duration_ms=700.0), Round(frozen_ms=250.0, duration_ms=600.0)]
    report.add_final_round(Round(frozen_ms=905.0))
    shown = json.loads(messages.report_from_proto(messages.report_to_proto(report)).to_json())
    assert shown["pauses_ms"] == [310.0, 250.0, 905.0] and shown["frozen_ms"] == 905.0
    assert (shown["pause_longest_ms"], shown["pause_total_ms"]) == (905.0, 1465.0)
    assert "pauses          3, 1465 ms in all, longest 905 ms (310, 250, 905 ms)" in report.to_table()
