"""Shared fixtures: the lab (real namespaces, agents, TLS) and the CLI."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_LAB_DIR = Path("/var/lib/phaul-lab-test")
TEST_SUBNET = "10.213.9.0/24"


@dataclass
class Lab:
    dir: Path
    hosts_file: Path

    def phaul(self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real CLI against this lab."""
        cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(self.hosts_file), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def migrate(self, ct: str, src: str, dst: str, *extra: str, check: bool = True, fault: str = "") -> dict:
        """Migrate `ct` with the CLI; `fault` ("STEP:KIND") is armed first (`arm_fault`)."""
        if fault:
            self.arm_fault(src, dst, fault)
        proc = self.phaul("--host", src, "migrate", ct, dst, "--json", *extra, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"migrate {ct} {src}->{dst}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {"exit": proc.returncode, "stderr": proc.stderr}

    def ct_list(self, host: str) -> list[dict]:
        return json.loads(self.phaul("--host", host, "ct", "list", "--json").stdout)["containers"]

    def exec(self, host: str, ct: str, *cmd: str) -> str:
        return self.phaul("--host", host, "ct", "exec", ct, "--", *cmd).stdout

    def counter(self, host: str, ct: str) -> int:
        return int(self.exec(host, ct, "cat", "/counter"))

    def state_dir(self, host: str) -> Path:
        return self.dir / "hosts" / host

    def rootfs(self, host: str, ct: str) -> Path:
        """The container's root file system as the host sees it (no agent needed)."""
        return self.state_dir(host) / "containers" / ct / "bundle" / "rootfs"

    def arm_fault(self, src: str, dst: str, fault: str) -> None:
        """Arm `fault` ("STEP:KIND") for the next migration src -> dst, on the agent that
        makes it happen (phaul.testing.faults): the destination's for damage-image, else the source's."""
        from phaul.testing import faults

        faults.arm(self.state_dir(dst if faults.Fault.parse(fault).role == "destination" else src), fault)

    def disarm_faults(self) -> None:
        """Remove the faults armed and not taken (a test that failed before its migration)."""
        from phaul.testing import faults

        for host in ("alpha", "beta"):
            (self.state_dir(host) / faults.ARM_FILE).unlink(missing_ok=True)

    def destroy_all(self) -> None:
        for host in ("alpha", "beta"):
            for c in self.ct_list(host):
                self.phaul("--host", host, "ct", "destroy", c["id"], check=False)


LAB_LOCK = Path("/run/lock/phaul-lab.lock")
_lock_depth = 0
_lock_file = None


@contextlib.contextmanager
def lab_lock() -> Iterator[None]:
    """Lab namespace names are fixed: test sessions (and `make demo`) take turns.
    Re-entrant within one process."""
    global _lock_depth, _lock_file
    if _lock_depth == 0:
        LAB_LOCK.parent.mkdir(parents=True, exist_ok=True)
        _lock_file = open(LAB_LOCK, "w")
        fcntl.flock(_lock_file, fcntl.LOCK_EX)
    _lock_depth += 1
    try:
        yield
    finally:
        _lock_depth -= 1
        if _lock_depth == 0 and _lock_file is not None:
            _lock_file.close()
            _lock_file = None


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The two-host lab, built once per test session and always taken down.
    Namespace names are fixed, so concurrent sessions take turns (LAB_LOCK)."""
    from phaul.testing import lab as lab_mod

    with lab_lock():
        yield from _lab_session(lab_mod)


def _lab_session(lab_mod) -> Iterator[Lab]:  # type: ignore[no-untyped-def]
    os.environ["PHAUL_LAB_DIR"] = str(TEST_LAB_DIR)
    os.environ[lab_mod.FAULT_INJECTION_ENV] = "1"
    take_down_any_lab()
    lab_mod.down(TEST_LAB_DIR)
    try:
        lab_mod.up(TEST_SUBNET, lab_dir=TEST_LAB_DIR)
        yield Lab(TEST_LAB_DIR, TEST_LAB_DIR / "hosts.json")
    finally:
        lab_mod.down(TEST_LAB_DIR)
        os.environ.pop("PHAUL_LAB_DIR", None)


@pytest.fixture
def clean_lab(lab: Lab) -> Iterator[Lab]:
    """The lab, emptied of containers after the test whatever happened."""
    yield lab
    lab.disarm_faults()
    lab.destroy_all()


def take_down_any_lab() -> None:
    """Lab namespace names are fixed: a lab left up by anything else (a kept demo,
    a killed run) is taken down, with a warning, before the tests build theirs."""
    from phaul.testing import lab as lab_mod

    if not set(_netns()) & set(lab_mod.ALL_NAMESPACES):
        return
    owner = lab_mod._owner()
    warnings.warn(f"taking down the lab left up in {owner or 'an unknown directory'}")
    lab_mod.down(Path(owner) if owner else TEST_LAB_DIR)
    if set(_netns()) & set(lab_mod.ALL_NAMESPACES):  # its directory is gone: remove what remains
        for ns in lab_mod.ALL_NAMESPACES:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# One step of a counter workload. The value is written beside /counter and renamed over it, so
# a reader (or a dump) never meets the empty file a plain `echo > /counter` leaves for a moment.
COUNT_STEP = "i=$((i+1)); echo $i > /counter.new; mv /counter.new /counter"
COUNTER = ["/bin/sh", "-c", f"i=0; while :; do {COUNT_STEP}; sleep 0.05; done"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """tests/test_lab.py builds and removes labs of its own, which cannot exist
    beside the shared session lab (namespace names are fixed): run it first,
    before any test asks for the shared lab."""
    items.sort(key=lambda item: 0 if item.path.name == "test_lab.py" else 1)
