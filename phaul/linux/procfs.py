"""What /proc says about a process."""

from __future__ import annotations

from pathlib import Path


def state(pid: int | str) -> str | None:
    """The one-letter state of `pid` (R, S, T, Z, ...), or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int | str) -> bool:
    """True if `pid` exists and is not a zombie (never reaps: a caller may hold its Popen)."""
    return state(pid) not in (None, "Z", "X")
