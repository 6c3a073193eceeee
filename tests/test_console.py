"""The container's console log: kept by phaul.containers.console, bounded, reported by
`start` for a command that exits at once, and still written after a CRIU restore."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_containers import _wait_for, kind  # noqa: F401  (the fixture)

from conftest import REPO, Lab, wait_for

from phaul.containers import ContainerConfig, console
from phaul.containers.inbound import strip_container_dir
from phaul.containers.runc import RuncContainers

TICKER = ["sh", "-c", "trap 'exit 0' TERM; i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"]



def _ticks(k: RuncContainers, ct_id: str) -> list[int]:
    return [int(line.split()[1]) for line in k.logs(ct_id).decode().splitlines() if line.startswith("tick ")]


def test_command_exiting_at_once_is_reported(kind: RuncContainers) -> None:  # noqa: F811
    kind.create(ContainerConfig(id="quick"))
    info = kind.start("quick", ["sh", "-c", "echo to stdout; echo to stderr >&2; exit 3"])
    assert (info.state, info.exit_status) == ("stopped", "exit 3")
    assert kind.logs("quick") == b"to stdout\nto stderr\n"
    info = kind.start("quick", ["true"])  # a new start forgets the previous status
    assert (info.state, info.exit_status) == ("stopped", "exit 0")
    info = kind.start("quick", TICKER)
    assert info.state == "running" and info.exit_status is None
    assert _wait_for(timeout=10.0, cond=lambda: len(_ticks(kind, "quick")) >= 3)
    assert kind.logs("quick", 1).count(b"\n") == 1
    assert kind.logs("quick").startswith(b"to stdout\n")  # one log across starts
    kind.stop("quick")
    assert console.wait_keeper(kind.log_dir("quick"), 0), "the keeper outlived its container"


def test_log_goes_on_after_restore(kind: RuncContainers, tmp_path: Path) -> None:  # noqa: F811
    kind.create(ContainerConfig(id="tick"))
    kind.start("tick", TICKER)
    assert _wait_for(timeout=10.0, cond=lambda: len(_ticks(kind, "tick")) >= 3)
    kind.checkpoint("tick", tmp_path / "img", tmp_path / "work")
    last = _ticks(kind, "tick")[-1]
    assert kind.restore("tick", tmp_path / "img", tmp_path / "work").state == "running"
    assert _wait_for(timeout=10.0, cond=lambda: _ticks(kind, "tick")[-1] > last + 3), "the restored container's output is lost"
    ticks = _ticks(kind, "tick")
    assert ticks == list(range(len(ticks))), "output lost or repeated across the restore"
    kind.destroy("tick")


def test_log_is_bounded(tmp_path: Path) -> None:
    d = tmp_path / "log"
    rc = console.run(["sh", "-c", "i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done"], d, 30, max_bytes=8192)
    assert rc == 0
    assert console.wait_keeper(d)
    sizes = {p.name: p.stat().st_size for p in d.iterdir() if p.name.startswith("console")}
    assert set(sizes) == {"console.log", "console.log.1"} and all(s < 8192 + 65536 for s in sizes.values()), sizes
    assert console.tail(d, 1) == b"line 2999\n"
    lines = console.tail(d, 0).decode().splitlines()
    assert lines == [f"line {i}" for i in range(3000 - len(lines), 3000)]  # the newest, contiguous
    start = console.read_since(d, 0, 0)
    assert start.data == b"" and start.offset == sizes["console.log"]
    rc = console.run(["sh", "-c", "echo after"], d, 30, max_bytes=8192)
    console.wait_keeper(d)
    assert console.read_since(d, start.file_id, start.offset).data == b"after\n"


def test_pushed_log_keeps_only_the_log(tmp_path: Path) -> None:
    ct = tmp_path / "ct"
    (ct / "bundle" / "rootfs").mkdir(parents=True)
    (ct / "log").mkdir()
    (ct / "log" / "console.log").write_text("kept\n")
    (ct / "log" / "keeper.pid").write_text("1\n")
    (ct / "log" / "exit").write_text("exit 0\n")
    os.symlink("/etc/shadow", ct / "log" / "console.log.1")
    strip_container_dir(ct)
    assert sorted(os.listdir(ct / "log")) == ["console.log"]


@pytest.mark.lab
def test_cli_reports_quick_exits_and_logs_move_with_the_container(clean_lab: Lab) -> None:
    lab = clean_lab
    lab.phaul("--host", "alpha", "ct", "create", "log1")
    quick = lab.phaul("--host", "alpha", "ct", "start", "log1", "--", "sh", "-c", "echo boom >&2; exit 4", check=False)
    assert quick.returncode == 1, quick
    assert "exited at once" in quick.stderr and "(exit 4)" in quick.stderr and "boom" in quick.stderr, quick.stderr
    lab.phaul("--host", "alpha", "ct", "start", "log1", "--", *TICKER)

    def ticks(host: str) -> list[int]:
        out = lab.phaul("--host", host, "ct", "logs", "log1").stdout
        return [int(line.split()[1]) for line in out.splitlines() if line.startswith("tick ")]

    wait_for(lambda: len(ticks("alpha")) >= 5, what="the ticker's output on alpha")
    report = lab.migrate("log1", "alpha", "beta")
    assert report["result"] == "ok", report
    last = ticks("beta")[-1]
    wait_for(lambda: ticks("beta")[-1] > last + 5, what="the ticker's output to go on on beta")
    got = ticks("beta")
    assert got == list(range(len(got))), "output lost or repeated by the migration"
    assert lab.phaul("--host", "beta", "ct", "logs", "log1").stdout.startswith("boom\n")
    assert len(lab.phaul("--host", "beta", "ct", "logs", "log1", "--tail", "2").stdout.splitlines()) == 2
    follow = subprocess.Popen(
        [sys.executable, "-m", "phaul", "--hosts-file", str(lab.hosts_file), "--host", "beta", "ct", "logs", "log1",
         "--tail", "1", "--follow"], stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert follow.stdout is not None
        lines = [follow.stdout.readline() for _ in range(6)]
    finally:
        follow.kill()
        follow.wait()
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], numbers[0] + 6)), lines
