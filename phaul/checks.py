"""What a check found: the one vocabulary of `phaul doctor` (phaul.linux.doctor) and
the migration preflight (phaul.migration.preflight)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class CheckState(StrEnum):
    """How a check ended; the values are what the tables, the JSON and the protocol say."""

    PASS = "pass"
    WARNING = "warning"  # works, with a limitation the detail names
    FAILURE = "failure"  # phaul cannot do this (a migration refuses unless forced)


@dataclass
class CheckResult:
    """One preflight check on one host."""

    name: str  # one of phaul.migration.preflight.CHECKS
    status: CheckState
    message: str
    host: str
