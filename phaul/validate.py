"""Validation of names and sizes that come from users or from the wire."""

from __future__ import annotations

import re

from phaul.errors import InvalidInput

_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_SIZE = re.compile(r"^(\d+)([kmgt]?)i?b?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def check_id(value: str, what: str = "container ID") -> str:
    """Return `value` if it is a valid ID (lower-case letters, digits, '_', '.', '-';
    1 to 63 characters, starting with a letter or digit), else raise InvalidInput."""
    if not isinstance(value, str) or not _ID.match(value) or value in {".", ".."}:
        raise InvalidInput(
            f"invalid {what} {value!r}",
            "use 1 to 63 characters from a-z, 0-9, '_', '.', '-', starting with a letter or digit",
        )
    return value


def parse_size(value: str, what: str = "size") -> int:
    """Parse '64M', '1G', '512MiB', '4096' (bytes) into bytes."""
    m = _SIZE.match(value.strip())
    if not m:
        raise InvalidInput(f"invalid {what} {value!r}", "write a number with an optional unit, e.g. 64M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]
