"""`make demo`: a live migration in the lab, there and back.

Brings the lab up, runs a container on alpha holding 64 MiB and rewriting
4 MiB/s plus a counter, migrates it to beta and back, prints both reports,
shows the counter still increasing and the memory intact, and takes the lab
down (`--keep` leaves it up).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CT = "demo"
WORKLOAD = (
    "memload --size 64 --rate 4 & "
    "i=0; while :; do i=$((i+1)); echo $i > /counter.new; mv /counter.new /counter; sleep 0.1; done"
)


def phaul(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "phaul", *args]
    print(f"$ phaul {' '.join(args)}", flush=True)
    proc = subprocess.run(cmd, text=True, capture_output=capture)
    if proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"demo: `phaul {' '.join(args)}` failed (exit {proc.returncode})")
    return proc.stdout if capture else ""


def in_ct(host: str, *cmd: str) -> str:
    return phaul("--host", host, "ct", "exec", CT, "--", *cmd, capture=True).strip()


def counter(host: str) -> int:
    value = int(in_ct(host, "cat", "/counter"))
    print(f"  counter on {host}: {value}")
    return value


def verify_memory(host: str) -> None:
    in_ct(host, "sh", "-c", "rm -f /memload.report; kill -USR1 $(cat /memload.pid)")
    for _ in range(100):
        report = in_ct(host, "sh", "-c", "cat /memload.report 2>/dev/null || true")
        if report:
            print(f"  memory check on {host}: {report}")
            if not report.startswith("ok"):
                raise SystemExit("demo: the container's memory is damaged")
            return
        time.sleep(0.1)
    raise SystemExit("demo: memload did not answer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the lab and the container up")
    args = parser.parse_args()
    phaul("lab", "up")
    ok = False
    try:
        phaul("--host", "alpha", "ct", "create", CT, "--memory", "256M")
        phaul("--host", "alpha", "ct", "start", CT, "--", "/bin/sh", "-c", WORKLOAD)
        time.sleep(2)
        phaul("--host", "alpha", "ct", "list")
        verify_memory("alpha")
        for src, dst in (("alpha", "beta"), ("beta", "alpha")):
            before = counter(src)
            phaul("--host", src, "migrate", CT, dst)
            after = counter(dst)
            time.sleep(1)
            later = counter(dst)
            if not before <= after < later:
                raise SystemExit(f"demo: the counter did not carry on ({before}, {after}, {later})")
            verify_memory(dst)
        phaul("--host", "alpha", "ct", "list")
        print("demo: the container moved alpha -> beta -> alpha, running all along")
        ok = True
    finally:
        if not args.keep:
            subprocess.run([sys.executable, "-m", "phaul", "--host", "alpha", "ct", "destroy", CT], capture_output=True)
            subprocess.run([sys.executable, "-m", "phaul", "--host", "beta", "ct", "destroy", CT], capture_output=True)
            phaul("lab", "down", capture=True)
        elif ok:
            print("demo: the lab is still up (`phaul lab status`; `phaul lab down` removes it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
