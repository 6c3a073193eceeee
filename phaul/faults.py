"""Test-only fault injection: make a chosen fault happen at a chosen step.

Off unless the agent is started with `--enable-fault-injection`; a request
naming a fault is refused by an agent that was not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import InvalidInput, ToolFailed

log = logging.getLogger(__name__)

STEPS = ("preflight", "fs-presync", "dump", "transfer", "restore", "commit", "resume", "cleanup")
KINDS = ("fail", "damage-image")


@dataclass(frozen=True)
class Fault:
    step: str
    kind: str

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
            raise InvalidInput(f"unknown fault {text!r}", f"write STEP:KIND with STEP in {STEPS} and KIND in {KINDS}")
        return cls(step, kind)

    def at(self, step: str, image_dir: Path | None = None) -> None:
        """Make the fault happen if this is its step."""
        if step != self.step:
            return
        log.warning("fault injection: %s at %s", self.kind, step)
        if self.kind == "damage-image" and image_dir is not None:
            target = image_dir / "pstree.img"
            data = bytearray(target.read_bytes())
            data[:8] = b"\xde\xad\xbe\xef" * 2
            target.write_bytes(bytes(data))
            return
        raise ToolFailed(f"injected fault at {step}")
