"""Pre-copy in the lab: real containers, real CRIU rounds, memory verified after restore."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO, Lab, wait_for
from phaul.memory.policy import ConvergencePolicy

pytestmark = pytest.mark.lab

REASONS = ConvergencePolicy.REASONS


def _start_memload(lab: Lab, ct: str, size_mib: int, rate: float, host: str = "alpha") -> None:
    lab.phaul("--host", host, "ct", "create", ct, "--memory", f"{size_mib + 96}M")
    lab.phaul("--host", host, "ct", "start", ct, "--", "memload", "--size", str(size_mib), "--rate", str(rate))
    wait_for(lambda: lab.exec(host, ct, "sh", "-c", "test -s /memload.pid && echo yes || true").strip() == "yes",
             timeout=60, what=f"memload in {ct} to fill its memory")


def _verify_memory(lab: Lab, host: str, ct: str) -> str:
    """memload checks every page of its memory against its own generation table."""
    lab.exec(host, ct, "sh", "-c", "rm -f /memload.report; kill -USR1 $(cat /memload.pid)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = lab.exec(host, ct, "sh", "-c", "cat /memload.report 2>/dev/null || true").strip()
        if out:
            return out
        time.sleep(0.2)
    raise AssertionError("memload wrote no report")


def _check_totals(report: dict) -> None:
    """The rounds add up to the report's totals."""
    rounds = report["rounds"]
    assert report["fs_bytes_sent"] == sum(r["fs_bytes_sent"] for r in rounds)
    assert report["bytes_sent"] == report["fs_bytes_sent"] + sum(r["bytes_sent"] for r in rounds)
    assert report["frozen_ms"] == pytest.approx(rounds[-1]["frozen_ms"])
    assert report["total_ms"] > sum(r["duration_ms"] for r in rounds[:-1]) + report["frozen_ms"] * 0.99
    for r in rounds:
        assert 0 <= r["pages_sent"] <= r["pages_dumped"]
        assert r["bytes_sent"] >= r["pages_sent"] * 4096
        assert 0 < r["frozen_ms"] <= r["duration_ms"] + 1


def test_precopy_256m_working_set(clean_lab: Lab) -> None:
    lab = clean_lab
    _start_memload(lab, "mem256", 256, 8)
    report = lab.migrate("mem256", "alpha", "beta", "--method", "precopy")
    assert report["result"] == "ok", report
    assert report["memory_method"] == "precopy-page-delta"
    rounds = report["rounds"]
    assert len(rounds) >= 3, rounds  # at least two pre-copy rounds, then the final dump
    assert report["stop_reason"].split(":")[0] in REASONS, report["stop_reason"]
    first, last = rounds[0], rounds[-1]
    assert first["pages_sent"] == first["pages_dumped"] > 256 * 256  # the first round sends everything
    for r in rounds[1:]:
        assert r["pages_sent"] < r["pages_dumped"] // 4  # later rounds: only what changed
        assert r["bytes_sent"] < first["bytes_sent"] // 4
    for r in rounds[1:-1]:
        assert r["dirty_rate"] > 0 and r["predicted_frozen_ms"] > 0
    _check_totals(report)
    # total traffic stays near one copy of the memory plus the file system
    assert report["bytes_sent"] < 1.5 * (first["bytes_sent"] + first["fs_bytes_sent"])
    assert last["frozen_ms"] < 5000
    verdict = _verify_memory(lab, "beta", "mem256")
    assert verdict.startswith("ok pages=65536"), verdict
    assert lab.ct_list("alpha") == []


def test_precopy_off_is_a_single_stop_and_copy(clean_lab: Lab) -> None:
    lab = clean_lab
    _start_memload(lab, "memoff", 32, 4)
    report = lab.migrate("memoff", "alpha", "beta", "--precopy=off")
    assert report["result"] == "ok", report
    assert report["memory_method"] == "stop-and-copy"
    [only] = report["rounds"]
    assert only["pages_sent"] == only["pages_dumped"] > 32 * 256
    assert "a single stop-and-copy" in report["method_reason"], report["method_reason"]
    assert report["bytes_sent"] == report["fs_bytes_sent"] + only["bytes_sent"]
    assert _verify_memory(lab, "beta", "memoff").startswith("ok pages=8192")


def test_max_rounds_one(clean_lab: Lab) -> None:
    lab = clean_lab
    _start_memload(lab, "memone", 32, 4)
    report = lab.migrate("memone", "alpha", "beta", "--method", "precopy", "--max-rounds", "1")
    assert report["result"] == "ok", report
    assert report["memory_method"] == "precopy-page-delta"
    pre, final = report["rounds"]
    assert report["stop_reason"].startswith("max-rounds")
    assert pre["pages_sent"] == pre["pages_dumped"]
    assert final["pages_sent"] < final["pages_dumped"]
    assert "transfer.stream" in report["phases_ms"], report  # the final delta went over the page stream
    _check_totals(report)
    assert _verify_memory(lab, "beta", "memone").startswith("ok pages=8192")


def _migrate_on_a_terminal(lab: Lab, ct: str, src: str, dst: str, *extra: str) -> tuple[str, str]:
    """`phaul migrate` with its stderr on a pseudo-terminal: (stdout, what the terminal got)."""
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(lab.hosts_file), "--host", src, "migrate", ct, dst, *extra]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=REPO, text=True)
    os.close(slave)
    seen = bytearray()
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the CLI, the last writer, has closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        stdout, _ = proc.communicate(timeout=300)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (stdout, seen.decode(errors="replace"))
    return stdout, seen.decode(errors="replace")


