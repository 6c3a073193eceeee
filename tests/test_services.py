"""Real services, real clients (issue 11): Debian's redis-server and nginx in a `debian`
container, each under its standard load client in the client namespace, migrated
alpha -> beta -> alpha. Passing: both migrations end `ok`, the client counts no failed,
reset or wrong request, and the data is there afterwards, exactly: every key written
before and during the migrations, redis-benchmark's counters and list, nginx's files
byte for byte and its access log. The client's figures are printed per migration.

The clients and their parsers are phaul.testing.services (bench/run.py uses them too).
"""

from __future__ import annotations

import time

import pytest
from conftest import TEST_SUBNET, Lab

from phaul.testing import lab as lab_mod
from phaul.testing import services

lab = pytest.mark.lab
TEMPLATE = ("--template", "debian", "--packages", ",".join(services.PACKAGES))
ROUTE = (("alpha", "beta"), ("beta", "alpha"))
SETTLE_S = 1.0  # load before and after each migration


def _start(lab_: Lab, ct: str, ip: str, command: list[str]) -> None:
    lab_.phaul("--host", "alpha", "ct", "create", ct, "--ip", f"{ip}/24", *TEMPLATE, timeout=900)
    lab_.phaul("--host", "alpha", "ct", "start", ct, "--", *command)


def _uids(lab_: Lab, host: str, ct: str, name: str) -> set[int]:
    """The real uids of the container's processes named `name`."""
    script = (f'for s in /proc/[0-9]*/status; do grep -q "^Name:.*{name}" $s && sed -n "s/^Uid:\\t\\([0-9]*\\).*/\\1/p" $s; '
              "done; true")
    return {int(u) for u in lab_.exec(host, ct, "/bin/sh", "-c", script).split()}


def _print_figures(service: str, rows: list[tuple[str, str, dict, services.ClientFigures]]) -> None:
    print(f"\n{service}:")
    for src, dst, report, fig in rows:
        print(f"  {src}->{dst}: {report['result']}, frozen {report['frozen_ms']:.0f} ms, total {report['total_ms']:.0f} ms, "
              f"{report['memory_method']}; {fig.summary()} ({fig.runs} runs)")


# -- without the lab: the parsers -------------------------------------------------------

BENCH_CSV = """"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","59880.24","0.204","0.048","0.167","0.367","0.695","3.471"
"GET","56980.05","0.219","0.064","0.207","0.343","0.431","2.943"
"INCR","57142.86","0.223","0.064","0.191","0.415","0.615","412.250"
"""


def test_parse_redis_benchmark() -> None:
    fig, done = services.parse_redis_benchmark(0, BENCH_CSV, "", 20000)
    assert (fig.requests, fig.errors, fig.max_latency_ms) == (60000, 0, 412.25)
    assert done == {"SET": 20000, "GET": 20000, "INCR": 20000}
    header = BENCH_CSV.splitlines()[0] + "\n"
    fig, done = services.parse_redis_benchmark(1, header, "Error: Connection reset by peer\n", 20000)
    assert (fig.requests, fig.errors, done) == (0, 1, {}) and fig.problems == ["Error: Connection reset by peer"]
    fig, _ = services.parse_redis_benchmark(0, BENCH_CSV + "Error from server: ERR wrong type\n", "", 20000)
    assert fig.errors == 1
    fig, _ = services.parse_redis_benchmark(1, "", "", 20000)
    assert fig.errors == 1 and "exited 1" in fig.problems[0]


def test_parse_redis_pipe() -> None:
    out = "All data transferred. Waiting for the last reply...\nLast reply received from server.\nerrors: 0, replies: 7\n"
    fig = services.parse_redis_pipe(0, out, "", 7)
    assert (fig.requests, fig.errors) == (7, 0)
    assert services.parse_redis_pipe(0, out, "", 9).errors == 2  # two commands never answered
    assert services.parse_redis_pipe(1, out.replace("errors: 0", "errors: 3"), "", 7).errors == 4
    assert services.parse_redis_pipe(1, "", "Error writing to the server: Connection reset by peer", 7).errors == 1


