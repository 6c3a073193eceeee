"""Small file-system helpers shared by the modules that keep state on disk."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write `data` to `path` durably and atomically: a reader (or a crash) sees
    the old file or the new one, never half of one. Created with `mode`."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_static_elf(path: Path | str) -> bool:
    """True if `path` is an ELF file without a program interpreter (PT_INTERP)."""
    with open(path, "rb") as f:
        hdr = f.read(64)
        if len(hdr) < 52 or hdr[:4] != b"\x7fELF":
            return False
        is64, end = hdr[4] == 2, "<" if hdr[5] == 1 else ">"
        if is64:
            (phoff,) = struct.unpack_from(end + "Q", hdr, 0x20)
            phentsize, phnum = struct.unpack_from(end + "HH", hdr, 0x36)
        else:
            (phoff,) = struct.unpack_from(end + "I", hdr, 0x1C)
            phentsize, phnum = struct.unpack_from(end + "HH", hdr, 0x2A)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        (p_type,) = struct.unpack_from(end + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True
