"""Errors that tell the user what failed and what to do about it, and the one
mapping from an error to the CLI's exit status (EXIT_CODES)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The `phaul` command's exit status, which scripts may rely on."""

    OK = 0
    FAILED = 1  # failed or rolled back, with nothing lost (a rolled-back container runs where it was)
    REFUSED = 2  # bad input, or refused before anything changed
    IN_DOUBT = 3  # a migration was started and its outcome is unknown: `phaul recover`
    BUSY = 4  # a bound was reached (migrations, calls at once): nothing changed, retry later


class PhaulError(Exception):
    """A failure the user can act on. `hint` says what to do; `exit_code` comes from EXIT_CODES."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message

    @property
    def exit_code(self) -> ExitCode:
        return exit_code(self)


class NotFound(PhaulError):
    """The named container, host or migration does not exist."""


class Conflict(PhaulError):
    """The name is taken or the object is in the wrong state."""


class InvalidInput(PhaulError):
    """A malformed ID, size, address or option."""


class ToolFailed(PhaulError):
    """An external tool (CRIU, runc, rsync, ip) failed; the message carries its output."""


class Busy(PhaulError):
    """The agent is at a bound (concurrent calls, migrations, quota); trying again later may work."""


class Refused(PhaulError):
    """The caller may not do this (not in the agent's allow lists, or not a party to the migration)."""


class Unreachable(PhaulError):
    """No connection to the agent could be made: nothing was asked of it."""


class LinkBroken(PhaulError):
    """The connection failed or timed out during a call: the agent may have acted on it."""


class InDoubt(PhaulError):
    """A migration was started and the caller cannot tell how it ended."""


# The one mapping from errors to exit codes, most specific first; anything else is FAILED.
EXIT_CODES: tuple[tuple[type[PhaulError], ExitCode], ...] = (
    (InDoubt, ExitCode.IN_DOUBT),
    (Busy, ExitCode.BUSY),
    (InvalidInput, ExitCode.REFUSED),
    (NotFound, ExitCode.REFUSED),
    (Conflict, ExitCode.REFUSED),
    (Refused, ExitCode.REFUSED),
    (Unreachable, ExitCode.REFUSED),
    (ToolFailed, ExitCode.FAILED),
    (LinkBroken, ExitCode.FAILED),
)


def exit_code(err: PhaulError) -> ExitCode:
    """The exit status a command ending with `err` gives."""
    for cls, code in EXIT_CODES:
        if isinstance(err, cls):
            return code
    return ExitCode.FAILED