def test_parse_wrk() -> None:
    line = ('{"requests": 15420, "duration_us": 3006617, "bytes": 5735368234, "connect": 0, "read": 0, "write": 0, "status": 0, '
            '"timeout": 0, "mismatched": 0, "latency_max_us": 42669, "latency_mean_us": 1803.0, "latency_p99_us": 5629}')
    fig = services.parse_wrk(0, "Running 1h test @ http://10.0.0.1/\n" + line + "\n", "")
    assert (fig.requests, fig.errors, fig.max_latency_ms) == (15420, 0, 42.669)
    fig = services.parse_wrk(0, line.replace('"read": 0', '"read": 2').replace('"mismatched": 0', '"mismatched": 5'), "")
    assert fig.errors == 7 and fig.problems == ["wrk: read 2, mismatched 5, exit 0"]
    assert services.parse_wrk(1, "", "unable to connect to 10.0.0.1:80").errors == 1


# -- in the lab -------------------------------------------------------------------------


@lab
def test_redis_under_redis_benchmark(clean_lab: Lab) -> None:
    ip = lab_mod.container_address(TEST_SUBNET, 20)
    _start(clean_lab, "redis", ip, services.redis_command())
    services.wait_redis(ip)
    before = [f"pre:{i}" for i in range(20000)]
    loaded = services.load_keys(ip, before)
    assert (loaded.requests, loaded.errors) == (len(before), 0), loaded
    bench = services.RedisBenchmark(ip)
    writer = services.PipeWriter(ip).start()  # one connection through both migrations
    loops: list[services.BenchmarkLoop] = []
    rows = []
    try:
        for src, dst in ROUTE:
            loops.append(services.BenchmarkLoop(bench).start())
            time.sleep(SETTLE_S)
            report = clean_lab.migrate("redis", src, dst)
            time.sleep(SETTLE_S)
            rows.append((src, dst, report, loops[-1].stop()))
            assert report["result"] == "ok", report
        pipe = writer.stop()
    finally:
        for loop in loops:
            loop.stop()
        writer.kill()
    _print_figures("redis", rows)
    print(f"  throughout: {pipe.summary()}")
    for src, dst, _, fig in rows:
        assert fig.errors == 0 and fig.requests > 0, (src, dst, fig)
    assert pipe.errors == 0 and pipe.requests == len(writer.keys) > 0, pipe
    assert services.wrong_keys(ip, before + writer.keys) == []
    completed = {t: sum(loop.completed.get(t, 0) for loop in loops) for t in ("INCR", "LPUSH")}
    assert services.benchmark_state(ip, bench) == {**completed, "wrong SET values": 0}
    [info] = clean_lab.ct_list("alpha")
    assert info["state"] == "running" and clean_lab.ct_list("beta") == []
    uid = int(clean_lab.exec("alpha", "redis", "id", "-u", "redis").strip())
    assert _uids(clean_lab, "alpha", "redis", "redis-server") == {uid}  # the package's user, kept through both moves


@lab
def test_nginx_under_wrk(clean_lab: Lab, tmp_path) -> None:
    ip = lab_mod.container_address(TEST_SUBNET, 21)
    clean_lab.phaul("--host", "alpha", "ct", "create", "nginx", "--ip", f"{ip}/24", *TEMPLATE, timeout=900)
    files = services.write_site(clean_lab.rootfs("alpha", "nginx"), tmp_path / "site")
    clean_lab.phaul("--host", "alpha", "ct", "start", "nginx", "--", *services.nginx_command())
    services.wait_http(ip)
    rows = []
    for src, dst in ROUTE:
        wrk = services.Wrk(ip, files).start()
        try:
            time.sleep(SETTLE_S)
            report = clean_lab.migrate("nginx", src, dst)
            time.sleep(SETTLE_S)
            rows.append((src, dst, report, wrk.stop()))
        finally:
            wrk.kill()
        assert report["result"] == "ok", report
    _print_figures("nginx", rows)
    for src, dst, _, fig in rows:
        assert fig.errors == 0 and fig.requests > 0, (src, dst, fig)
    for path, local in files.items():
        assert services.fetch(ip, path) == local.read_bytes(), path
    served = int(clean_lab.exec("alpha", "nginx", "/bin/sh", "-c", "grep -c '\" 200 ' /var/log/nginx/access.log").strip())
    assert served >= sum(fig.requests for *_, fig in rows) + len(files), served  # the log written while it moved is all there
    [info] = clean_lab.ct_list("alpha")
    assert info["state"] == "running" and clean_lab.ct_list("beta") == []
    uid = int(clean_lab.exec("alpha", "nginx", "id", "-u", "www-data").strip())
    workers = _uids(clean_lab, "alpha", "nginx", "nginx")
    assert workers == {0, uid}, workers  # the master as root, its workers as www-data
