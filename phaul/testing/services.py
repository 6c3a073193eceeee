"""Real services in the lab and their standard load clients (tests/test_services.py, bench/run.py).

Debian's own packages in a `debian` template container, run with Debian's configuration
(no systemd: the service itself is the container's PID 1, started by a one-line shell that
makes the runtime directories systemd would have made), as the packages' own users:

- redis: `redis-server /etc/redis/redis.conf`, in the foreground and listening on the
  container's address; driven by `redis-benchmark` (SET, GET, INCR, LPUSH, in chunks) and a
  `redis-cli --pipe` writer holding one connection through every migration;
- nginx: `nginx` from /etc/nginx serving static files from /var/www/html; driven by `wrk`
  with a Lua script (wrk_check.lua) that compares every body it receives with the file.

Clients run in the lab's client namespace (`in_client`). Each client's output is parsed
into `ClientFigures`: requests completed, errors (failed, reset, timed out, wrong answers)
and the longest request latency, which is the longest stall the client saw.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phaul.errors import ToolFailed
from phaul.testing import lab

log = logging.getLogger(__name__)

PACKAGES = ("redis-server", "nginx")  # one package set, so one cached template serves both services
REDIS_PORT, HTTP_PORT = 6379, 80
WRK_SCRIPT = Path(__file__).with_name("wrk_check.lua")
WWW = Path("var/www/html")  # Debian's default site root, relative to the root file system
CLIENT_TIMEOUT = 120.0  # s: a client run that takes longer has hung


def in_client(args: Sequence[str]) -> list[str]:
    """`args` run in the lab's client namespace."""
    return ["nsenter", f"--net=/run/netns/{lab.NETNS['client']}", "--", *args]


# --- the services ---------------------------------------------------------------------


def redis_command() -> list[str]:
    """The container's command: Debian's redis-server with /etc/redis/redis.conf, in the
    foreground, on every address, as the package's user `redis` (systemd's User=redis).
    Protected mode is off: it refuses every client off the loopback when no password is set."""
    script = (
        "mkdir -p /run/redis && chown redis:redis /run/redis /var/log/redis /var/lib/redis && "
        "exec setpriv --reuid=redis --regid=redis --init-groups redis-server /etc/redis/redis.conf "
        "--daemonize no --bind 0.0.0.0 --protected-mode no"
    )
    return ["/bin/sh", "-c", script]


def nginx_command() -> list[str]:
    """The container's command: Debian's nginx with /etc/nginx, its master in the foreground
    (root) and its workers as www-data (the package's nginx.conf)."""
    return ["/usr/sbin/nginx", "-g", "daemon off;"]


def write_site(rootfs: Path, local: Path, seed: int = 11) -> dict[str, Path]:
    """Static files of several sizes into the container's /var/www/html and a copy into
    `local` (what the client compares with); returns URL path -> local copy."""
    rng = random.Random(seed)
    local.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, size in (("small.bin", 1024), ("medium.bin", 64 * 1024), ("large.bin", 1024 * 1024), ("page.html", 5000)):
        data = rng.randbytes(size)
        (rootfs / WWW / name).write_bytes(data)
        (local / name).write_bytes(data)
        files[f"/{name}"] = local / name
    return files


# --- what a client reports ---------------------------------------------------------------


@dataclass
class ClientFigures:
    """One client's account of a run: requests completed, errors, the longest latency."""

    client: str
    requests: int = 0
    errors: int = 0
    max_latency_ms: float = 0.0
    runs: int = 0  # client invocations summed here
    problems: list[str] = field(default_factory=list)  # what the client said about each error

    def add(self, other: ClientFigures) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.max_latency_ms = max(self.max_latency_ms, other.max_latency_ms)
        self.runs += other.runs
        self.problems += other.problems

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return f"{self.client}: {self.requests} requests, {self.errors} errors, longest {self.max_latency_ms:.1f} ms"


