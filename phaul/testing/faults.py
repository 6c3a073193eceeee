"""Test-only fault injection: make a chosen fault happen at a chosen step.

A step hook (phaul.migration.steps) that the test agent plugs in
(`python -m phaul.testing.agent ... --enable-fault-injection`; the lab starts
that agent when PHAUL_LAB_FAULT_INJECTION=1). The production agent has no
hook and no way to arm one.

Arming: the test writes "STEP:KIND" into STATE/faults/arm of the agent
concerned (`arm`), the destination's for `damage-image`, the source's
otherwise. That agent's next new migration (at preflight on the source, at
prepare on the destination) takes the armed fault, consuming the file, so it
applies to exactly that migration. A fault happens once, the first time its
step begins.

Kinds:
- `fail`: the step fails (a PhaulError), as a tool failing there would (source);
- `damage-image`: the destination damages the images before restoring them;
- `break-rootfs`: the destination removes the container's /bin/busybox before
  restoring: CRIU itself fails (the images are sound, a file they name is gone);
- `kill-agent`: the source agent kills itself (SIGKILL) as the step begins;
- `pause`: the source agent stops as the step begins, writes
  STATE/faults/paused ("MIGRATION-ID STEP"), and goes on once the test removed
  that file (or after PAUSE_LIMIT s). The test makes its fault happen meanwhile:
  it kills an agent or CRIU, cuts the link, fills a disk, damages images.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import InvalidInput, ToolFailed
from phaul.linux.fsutil import write_atomic
from phaul.migration.steps import Role, Step, StepHook, StepPoint

log = logging.getLogger(__name__)

# The steps a fault can be armed at: those the source announces ("precopy" begins
# the first pre-copy round; "precopy-2" follows it: the second round, or the final dump).
STEPS = tuple(s.value for s in Step if s is not Step.PREPARE)
# The step boundaries the fault matrix breaks (tests/test_faults.py, scripts/fault_table.py):
# all but "resume", which follows the commit at once, and "postcopy", which only post-copy meets
# (tests/test_postcopy.py breaks it: the fault table's `postcopy` row).
MATRIX_STEPS = tuple(s for s in STEPS if s not in (Step.RESUME, Step.POSTCOPY))
KINDS = ("fail", "damage-image", "break-rootfs", "kill-agent", "pause")
DESTINATION_KINDS = ("damage-image", "break-rootfs")
PAUSE_LIMIT = 120.0  # s
ARM_FILE = Path("faults") / "arm"  # in the agent's state directory
PAUSED_FILE = Path("faults") / "paused"


@dataclass(frozen=True)
class Fault:
    step: str
    kind: str

    @classmethod
    def parse(cls, text: str) -> Fault:
        """A validated fault from "STEP:KIND"."""
        step, _, kind = text.strip().partition(":")
        if step not in STEPS or kind not in KINDS:
            raise InvalidInput(
                f"unknown fault {text.strip()[:40]!r}", f"write STEP:KIND with STEP in {STEPS} and KIND in {KINDS}"
            )
        return cls(step, kind)

    @property
    def role(self) -> Role:
        """The side that makes it happen."""
        return "destination" if self.kind in DESTINATION_KINDS else "source"

    def __str__(self) -> str:
        return f"{self.step}:{self.kind}"


def arm(state_dir: Path, fault: str) -> Path:
    """Arm `fault` ("STEP:KIND", validated) for the next migration of the agent
    whose state directory is `state_dir`; returns the file written."""
    Fault.parse(fault)
    path = state_dir / ARM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, fault.strip() + "\n")
    return path


def take_armed(state_dir: Path, migration_id: str) -> Fault | None:
    """The fault armed on this agent (consumed), or None."""
    path = state_dir / ARM_FILE
    claimed = path.with_name(f"{path.name}.{migration_id}")
    try:
        path.rename(claimed)  # atomic: one migration takes it
    except FileNotFoundError:
        return None
    try:
        text = claimed.read_text(errors="replace")
    finally:
        claimed.unlink(missing_ok=True)
    try:
        return Fault.parse(text)
    except InvalidInput as e:
        log.error("fault injection: migration %s: %s armed in %s: %s", migration_id, e.message, path, e.hint)
        raise


class FaultHook(StepHook):
    """Makes the armed faults happen, each in the migration that took it."""

    def __init__(self) -> None:
        self._faults: dict[str, Fault] = {}  # migration ID -> its fault, until it fires
        self._lock = threading.Lock()

    def at(self, step: str, point: StepPoint) -> None:
        if step in (Step.PREFLIGHT, Step.PREPARE):
            self._take(point)
        with self._lock:
            fault = self._faults.get(point.migration_id)
            if fault is None or fault.step != step or (fault.kind in DESTINATION_KINDS and point.image_dir is None):
                return
            del self._faults[point.migration_id]  # a fault happens once
        log.warning("fault injection: migration %s: %s at %s", point.migration_id, fault.kind, step)
        if fault.kind == "damage-image":
            assert point.image_dir is not None
            damage_images(point.image_dir)
        elif fault.kind == "break-rootfs":
            if point.ct_dir is not None:
                (point.ct_dir / "bundle" / "rootfs" / "bin" / "busybox").unlink(missing_ok=True)
        elif fault.kind == "fail":
            raise ToolFailed(f"injected fault at {step}")
        elif fault.kind == "kill-agent":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.kind == "pause":
            pause(point.state_dir, point.migration_id, step)

    def _take(self, point: StepPoint) -> None:
        """A new migration: it takes the fault armed on this agent, if any."""
        fault = take_armed(point.state_dir, point.migration_id)
        if fault is None:
            return
        if fault.role != point.role:
            log.warning("fault injection: migration %s took %s, which only the %s makes happen: ignored",
                        point.migration_id, fault, fault.role)
            return
        log.warning("fault injection: migration %s (%s) takes %s", point.migration_id, point.role, fault)
        with self._lock:
            self._faults[point.migration_id] = fault


def pause(state_dir: Path, migration_id: str, step: str) -> None:
    """Wait at `step` until the test removes STATE/faults/paused."""
    marker = state_dir / PAUSED_FILE
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, f"{migration_id} {step}\n")  # readers never see it half written
    log.warning("fault injection: paused at %s; remove %s to go on", step, marker)
    deadline = time.monotonic() + PAUSE_LIMIT
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    marker.unlink(missing_ok=True)


def damage_images(image_dir: Path) -> bool:
    """Overwrite the start of the image CRIU reads first (and of every pages image);
    False when there was no image to damage."""
    damaged = False
    for target in [image_dir / "pstree.img", *sorted(image_dir.glob("pages-*.img"))]:
        if not target.is_file():
            continue
        with open(target, "r+b") as f:
            f.write(b"\xde\xad\xbe\xef" * 2)
        damaged = True
    return damaged
