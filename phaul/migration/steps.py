"""The step boundaries of a migration, and the hook called at each of them.

The source calls its agent's hook as each step it journals and announces
begins; the destination at `prepare` (a new incoming migration) and just
before it restores the images. The default hook does nothing; the test agent
plugs in one that breaks migrations there on purpose, much as a mock transport
is plugged into an HTTP client: production code never knows which.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

Role = Literal["source", "destination"]


class Step(StrEnum):
    """Step boundaries, in the order a migration meets them. "precopy" begins the
    first pre-copy round; "precopy-K" follows round K-1 (only "precopy-2", the
    boundary after the first round, is named here: later rounds are `precopy_round`)."""

    PREFLIGHT = "preflight"  # source: a new migration
    PREPARE = "prepare"  # destination: a new incoming migration
    FS_PRESYNC = "fs-presync"
    PRECOPY = "precopy"
    PRECOPY_2 = "precopy-2"
    DUMP = "dump"
    TRANSFER = "transfer"
    RESTORE = "restore"
    COMMIT = "commit"
    RESUME = "resume"
    POSTCOPY = "postcopy"  # source, post-copy only: the destination runs, its pages still arriving
    CLEANUP = "cleanup"


def precopy_round(k: int) -> str:
    """The boundary after pre-copy round k (k >= 1): "precopy-K", K = k + 1."""
    return f"precopy-{k + 1}"


@dataclass(frozen=True)
class StepPoint:
    """Where a migration stands when a step begins."""

    migration_id: str
    role: Role
    state_dir: Path  # the agent's state directory
    image_dir: Path | None = None  # the images about to be restored (destination, at restore)
    ct_dir: Path | None = None  # the container directory placed for the restore (destination, at restore)


class StepHook:
    """Called by the migration as each step begins; does nothing. May raise a
    PhaulError to fail the step, as a tool failing there would."""

    def at(self, step: str, point: StepPoint) -> None:
        """`step` is a Step value or a later round's `precopy_round(k)`."""


NO_HOOK = StepHook()
