"""Running the external tools phaul drives (ip, nsenter, runc, criu, iptables):
one runner, argument lists only (never a shell)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from phaul.errors import ToolFailed

log = logging.getLogger(__name__)


def run(
    args: Sequence[str], *, timeout: float, check: bool = True, what: str = "", hint: str = "",
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `args` with its output captured as text and stdin from /dev/null (or
    `input`). Raises ToolFailed when the tool cannot be started, does not end within
    `timeout` s, or, with `check`, exits non-zero: the message names `what` (by
    default the command line) and carries the tool's stderr; `hint` says what to do."""
    argv = list(args)
    what = what or f"`{' '.join(argv)}`"
    log.debug("running %s", argv)
    try:
        r = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=timeout,
            input=input, stdin=subprocess.DEVNULL if input is None else None,
        )
    except FileNotFoundError as e:
        raise ToolFailed(f"{argv[0]} not found", hint or "install it (see `phaul doctor`)") from e
    except OSError as e:
        raise ToolFailed(f"{what} could not run: {e.strerror or e}", hint) from e
    except subprocess.TimeoutExpired as e:
        raise ToolFailed(f"{what} did not finish within {timeout:g} s", hint) from e
    if check and r.returncode != 0:
        raise ToolFailed(f"{what} failed: {r.stderr.strip()}", hint)
    return r


def probe(args: Sequence[str], *, timeout: float, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """`run` without raising, for checks that report rather than fail: a tool that
    cannot be started or does not end gives return code 255 and why in stderr."""
    try:
        return run(args, timeout=timeout, check=False, input=input)
    except ToolFailed as e:
        return subprocess.CompletedProcess(list(args), 255, "", e.message)