def parse_redis_benchmark(rc: int, stdout: str, stderr: str, requests_per_test: int) -> tuple[ClientFigures, dict[str, int]]:
    """Figures from one `redis-benchmark --csv -e` run, and the requests completed per test
    ("SET", "INCR", ...). A test appears in the CSV only once all its requests were answered;
    the client exits non-zero on a connection error ("Error: Connection reset by peer") and
    prints "Error from server: ..." for an error reply (-e)."""
    fig = ClientFigures("redis-benchmark", runs=1)
    done: dict[str, int] = {}
    for row in csv.DictReader(io.StringIO(stdout)):
        if not row.get("test") or row.get("max_latency_ms") is None:
            continue
        done[row["test"]] = done.get(row["test"], 0) + requests_per_test
        fig.max_latency_ms = max(fig.max_latency_ms, float(row["max_latency_ms"]))
    fig.requests = sum(done.values())
    problems = [line.strip() for line in (stdout + "\n" + stderr).splitlines() if "Error" in line]
    if rc != 0 and not problems:
        problems = [f"redis-benchmark exited {rc}: {stderr.strip()[-300:]}"]
    fig.errors, fig.problems = len(problems), problems
    return fig, done


_PIPE_RESULT = re.compile(r"errors: (\d+), replies: (\d+)")


def parse_redis_pipe(rc: int, stdout: str, stderr: str, sent: int) -> ClientFigures:
    """Figures from `redis-cli --pipe` ("errors: E, replies: R"): every command sent must be
    answered, without an error."""
    fig = ClientFigures("redis-cli --pipe", runs=1)
    m = _PIPE_RESULT.search(stdout)
    if m is None:
        fig.errors, fig.problems = 1, [f"redis-cli --pipe exited {rc} without its summary: {(stdout + stderr).strip()[-300:]}"]
        return fig
    errors, replies = int(m.group(1)), int(m.group(2))
    fig.requests, fig.errors = replies, errors + abs(sent - replies) + (rc != 0)
    if fig.errors:
        fig.problems = [f"redis-cli --pipe: {sent} sent, {replies} replies, {errors} errors, exit {rc}"]
    return fig


WRK_ERRORS = ("connect", "read", "write", "status", "timeout", "mismatched")


def parse_wrk(rc: int, stdout: str, stderr: str) -> ClientFigures:
    """Figures from a `wrk -s wrk_check.lua` run: the JSON line its done() prints.
    Errors: wrk's socket errors (connect, read, write, timeout), non-2xx/3xx answers and
    bodies that differ from the file."""
    fig = ClientFigures("wrk", runs=1)
    report = None
    for line in stdout.splitlines():
        if line.startswith("{"):
            report = json.loads(line)
    if report is None:
        fig.errors, fig.problems = 1, [f"wrk exited {rc} without its report: {(stdout + stderr).strip()[-300:]}"]
        return fig
    fig.requests = int(report["requests"])
    fig.max_latency_ms = report["latency_max_us"] / 1000
    fig.errors = sum(int(report[k]) for k in WRK_ERRORS) + (rc != 0)
    if fig.errors:
        fig.problems = [f"wrk: {', '.join(f'{k} {report[k]}' for k in WRK_ERRORS if report[k])}, exit {rc}"]
    return fig


# --- redis clients ------------------------------------------------------------------------

REDIS_TESTS = ("SET", "GET", "INCR", "LPUSH")


@dataclass(frozen=True)
class RedisBenchmark:
    """`redis-benchmark` against `ip`: each run does REDIS_TESTS, `requests` of each, from
    `clients` connections, on keys key:N / counter:N of a `keyspace`, values of `data_size` random bytes."""

    ip: str
    requests: int = 20000
    clients: int = 10
    keyspace: int = 100000
    data_size: int = 64

    def command(self) -> list[str]:
        return in_client([
            "redis-benchmark", "-h", self.ip, "-p", str(REDIS_PORT), "-n", str(self.requests), "-c", str(self.clients),
            "-r", str(self.keyspace), "-d", str(self.data_size), "-t", ",".join(t.lower() for t in REDIS_TESTS), "--csv", "-e",
        ])  # fmt: skip

    def run(self) -> tuple[ClientFigures, dict[str, int]]:
        proc = subprocess.run(self.command(), capture_output=True, text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL)
        return parse_redis_benchmark(proc.returncode, proc.stdout, proc.stderr, self.requests)


