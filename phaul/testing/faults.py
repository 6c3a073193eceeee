"""Test-only fault injection: make a chosen fault happen at a chosen step.

Off unless the agent is started with `--enable-fault-injection`; a request
naming a fault is refused by an agent that was not.

Kinds:
- `fail`: the step fails (a PhaulError), as a tool failing there would;
- `damage-image`: the destination damages the images before restoring them;
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
import time
from dataclasses import dataclass, field
from pathlib import Path

from phaul.errors import InvalidInput, ToolFailed
from phaul.linux.fsutil import write_atomic

log = logging.getLogger(__name__)

# "precopy" begins the first pre-copy round; "precopy-2" follows it (the second round, or the final dump)
STEPS = ("preflight", "fs-presync", "precopy", "precopy-2", "dump", "transfer", "restore", "commit", "resume", "cleanup")
# The step boundaries the fault matrix breaks (tests/test_faults.py, scripts/fault_table.py):
# all but "resume", which follows the commit at once.
MATRIX_STEPS = tuple(s for s in STEPS if s != "resume")
KINDS = ("fail", "damage-image", "kill-agent", "pause")
PAUSE_LIMIT = 120.0  # s


@dataclass
class Fault:
    step: str
    kind: str
    fired: bool = field(default=False, compare=False)  # a fault happens once, the first time its step begins

    @classmethod
    def parse(cls, text: str, enabled: bool) -> Fault | None:
        """None for "", else a validated Fault; refused when injection is off."""
        if not text:
            return None
        if not enabled:
            raise InvalidInput(
                "fault injection is off on this agent",
                "it is for tests only: start the agent with --enable-fault-injection",
            )
        step, _, kind = text.partition(":")
        if step not in STEPS or kind not in KINDS:
            raise InvalidInput(f"unknown fault {text[:40]!r}", f"write STEP:KIND with STEP in {STEPS} and KIND in {KINDS}")
        return cls(step, kind)

    def at(self, step: str, image_dir: Path | None = None, *, state_dir: Path | None = None, migration_id: str = "") -> None:
        """Make the fault happen if this is its step (on the side that can), once."""
        if step != self.step or self.fired:
            return
        if self.kind == "damage-image":
            if image_dir is None:
                return
            log.warning("fault injection: damaging the images in %s", image_dir)
            self.fired = True
            damage_images(image_dir)
            return
        if self.kind == "fail":
            log.warning("fault injection: failing at %s", step)
            raise ToolFailed(f"injected fault at {step}")
        if state_dir is None:
            return  # kill-agent and pause act on the source agent only
        self.fired = True
        if self.kind == "kill-agent":
            log.warning("fault injection: killing this agent at %s", step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "pause":
            pause(state_dir, migration_id, step)


def pause(state_dir: Path, migration_id: str, step: str) -> None:
    """Wait at `step` until the test removes STATE/faults/paused."""
    marker = state_dir / "faults" / "paused"
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
