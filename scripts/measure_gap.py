"""The client-observed gap of live migrations: `frozen_ms` against a probe's longest gap.

Builds the lab in its own directory (taking the lab lock, as the tests do),
runs an idle container with an address and an echo server on alpha, and
migrates it alpha -> beta -> alpha ... (`--runs`, default 10). Around each
migration a fresh tcp-probe in the client namespace holds one connection to
the container, sends a line every 10 ms and reports the longest gap between
two correct echoes. Prints one row per migration (frozen_ms, the probe's
longest gap, their difference, and the retransmission counters of the
probe's socket: tcpi_total_retrans and the gaps during which it resent), then
the median and the maximum, and takes the lab down. With the client's default
TCP timers a freeze longer than a few RTTs always draws a tail loss probe and,
beyond 200 ms, a retransmission timeout; tests/test_network.py turns those off
to count only the resends a migration caused.

    flock /run/lock/phaul-lab.lock is taken by the script itself:
    .venv/bin/python scripts/measure_gap.py [--runs 10] [--capture DIR] [--json]

`--capture DIR` records every run with tcpdump in the client, alpha and beta
namespaces (the probe's port and ARP only) into DIR/runN-NS.pcap.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phaul.containers import workloads
from phaul.errors import PhaulError
from phaul.testing import lab
from phaul.testing import probe as probes

LAB_LOCK = Path("/run/lock/phaul-lab.lock")
LAB_DIR = Path("/var/lib/phaul-lab-measure")
SUBNET = "10.213.8.0/24"
CT = "gap"
PORT = 7007
SETTLE_S = 1.0  # probe time before and after each migration


def phaul(hosts: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(hosts), *args]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    if check and r.returncode != 0:
        raise SystemExit(f"measure_gap: `phaul {' '.join(args)}` failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *cmd]


@contextlib.contextmanager
def lab_lock() -> Iterator[None]:
    LAB_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LAB_LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def captures(directory: Path | None, run: int) -> Iterator[None]:
    """tcpdump on the probe's port (and ARP) in the client's, alpha's and beta's namespaces."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, ifname in (("client", "phl-client-up"), ("alpha", "phl-alpha-up"), ("beta", "phl-beta-up")):
        out = directory / f"run{run:02d}-{name}.pcap"
        procs.append(subprocess.Popen(
            in_ns(lab.NETNS[name], "tcpdump", "-i", ifname, "-U", "-n", "-w", str(out), f"port {PORT} or arp"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
    time.sleep(0.5)  # tcpdump needs a moment to open its socket
    try:
        yield
    finally:
        time.sleep(0.2)
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def measure(hosts: Path, address: str, runs: int, capture: Path | None, interval_ms: int, udp: bool,
            migrate_args: list[str]) -> list[dict]:
    rows = []
    where = ["alpha", "beta"]
    for i in range(runs):
        src, dst = where[i % 2], where[(i + 1) % 2]
        with captures(capture, i + 1):
            probe = probes.LongProbe(lab.NETNS["client"], f"{address}:{PORT}", "--interval-ms", str(interval_ms),
                                     *(["--udp"] if udp else []))
            time.sleep(SETTLE_S)
            r = phaul(hosts, "--host", src, "migrate", CT, dst, "--json", *migrate_args, check=False)
            time.sleep(SETTLE_S)
            rc, result = probe.stop()
        report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"result": f"exit {r.returncode}", "error": r.stderr}
        if report.get("result") != "ok":
            raise SystemExit(f"measure_gap: migration {i + 1} {src} -> {dst}: {report}")
        row = {
            "run": i + 1, "from": src, "to": dst, "frozen_ms": report["frozen_ms"],
            "gap_ms": result.get("max_gap_ms"),
            # UDP may lose datagrams (they are counted); TCP may lose nothing
            "probe_ok": rc == 0 if not udp else result.get("wrong") == 0 and result.get("received", 0) > 0,
            "reset": result.get("reset"), "missing": result.get("missing"), "wrong": result.get("wrong"),
            "total_retrans": result.get("total_retrans"), "retrans_gaps": result.get("retrans_gaps"),
            "criu_ms": report.get("criu_ms", {}), "memory_method": report.get("memory_method"),
            "rounds": len(report.get("rounds", [])),
        }
        rows.append(row)
        retrans = f"  resent {row['total_retrans']} segment(s) in {row['retrans_gaps']} gap(s)"
        print(f"  run {row['run']:>2} {src:>5} -> {dst:<5} frozen {row['frozen_ms']:7.1f} ms  "
              f"probe gap {row['gap_ms']:7.1f} ms  extra {row['gap_ms'] - row['frozen_ms']:6.1f} ms"
              f"{'' if udp else retrans}"
              f"{'' if row['probe_ok'] else '  PROBE FAILED: ' + json.dumps(result)}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'run':>3}  {'from':<5} {'to':<5} {'frozen_ms':>10} {'probe_gap_ms':>13} {'gap-frozen':>11} {'lost':>5} "
             f"{'resent':>7}  probe"]
    for r in rows:
        resent = "-" if r["total_retrans"] is None else str(r["total_retrans"])
        lines.append(f"{r['run']:>3}  {r['from']:<5} {r['to']:<5} {r['frozen_ms']:>10.1f} {r['gap_ms']:>13.1f} "
                     f"{r['gap_ms'] - r['frozen_ms']:>11.1f} {r['missing']:>5} {resent:>7}  {'ok' if r['probe_ok'] else 'FAILED'}")
    frozen = [r["frozen_ms"] for r in rows]
    gaps = [r["gap_ms"] for r in rows]
    extra = [g - f for f, g in zip(frozen, gaps)]
    lines.append(f"{'median':<15} {statistics.median(frozen):>10.1f} {statistics.median(gaps):>13.1f} {statistics.median(extra):>11.1f}")
    lines.append(f"{'max':<15} {max(frozen):>10.1f} {max(gaps):>13.1f} {max(extra):>11.1f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="migrations to measure (default 10)")
    parser.add_argument("--capture", type=Path, help="record each run with tcpdump into this directory")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--interval-ms", type=int, default=10, help="the probe's send interval (default 10)")
    parser.add_argument("--udp", action="store_true", help="probe the UDP echo instead of a TCP connection")
    parser.add_argument("--precopy", choices=("auto", "off"), default="auto", help="passed to `phaul migrate`")
    args = parser.parse_args()
    try:
        workloads.find().program("tcp-probe")
    except PhaulError as e:
        raise SystemExit(f"measure_gap: {e}") from None
    os.environ[lab.LAB_DIR_ENV] = str(LAB_DIR)
    with lab_lock():
        if any(ns in lab._netns_list() for ns in lab.LAB_NAMESPACES) and not LAB_DIR.exists():
            raise SystemExit("measure_gap: another lab is up: take it down first (`phaul lab down`)")
        lab.down(LAB_DIR)
        try:
            lab.up(SUBNET, lab_dir=LAB_DIR)
            hosts = LAB_DIR / "hosts.json"
            address = lab.container_address(SUBNET, 0)
            phaul(hosts, "--host", "alpha", "ct", "create", CT, "--ip", f"{address}/24")
            phaul(hosts, "--host", "alpha", "ct", "start", CT, "--", "/bin/echo-server", "--port", str(PORT))
            time.sleep(0.5)
            print(f"measure_gap: idle container {CT} at {address}, echo server on port {PORT}; "
                  f"{args.runs} migrations", file=sys.stderr, flush=True)
            rows = measure(hosts, address, args.runs, args.capture, args.interval_ms, args.udp,
                           ["--precopy", args.precopy])
        finally:
            lab.down(LAB_DIR)
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0 if all(r["probe_ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