class BenchmarkLoop:
    """`redis-benchmark` run after run in a thread, from `start()` to `stop()`: a load
    across a migration whatever its length. `stop()` returns the summed figures; `completed`
    counts the requests answered per test over all runs (for the data checks)."""

    def __init__(self, bench: RedisBenchmark) -> None:
        self.bench = bench
        self.figures = ClientFigures("redis-benchmark")
        self.completed: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="redis-benchmark", daemon=True)

    def start(self) -> BenchmarkLoop:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                fig, done = self.bench.run()
            except (OSError, subprocess.SubprocessError) as e:
                fig, done = ClientFigures("redis-benchmark", errors=1, runs=1, problems=[str(e)]), {}
            self.figures.add(fig)
            for test, n in done.items():
                self.completed[test] = self.completed.get(test, 0) + n

    def stop(self) -> ClientFigures:
        self._stop.set()
        self._thread.join(CLIENT_TIMEOUT + 10)
        return self.figures


def _value(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def expected_values(keys: Iterable[str]) -> dict[str, str]:
    """The value `PipeWriter`/`load_keys` store under each key."""
    return {k: _value(k) for k in keys}


class PipeWriter:
    """`redis-cli --pipe` holding one connection: SET `prefix`N to a value derived from the
    key, one command every `interval` s from `start()` until `stop()`. `keys` lists what was sent."""

    def __init__(self, ip: str, prefix: str = "live:", interval: float = 0.005) -> None:
        self.ip, self.prefix, self.interval = ip, prefix, interval
        self.keys: list[str] = []
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._feed, name="redis-cli-pipe", daemon=True)
        self._broken = ""

    def start(self) -> PipeWriter:
        self._proc = subprocess.Popen(
            in_client(["redis-cli", "-h", self.ip, "-p", str(REDIS_PORT), "--pipe"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._thread.start()
        return self

    def _feed(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        i = 0
        while not self._stop.is_set():
            key = f"{self.prefix}{i}"
            try:
                self._proc.stdin.write(f"SET {key} {_value(key)}\r\n")
                self._proc.stdin.flush()
            except OSError as e:  # redis-cli ended: its connection failed
                self._broken = f"redis-cli --pipe stopped reading after {i} commands: {e}"
                return
            self.keys.append(key)
            i += 1
            self._stop.wait(self.interval)

    def stop(self) -> ClientFigures:
        assert self._proc is not None and self._proc.stdin is not None
        self._stop.set()
        self._thread.join(10)
        try:
            out, err = self._proc.communicate(timeout=60)  # closes stdin: redis-cli waits for the last replies
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, err = self._proc.communicate()
        fig = parse_redis_pipe(self._proc.returncode, out, err, len(self.keys))
        if self._broken:
            fig.errors, fig.problems = fig.errors + 1, [*fig.problems, self._broken]
        return fig

    def kill(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()


def redis_cli(ip: str, *args: str, stdin: str | None = None) -> str:
    """`redis-cli --raw` from the client namespace; its output (a failure raises ToolFailed)."""
    cmd = in_client(["redis-cli", "-h", ip, "-p", str(REDIS_PORT), "--raw", *args])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, input=stdin)
    if proc.returncode != 0 or proc.stdout.startswith("ERR") or "Could not connect" in proc.stderr:
        output = (proc.stdout + proc.stderr).strip()[-300:]
        raise ToolFailed(f"{shlex.join(cmd)} failed ({proc.returncode}): {output}", "see the output")
    return proc.stdout


def load_keys(ip: str, keys: Sequence[str]) -> ClientFigures:
    """SET every key to its value with `redis-cli --pipe`; the client's figures."""
    body = "".join(f"SET {k} {_value(k)}\r\n" for k in keys)
    cmd = in_client(["redis-cli", "-h", ip, "-p", str(REDIS_PORT), "--pipe"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, input=body)
    return parse_redis_pipe(proc.returncode, proc.stdout, proc.stderr, len(keys))


def read_keys(ip: str, keys: Sequence[str], batch: int = 1000) -> dict[str, str]:
    """The values of `keys` as the server has them now (MGET in batches; a missing key reads "")."""
    cmds = "".join("MGET " + " ".join(keys[i : i + batch]) + "\n" for i in range(0, len(keys), batch))
    values = redis_cli(ip, stdin=cmds).split("\n")
    return dict(zip(keys, values, strict=False))


def wrong_keys(ip: str, keys: Sequence[str]) -> list[str]:
    """The keys whose value on the server is not the one written (missing ones too)."""
    want = expected_values(keys)
    got = read_keys(ip, keys)
    return [k for k in keys if got.get(k) != want[k]]


_SUM_COUNTERS = (
    "local s = 0 for _, k in ipairs(redis.call('KEYS', 'counter:*')) do s = s + tonumber(redis.call('GET', k)) end return s"
)


def benchmark_state(ip: str, bench: RedisBenchmark) -> dict[str, int]:
    """What redis-benchmark's writes left on the server: the sum of its INCR counters, the
    length of its LPUSH list, and the number of SET keys whose value is not `data_size` bytes
    (its values are random). With no error, the first two equal the INCR and LPUSH requests completed."""
    wrong_script = (
        "local n = 0 for _, k in ipairs(redis.call('KEYS', 'key:*')) do "
        f"if redis.call('STRLEN', k) ~= {bench.data_size} then n = n + 1 end end return n"
    )
    return {
        "INCR": int(redis_cli(ip, "EVAL", _SUM_COUNTERS, "0").strip()),
        "LPUSH": int(redis_cli(ip, "LLEN", "mylist").strip()),
        "wrong SET values": int(redis_cli(ip, "EVAL", wrong_script, "0").strip()),
    }


def wait_redis(ip: str, timeout: float = 30.0) -> None:
    """Wait until the server at `ip` answers PING from the client namespace."""
    _wait(lambda: _ok(in_client(["redis-cli", "-h", ip, "-p", str(REDIS_PORT), "PING"]), "PONG"), timeout, f"redis at {ip}")


# --- http clients ----------------------------------------------------------------------------


class Wrk:
    """`wrk` against http://`ip`/ from `start()` until `stop()` (SIGINT: wrk prints its
    summary), requesting each of `files` (URL path -> the local copy) in turn."""

    def __init__(
        self, ip: str, files: dict[str, Path], *, threads: int = 1, connections: int = 8, timeout_s: int = 10
    ) -> None:
        pairs = [str(x) for path, local in files.items() for x in (path, local)]
        self.cmd = in_client([
            "wrk", "-t", str(threads), "-c", str(connections), "-d", "3600s", "--timeout", f"{timeout_s}s",
            "-s", str(WRK_SCRIPT), f"http://{ip}:{HTTP_PORT}/", *pairs,
        ])  # fmt: skip
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> Wrk:
        self._proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self

    def stop(self) -> ClientFigures:
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            out, err = self._proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, err = self._proc.communicate()
        return parse_wrk(self._proc.returncode, out, err)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()


def fetch(ip: str, path: str) -> bytes:
    """GET http://`ip``path` with curl from the client namespace; the body (a non-2xx fails)."""
    cmd = in_client(["curl", "-sSf", "--max-time", "30", f"http://{ip}:{HTTP_PORT}{path}"])
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0:
        error = proc.stderr.decode(errors="replace").strip()
        raise ToolFailed(f"{shlex.join(cmd)} failed ({proc.returncode}): {error}", "see the error")
    return proc.stdout


def wait_http(ip: str, timeout: float = 30.0) -> None:
    """Wait until nginx at `ip` answers from the client namespace."""
    cmd = in_client(["curl", "-sf", "-o", "/dev/null", "--max-time", "2", f"http://{ip}:{HTTP_PORT}/"])
    _wait(lambda: subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0, timeout, f"nginx at {ip}")


# --- helpers ---------------------------------------------------------------------------------


def _ok(cmd: list[str], expect: str) -> bool:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    return proc.returncode == 0 and proc.stdout.strip() == expect


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise ToolFailed(f"{what} did not answer within {timeout:g} s", "see the container's log: phaul ct logs")
        time.sleep(0.2)
