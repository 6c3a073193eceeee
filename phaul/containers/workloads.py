"""Where the project's static workload programs (workloads/*.c, built with
`make -C workloads`) are found: the one place that decides it.

They are C programs built on the host, not package data, so an installed
phaul finds them in a configured directory: the agent's `--workload-dir`,
else $PHAUL_WORKLOAD_DIR, else the checkout's workloads/bin when phaul runs
from a checkout, else /usr/local/lib/phaul/workloads. Containers work without
them (templates add those present); what needs one asks for it with
`program()`, which names the fix when it is absent.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from phaul.errors import InvalidInput, ToolFailed

log = logging.getLogger(__name__)

ENV = "PHAUL_WORKLOAD_DIR"
INSTALLED = Path("/usr/local/lib/phaul/workloads")
NAMES = ("memload", "echo-server", "tcp-probe", "syscall-probe", "objects", "asuser")
FIX = (
    "build them from a phaul checkout (`make -C workloads`) and point phaul at the directory: "
    f"the agent's --workload-dir DIR or ${ENV}=DIR (or copy them to {INSTALLED})"
)


class Origin(StrEnum):
    """Which setting chose the directory."""

    OPTION = "--workload-dir"
    ENVIRONMENT = ENV
    CHECKOUT = "the checkout"
    INSTALLED = "the installed default"


@dataclass(frozen=True)
class WorkloadDir:
    """The directory the workload programs are taken from, and why it was chosen."""

    path: Path
    origin: Origin

    def present(self) -> list[str]:
        """The workload programs this directory holds."""
        return [n for n in NAMES if (self.path / n).is_file()]

    def program(self, name: str) -> Path:
        """The path of workload `name`; ToolFailed naming the fix when it is not there."""
        if name not in NAMES:
            raise InvalidInput(f"unknown workload program {name!r}", f"use one of: {', '.join(NAMES)}")
        path = self.path / name
        if not path.is_file():
            raise ToolFailed(f"the workload program {name} is not in {self.path} (from {self.origin})", FIX)
        return path


def _checkout_bin() -> Path | None:
    """workloads/bin of the checkout phaul runs from, if it runs from one."""
    root = Path(__file__).resolve().parents[2]
    if (root / "workloads" / "Makefile").is_file() and (root / "pyproject.toml").is_file():
        return root / "workloads" / "bin"
    return None


def find(configured: Path | None = None, environ: dict[str, str] | None = None) -> WorkloadDir:
    """The workload directory: `configured` (the agent's option), $PHAUL_WORKLOAD_DIR, the
    checkout's, the installed default. A directory named by the option or the environment
    must exist (InvalidInput otherwise); the defaults may be absent (see WorkloadDir.present)."""
    env = os.environ if environ is None else environ
    named = [(configured, Origin.OPTION), (Path(env[ENV]) if env.get(ENV) else None, Origin.ENVIRONMENT)]
    for path, origin in named:
        if path is not None:
            if not path.is_dir():
                raise InvalidInput(f"the workload directory {path} (from {origin}) does not exist", FIX)
            return WorkloadDir(path.resolve(), origin)
    checkout = _checkout_bin()
    if checkout is not None:
        return WorkloadDir(checkout, Origin.CHECKOUT)
    return WorkloadDir(INSTALLED, Origin.INSTALLED)
