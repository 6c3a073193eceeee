"""Errors that tell the user what failed and what to do about it."""

from __future__ import annotations


class PhaulError(Exception):
    """A failure the user can act on. `hint` says what to do; exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


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
