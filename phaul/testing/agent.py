"""The test agent: `phaul agent` with a step hook plugged in.

usage: python -m phaul.testing.agent [-v] [--enable-fault-injection] AGENT-ARGUMENTS...

AGENT-ARGUMENTS are `phaul agent`'s (parsed by its own parser). With
--enable-fault-injection the agent's migrations call phaul.testing.faults.FaultHook,
which makes the faults armed in STATE/faults/arm happen; without it this is
the production agent. The lab starts it when PHAUL_LAB_FAULT_INJECTION=1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from phaul import cli
from phaul.errors import PhaulError
from phaul.migration.steps import NO_HOOK
from phaul.testing.faults import FaultHook

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(prog="python -m phaul.testing.agent", add_help=False, allow_abbrev=False)
    own.add_argument("--enable-fault-injection", action="store_true")
    own.add_argument("-v", "--verbose", action="store_true")
    ours, rest = own.parse_known_args(argv)
    args = cli.build_parser().parse_args(["agent", *rest])  # exits 2, with phaul agent's usage, on bad arguments
    logging.basicConfig(
        level=logging.DEBUG if ours.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if ours.enable_fault_injection:
        log.warning("fault injection is on: faults armed in %s/faults/arm happen (tests only)", args.state_dir)
    try:
        return cli.cmd_agent(args, FaultHook() if ours.enable_fault_injection else NO_HOOK)
    except PhaulError as e:
        print(f"phaul: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
