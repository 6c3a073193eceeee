"""Real-process tests for the static C workloads in workloads/ (no mocks).

The binaries are built with `make -s -C workloads` once per session and run on
127.0.0.1 with kernel-chosen (random) ports. Every process started here is
killed and reaped at teardown, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ROOT / "workloads"
BIN = WORKLOADS / "bin"
PROGRAMS = ("memload", "echo-server", "tcp-probe")


@pytest.fixture(scope="session")
def bins() -> dict[str, Path]:
    paths = {name: BIN / name for name in PROGRAMS}
    missing = [name for name, p in paths.items() if not os.access(p, os.X_OK)]
    if shutil.which("make") and shutil.which("gcc"):
        # Idempotent and quiet: rebuilds only when a source changed.
        res = subprocess.run(["make", "-s", "-C", str(WORKLOADS)], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            pytest.fail(f"building workloads failed:\n{res.stdout}{res.stderr}")
    elif missing:
        pytest.fail(f"workload binaries {missing} missing and no gcc/make to build them: run `make setup`")
    return paths


class Procs:
    """Tracks started processes; kills and reaps all of them at teardown."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def start(self, argv: list[str | Path], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen([str(a) for a in argv], **kw)
        self._procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            try:
                p.communicate(timeout=5)
            except (subprocess.TimeoutExpired, ValueError):
                pass


@pytest.fixture
def procs():
    tracker = Procs()
    try:
        yield tracker
    finally:
        tracker.cleanup()


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def start_memload(procs: Procs, bins, tmp_path: Path, *extra: str):
    report, pid_file = tmp_path / "memload.report", tmp_path / "memload.pid"
    p = procs.start([bins["memload"], "--report", report, "--pid-file", pid_file, *extra])
    pid = wait_for(lambda: read_text(pid_file), 10, "memload PID file")
    assert int(pid.strip()) == p.pid
    return p, report


def verify(p: subprocess.Popen, report: Path) -> str:
    report.unlink(missing_ok=True)
    p.send_signal(signal.SIGUSR1)
    return wait_for(lambda: read_text(report), 10, "memload report").strip()


def start_echo_server(procs: Procs, bins, *extra: str) -> tuple[subprocess.Popen, int]:
    p = procs.start([bins["echo-server"], "--port", "0", "--bind", "127.0.0.1", *extra])
    ready, _, _ = select.select([p.stdout], [], [], 5)
    assert ready, "echo-server did not report its port"
    line = p.stdout.readline().decode()
    m = re.fullmatch(r"echo-server: listening on 127\.0\.0\.1:(\d+) \(tcp\+udp\)\n", line)
    assert m, f"unexpected echo-server banner {line!r}"
    return p, int(m.group(1))


def run_probe(bins, port: int, *extra: str, timeout: float = 15) -> tuple[int, dict]:
    res = subprocess.run(
        [str(bins["tcp-probe"]), "--connect", f"127.0.0.1:{port}", "--json", *extra],
        capture_output=True, text=True, timeout=timeout,
    )
    return res.returncode, json.loads(res.stdout)


# --------------------------------------------------------------------------- memload

def test_memload_verify_ok(procs, bins, tmp_path):
    p, report = start_memload(procs, bins, tmp_path, "--size", "16", "--rate", "8")
    first = verify(p, report)
    m1 = re.fullmatch(r"ok pages=4096 generation_sum=(\d+) checksum=([0-9a-f]{16})", first)
    assert m1, first
    time.sleep(0.3)
    second = verify(p, report)
    m2 = re.fullmatch(r"ok pages=4096 generation_sum=(\d+) checksum=([0-9a-f]{16})", second)
    assert m2, second
    # 8 MiB/s = 2048 pages/s rewritten: generations must have advanced.
    assert int(m2.group(1)) > int(m1.group(1))
    assert not list(tmp_path.glob("*.tmp*")), "temporary report files left behind"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=5) == 0


def test_memload_rate_zero_is_stable(procs, bins, tmp_path):
    p, report = start_memload(procs, bins, tmp_path, "--size", "4", "--rate", "0", "--seed", "7")
    a, b = verify(p, report), verify(p, report)
    assert a == b and a.startswith("ok pages=1024 generation_sum=0 ")


def test_memload_detects_corruption(procs, bins, tmp_path):
    p, report = start_memload(procs, bins, tmp_path, "--size", "8", "--rate", "0", "--self-test-corrupt")
    line = verify(p, report)
    assert re.fullmatch(r"corrupt page=1024 reason=content-mismatch offset=100 .* bad_pages=1", line), line
    assert p.poll() is None, "memload must keep running after a corrupt verification"


@pytest.mark.parametrize("argv, msg", [
    ([], "missing required option --size"),
    (["--size", "0", "--rate", "1"], "invalid value '0' for --size"),
    (["--size", "4", "--rate", "-1"], "invalid value '-1' for --rate"),
    (["--size", "4"], "missing required option --rate"),
    (["--size", "4", "--rate", "1", "--nope"], "unknown argument '--nope'"),
])
def test_memload_usage_errors(bins, argv, msg):
    res = subprocess.run([str(bins["memload"]), *argv], capture_output=True, text=True, timeout=5)
    assert res.returncode == 2 and msg in res.stderr, res.stderr


# --------------------------------------------------------------------------- echo + probe

