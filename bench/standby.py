"""Standby and failover figures in the lab (not asserted anywhere; printed, and kept in
bench/results/standby.json).

For each --interval: a container on alpha running the echo server and a counter gets a
standby on beta; a probe in the client namespace holds one TCP connection to it and
sends every 10 ms (phaul.testing.probe), so each refresh's freeze is a pause the client
sees. After REFRESHES refreshes alpha "dies" (its agent SIGKILLed, the container's
processes killed) at a random moment within an interval, and `phaul failover --fenced`
runs the container on beta. Figures:

- recovery point at failover: the age of the checkpoint beta runs from, at alpha's death
  (what the failover loses), against --interval;
- refresh pause: as `standby status` reports it (freeze to running again) and as the
  client saw it (the probe's pauses over 20 ms);
- bytes per refresh: the first sends the whole memory, later ones a page delta against
  the last kept checkpoint (with --memory, memload holds that many MiB and rewrites
  --rate MiB/s of it, so that the delta has something to save);
- failover time: from the command to the service answering a new connection on beta.

    .venv/bin/python bench/standby.py                    # intervals 2 and 5 s
    .venv/bin/python bench/standby.py --intervals 2,5,10
    .venv/bin/python bench/standby.py --intervals 5 --memory 256 --rate 4
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phaul.testing import lab  # noqa: E402
from phaul.testing import probe as probes  # noqa: E402

LAB_DIR = Path("/var/lib/phaul-lab-standby-bench")
SUBNET = "10.213.9.0/24"
LOCK = Path("/run/lock/phaul-lab.lock")
RESULTS = REPO / "bench" / "results"
ECHO_PORT = 7
PAUSE_MS = 20
REFRESHES = 4
MiB = 1 << 20
CT = "sbbench"
WORKLOAD = ("echo-server --port 7 >/dev/null 2>&1 & i=0; "
            "while :; do i=$((i+1)); echo $i > /counter.new; mv /counter.new /counter; sleep 0.05; done")


def phaul(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(LAB_DIR / "hosts.json"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return r


def row() -> dict[str, Any]:
    rows = json.loads(phaul("standby", "status", "--json").stdout)["standbys"]
    return next((r for r in rows if r["ct"] == CT and r["reported_by"] == "primary"), {})


def wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_one(interval: float, memory_mib: int, rate: float) -> dict[str, Any]:
    ip = lab.container_address(SUBNET, 1)
    address = f"{ip}:{ECHO_PORT}"
    memload = f"memload --size {memory_mib} --rate {rate:g} >/dev/null 2>&1 & " if memory_mib else ""
    phaul("--host", "alpha", "ct", "create", CT, "--memory", f"{64 + memory_mib * 5 // 4}M", "--ip", f"{ip}/24")
    phaul("--host", "alpha", "ct", "start", CT, "--", "/bin/sh", "-c", memload + WORKLOAD)
    wait(lambda: probes.short_probe(lab.NETNS["client"], address, seconds=0.05)[0] == 0, 30, "the echo server")
    probe = probes.LongProbe(lab.NETNS["client"], address, "--interval-ms", "10", "--pause-ms", str(PAUSE_MS))
    try:
        phaul("--host", "alpha", "standby", CT, "beta", "--interval", str(interval), "--max-lag", str(3 * interval))
        seen: dict[int, dict[str, Any]] = {}
        while len(seen) < REFRESHES:
            r = row()
            if r.get("refreshes"):
                seen[r["refreshes"]] = r
            time.sleep(0.2)
        time.sleep(random.uniform(0, interval))  # the failure comes at any moment of an interval
        _, probed = probe.stop()
    finally:
        probe.kill()
    last = row()
    pid = int((LAB_DIR / "hosts" / "alpha" / "agent.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    subprocess.run(["runc", "--root", str(LAB_DIR / "hosts" / "alpha" / "runc"), "kill", CT, "KILL"], check=False)
    died = time.time()
    t0 = time.monotonic()
    done = json.loads(phaul("failover", CT, "--to", "beta", "--fenced", "--json").stdout)
    command_ms = (time.monotonic() - t0) * 1000
    wait(lambda: probes.short_probe(lab.NETNS["client"], address, seconds=0.05)[0] == 0, 60, "the service on beta")
    answering_ms = (time.monotonic() - t0) * 1000
    refresh_rows = [seen[k] for k in sorted(seen)]
    return {
        "interval_s": interval,
        "memory_mib": memory_mib,
        "rewrite_mib_s": rate if memory_mib else 0.0,
        "recovery_point_at_failure_s": died - done["checkpoint_at"],
        "status_recovery_point_before_s": last.get("recovery_point_s"),
        "refresh_pause_ms": [r["pause_ms"] for r in refresh_rows],
        "refresh_bytes": [r["refresh_bytes"] for r in refresh_rows],
        "client_pauses_ms": [length for _, length in probed.get("pauses_ms", [])],
        "failover_command_ms": command_ms,
        "failover_restore_ms": done["restore_ms"],
        "failover_to_service_ms": answering_ms,
    }


def cleanup() -> None:
    lab.up(SUBNET, lab_dir=LAB_DIR)  # alpha's agent again
    for host in ("alpha", "beta"):
        phaul("--host", host, "standby", "stop", CT, check=False)
        phaul("--host", host, "ct", "destroy", CT, check=False)
        for sub in ("standby-out", "standby"):
            subprocess.run(["rm", "-rf", "--", str(LAB_DIR / "hosts" / host / sub)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--intervals", default="2,5", help="comma-separated refresh intervals in seconds")
    ap.add_argument("--memory", type=int, default=0, metavar="MIB", help="memload's memory beside the service (MiB)")
    ap.add_argument("--rate", type=float, default=4.0, metavar="MIB_S", help="what memload rewrites per second")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    intervals = [float(x) for x in args.intervals.split(",") if x]
    if os.geteuid() != 0:
        ap.error("run as root (the lab uses network namespaces, runc and CRIU)")
    os.environ["PHAUL_LAB_DIR"] = str(LAB_DIR)
    runs: list[dict[str, Any]] = []
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        print(f"bench: waiting for the lab lock {LOCK}", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        lab.down(LAB_DIR)
        try:
            lab.up(SUBNET, lab_dir=LAB_DIR)
            for interval in intervals:
                try:
                    runs.append(run_one(interval, args.memory, args.rate))
                finally:
                    cleanup()
        finally:
            lab.down(LAB_DIR)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "standby.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"{'INTERVAL':>8} {'MEMORY':>7} {'RPO AT FAILURE':>15} {'PAUSE (status)':>15} {'CLIENT PAUSES':>22} "
          f"{'1ST REFRESH':>12} {'LATER (MEDIAN)':>15} {'FAILOVER→ANSWER':>16}")
    for r in runs:
        med = statistics.median
        client = r["client_pauses_ms"]
        first, *later = r["refresh_bytes"]
        print(f"{r['interval_s']:>7g}s {r['memory_mib']:>4} MiB {r['recovery_point_at_failure_s']:>14.1f}s "
              f"{med(r['refresh_pause_ms']):>12.0f} ms {len(client):>3} seen, longest {max(client, default=0):>4.0f} ms "
              f"{first / MiB:>8.1f} MiB {med(later or [0]) / MiB:>11.1f} MiB {r['failover_to_service_ms']:>13.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
