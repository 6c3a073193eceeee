"""Validation of names and sizes that come from users or from the wire."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

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


# -- requests from the wire ------------------------------------------------------------

MAX_STRING = 4096  # characters in any one string field
MAX_ITEMS = 256  # entries in any one repeated or map field
MAX_BYTES = 64 << 10  # bytes in any one bytes field


def check_message(msg: Any, what: str = "request", depth: int = 0) -> None:
    """Bound every field of a protobuf message from the wire: string lengths,
    no NUL characters, repeated/map sizes, bytes sizes, nesting. Raises InvalidInput."""
    if depth > 8:
        raise InvalidInput(f"{what} is nested too deeply")
    for fd, value in msg.ListFields():
        name = f"{what}.{fd.name}"
        if _repeated(fd):
            items = list(value.values() if hasattr(value, "values") and callable(value.values) else value)
        else:
            items = [value]
        if len(items) > MAX_ITEMS:
            raise InvalidInput(f"{name} has {len(items)} entries; at most {MAX_ITEMS} are accepted")
        for item in items:
            if isinstance(item, str):
                if len(item) > MAX_STRING:
                    raise InvalidInput(f"{name} is {len(item)} characters long; at most {MAX_STRING} are accepted")
                if "\0" in item:
                    raise InvalidInput(f"{name} contains a NUL character")
            elif isinstance(item, bytes):
                if len(item) > MAX_BYTES:
                    raise InvalidInput(f"{name} is {len(item)} bytes long; at most {MAX_BYTES} are accepted")
            elif isinstance(item, float):
                if item != item or item in (float("inf"), float("-inf")):
                    raise InvalidInput(f"{name} is not a finite number")
            elif hasattr(item, "ListFields"):
                check_message(item, name, depth + 1)


def _repeated(fd: Any) -> bool:
    try:
        return bool(fd.is_repeated)
    except AttributeError:  # older protobuf runtimes
        return fd.label == fd.LABEL_REPEATED


def check_args(args: list[str], what: str = "command") -> list[str]:
    """A command line from the wire: 1 to MAX_ITEMS non-empty-able strings, bounded."""
    if not args:
        raise InvalidInput(f"no {what} given", "write the command after `--`")
    if len(args) > MAX_ITEMS or sum(len(a) for a in args) > 64 << 10:
        raise InvalidInput(f"the {what} is too long")
    if any("\0" in a for a in args):
        raise InvalidInput(f"the {what} contains a NUL character")
    return list(args)


def confined(path: Path, root: Path) -> Path:
    """`path` if it lies inside `root` with no symbolic link on the way (it need not
    exist); else InvalidInput. Guards every path built from what the wire names."""
    root = Path(root).resolve()
    p = Path(os.path.abspath(path))
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise InvalidInput(f"{p} lies outside the state directory {root}") from None
    cur = root
    for part in rel.parts:
        if part in ("", ".", ".."):
            raise InvalidInput(f"{p} is not a plain path inside {root}")
        cur = cur / part
        if cur.is_symlink():
            raise InvalidInput(f"{cur} is a symbolic link; phaul does not follow links in its state directory")
    return p