def test_echo_probe_happy_path(procs, bins):
    server, port = start_echo_server(procs, bins)
    rc, out = run_probe(bins, port, "--duration", "1", "--interval-ms", "10")
    assert rc == 0, out
    for key in ("sent", "received", "wrong", "max_gap_ms", "reset", "eof", "duration_ms"):
        assert key in out
    assert out["sent"] >= 80 and out["received"] == out["sent"]
    assert out["wrong"] == 0 and out["missing"] == 0
    assert out["reset"] is False and out["eof"] is False and out["error"] is None
    assert 5 <= out["max_gap_ms"] < 500
    assert 900 <= out["duration_ms"] < 4000

    rc, out = run_probe(bins, port, "--udp", "--duration", "0.5")
    assert rc == 0, out
    assert out["mode"] == "udp" and out["sent"] >= 40 and out["received"] == out["sent"]

    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=5) == 0


def test_probe_stops_cleanly_on_sigint(procs, bins):
    _, port = start_echo_server(procs, bins)
    probe = procs.start([bins["tcp-probe"], "--connect", f"127.0.0.1:{port}", "--json"])
    time.sleep(0.4)
    probe.send_signal(signal.SIGINT)
    stdout, _ = probe.communicate(timeout=5)
    out = json.loads(stdout)
    assert probe.returncode == 0, out
    assert out["sent"] > 0 and out["received"] == out["sent"]


def test_probe_lists_every_pause_over_the_threshold(procs, bins):
    """Each stop of the server is one pause, with when it began and how long it was."""
    server, port = start_echo_server(procs, bins)
    probe = procs.start([bins["tcp-probe"], "--connect", f"127.0.0.1:{port}", "--json", "--pause-ms", "40"])
    time.sleep(0.5)
    for stopped in (0.25, 0.1):
        server.send_signal(signal.SIGSTOP)
        time.sleep(stopped)
        server.send_signal(signal.SIGCONT)
        time.sleep(0.4)
    probe.send_signal(signal.SIGINT)
    out = json.loads(probe.communicate(timeout=10)[0])
    assert probe.returncode == 0, out
    assert out["pauses"] == 2 and len(out["pauses_ms"]) == 2, out
    (at1, len1), (at2, len2) = out["pauses_ms"]
    assert 250 <= len1 < 900 and 100 <= len2 < 700 and at1 < at2, out  # at least the stop; the rest is scheduling
    assert abs(out["pause_total_ms"] - len1 - len2) < 0.01 and out["max_gap_ms"] == max(len1, len2)


def test_probe_notices_server_death(procs, bins):
    server, port = start_echo_server(procs, bins)
    probe = procs.start([bins["tcp-probe"], "--connect", f"127.0.0.1:{port}", "--json", "--duration", "10"])
    time.sleep(0.4)
    server.kill()
    server.wait(timeout=5)
    killed_at = time.monotonic()
    stdout, _ = probe.communicate(timeout=5)
    assert time.monotonic() - killed_at < 2, "probe did not notice the dead server promptly"
    out = json.loads(stdout)
    assert probe.returncode == 1, out
    assert out["reset"] or out["eof"]


def test_probe_expect_close(procs, bins):
    _, port = start_echo_server(procs, bins, "--close-after-ms", "300")
    t0 = time.monotonic()
    rc, out = run_probe(bins, port, "--expect-close", "--duration", "10")
    assert time.monotonic() - t0 < 3, "probe did not exit promptly after the server closed"
    assert rc == 0, out
    assert out["eof"] is True and out["reset"] is False and out["wrong"] == 0
    assert out["received"] > 0

    # The same close without --expect-close is a failure.
    rc, out = run_probe(bins, port, "--duration", "10")
    assert rc == 1 and out["eof"] is True

    # --expect-close but the server never closes: failure too.
    _, port2 = start_echo_server(procs, bins)
    rc, out = run_probe(bins, port2, "--expect-close", "--duration", "0.3")
    assert rc == 1 and out["eof"] is False


def test_probe_connection_refused(bins):
    import socket

    with socket.socket() as s:  # a port with (almost certainly) nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out = run_probe(bins, port, "--duration", "1")
    assert rc == 1 and out["error"].startswith("connect:")


@pytest.mark.parametrize("prog, argv, msg", [
    ("echo-server", [], "missing required option --port"),
    ("echo-server", ["--port", "65536"], "invalid value '65536' for --port"),
    ("echo-server", ["--port", "1", "--bind", "localhost"], "invalid --bind address"),
    ("tcp-probe", [], "missing required option --connect"),
    ("tcp-probe", ["--connect", "127.0.0.1"], "expected ADDR:PORT"),
    ("tcp-probe", ["--connect", "127.0.0.1:1", "--interval-ms", "0"], "invalid value '0' for --interval-ms"),
    ("tcp-probe", ["--connect", "127.0.0.1:1", "--duration", "abc"], "invalid value 'abc' for --duration"),
])
def test_usage_errors(bins, prog, argv, msg):
    res = subprocess.run([str(bins[prog]), *argv], capture_output=True, text=True, timeout=5)
    assert res.returncode == 2 and msg in res.stderr, res.stderr


@pytest.mark.parametrize("prog", PROGRAMS)
def test_help(bins, prog):
    res = subprocess.run([str(bins[prog]), "--help"], capture_output=True, text=True, timeout=5)
    assert res.returncode == 0 and res.stdout.startswith("Usage: " + prog)