def test_progress_shows_on_a_terminal_only(clean_lab: Lab) -> None:
    """Live progress per round on a terminal; only the report with --json or without one."""
    lab = clean_lab
    _start_memload(lab, "memtty", 32, 4)
    stdout, terminal = _migrate_on_a_terminal(lab, "memtty", "alpha", "beta", "--method", "precopy")
    assert "round 1" in terminal and "predicted freeze" in terminal and "MiB/s" in terminal, terminal
    assert ": OK" in stdout, stdout  # the report goes to stdout
    stdout, terminal = _migrate_on_a_terminal(lab, "memtty", "beta", "alpha", "--json")
    assert terminal == "" and stdout.lstrip().startswith("{"), terminal
    proc = lab.phaul("--host", "alpha", "migrate", "memtty", "beta")  # no terminal: the table only
    assert "predicted freeze" not in proc.stderr and ": OK" in proc.stdout, proc.stderr
    first, *rest = proc.stdout.splitlines()  # the migration's ID before anything else, as the report names it
    assert re.fullmatch(r"migration [0-9a-f]{12}", first) and f"{first}:" in "\n".join(rest), proc.stdout


def test_bandwidth_caps_precopy_and_round_trip_back(clean_lab: Lab) -> None:
    """--bandwidth slows the pre-copy rounds (not the frozen phase); then back to alpha."""
    lab = clean_lab
    _start_memload(lab, "memcap", 24, 1)
    report = lab.migrate("memcap", "alpha", "beta", "--method", "precopy", "--bandwidth", "12M")
    assert report["result"] == "ok", report
    first = report["rounds"][0]
    # ~25 MiB of memory plus the file system at 12 MiB/s: at least 2 s
    assert first["duration_ms"] > 0.8 * (first["bytes_sent"] + first["fs_bytes_sent"]) / (12 << 20) * 1000
    back = lab.migrate("memcap", "beta", "alpha", "--method", "precopy", "--max-downtime", "10000")
    assert back["result"] == "ok", back
    assert back["stop_reason"].split(":")[0] in REASONS
    assert _verify_memory(lab, "alpha", "memcap").startswith("ok pages=6144")


def test_precopy_rollback_thaws_the_source(clean_lab: Lab) -> None:
    """A restore failure after pre-copy rounds: the source, frozen by phaul's own
    freezer at the final dump, runs again with its memory intact."""
    lab = clean_lab
    _start_memload(lab, "memrb", 32, 8)
    report = lab.migrate("memrb", "alpha", "beta", "--method", "precopy", fault="restore:damage-image", check=False)
    assert report["result"] == "rolled_back", report
    [info] = lab.ct_list("alpha")
    assert info["state"] == "running"
    assert _verify_memory(lab, "alpha", "memrb").startswith("ok pages=8192")
    assert lab.ct_list("beta") == []


# Iteration i: rewrite a slot, make d<i>/f, delete d<i-5> (with its file),
# repoint a symlink, rename r<i-1> to r<i>; then log i. ~100 changes a second.
CHURN = (
    "mkdir -p /data && cd /data && echo 0 > r0 && i=0 && while :; do i=$((i+1)); echo $i > m$((i % 50)); "
    "mkdir d$i; echo $i > d$i/f; rm -rf d$((i-5)); ln -sfn d$i cur; mv r$((i-1)) r$i; echo $i >> log; "
    "sleep 0.02; done"
)


def test_precopy_with_a_changing_root_file_system(clean_lab: Lab) -> None:
    """Files created, rewritten, renamed and deleted (directories with their
    contents) while pre-copy rounds run: after the move, with the writer stopped,
    the destination's tree is the one the writer's own log says it made."""
    lab = clean_lab
    lab.phaul("--host", "alpha", "ct", "create", "churn", "--memory", "64M")
    static = lab.rootfs("alpha", "churn") / "static"
    static.mkdir()
    for i in range(3000):  # a tree of some size around the changing part
        (static / f"s{i}").write_text(f"{i}\n")
    lab.phaul("--host", "alpha", "ct", "start", "churn", "--", "/bin/sh", "-c",
              f"( {CHURN} ) & echo $! > /churn.pid; wait")
    wait_for(lambda: lab.exec("alpha", "churn", "sh", "-c", "test -s /data/log && echo yes || true").strip() == "yes",
             timeout=30, what="the writer in churn")
    time.sleep(1)
    report = lab.migrate("churn", "alpha", "beta", "--method", "precopy")
    assert report["result"] == "ok", report
    assert len(report["rounds"]) >= 2, report["rounds"]

    lab.exec("beta", "churn", "sh", "-c", "kill -STOP $(cat /churn.pid)")
    data = lab.rootfs("beta", "churn") / "data"
    n = int((data / "log").read_text().split()[-1])  # iteration n+1 may be under way
    assert n > 50
    names = {p.name for p in data.iterdir()}
    dirs = sorted(int(x[1:]) for x in names if x.startswith("d"))
    assert set(range(n - 3, n + 1)) <= set(dirs) <= set(range(n - 4, n + 2)), (n, dirs)
    for j in range(n - 3, n + 1):  # d<n-4> and d<n+1> may be half gone, half made
        assert [p.name for p in (data / f"d{j}").iterdir()] == ["f"] and (data / f"d{j}" / "f").read_text() == f"{j}\n"
    for j in range(n - 48, n + 1):
        assert (data / f"m{j % 50}").read_text() == f"{j}\n", j
    assert os.readlink(data / "cur") in (f"d{n}", f"d{n + 1}")
    assert [x for x in names if x.startswith("r")] in ([f"r{n}"], [f"r{n + 1}"])
    lab.exec("beta", "churn", "sh", "-c", "kill -CONT $(cat /churn.pid)")
