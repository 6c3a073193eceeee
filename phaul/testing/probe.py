"""The project's TCP/UDP probe (workloads/tcp-probe.c, found by phaul.containers.workloads) run from a lab namespace against
a container's echo server: a short one that opens a fresh connection, or a long one that
holds one connection through migrations until `stop()`. Results are tcp-probe's JSON."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

from phaul.containers import workloads


def probe_cmd(ns: str, address: str, *args: str) -> list[str]:
    """tcp-probe from network namespace `ns` (a /run/netns name) to `address` (IP:PORT), JSON out."""
    probe = workloads.find().program("tcp-probe")
    return ["nsenter", f"--net=/run/netns/{ns}", "--", str(probe), "--connect", address, "--json", *args]


def _result(returncode: int, out: str, err: str) -> tuple[int, dict[str, Any]]:
    return returncode, json.loads(out) if out.strip() else {"error": err.strip()[-300:] or f"no result (exit {returncode})"}


def short_probe(ns: str, address: str, *args: str, seconds: float = 0.3) -> tuple[int, dict[str, Any]]:
    """A new connection (or UDP flow) held for `seconds`: (exit status, result)."""
    r = subprocess.run(probe_cmd(ns, address, "--duration", str(seconds), *args), check=False, capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    return _result(r.returncode, r.stdout, r.stderr)


class LongProbe:
    """A probe holding one connection from namespace `ns` until `stop()`."""

    def __init__(self, ns: str, address: str, *args: str) -> None:
        self.proc = subprocess.Popen(probe_cmd(ns, address, *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def stop(self) -> tuple[int, dict[str, Any]]:
        """End it (SIGINT: it drains outstanding echoes and closes cleanly): (exit status, result)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait(30)

    def wait(self, timeout: float) -> tuple[int, dict[str, Any]]:
        out, err = self.proc.communicate(timeout=timeout)
        return _result(self.proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
