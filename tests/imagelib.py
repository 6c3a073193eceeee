"""Reading and editing CRIU images with pycriu's generated protobuf classes (tests only)."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agentlib import remove_host_cgroups


def entries(path: Path, cls: Any) -> tuple[bytes, list[Any]]:
    b = path.read_bytes()
    off = 4 if path.name == "inventory.img" else 8
    head, out = b[:off], []
    while off < len(b):
        (size,) = struct.unpack_from("<I", b, off)
        m = cls()
        m.ParseFromString(b[off + 4 : off + 4 + size])
        out.append(m)
        off += 4 + size
    return head, out


def write(path: Path, head: bytes, messages: list[Any]) -> None:
    path.unlink(missing_ok=True)  # it may be a hard link to a shared dump
    path.write_bytes(head + b"".join(struct.pack("<I", len(s)) + s for s in (m.SerializeToString() for m in messages)))


def edit(d: Path, name: str, cls: Any, change: Callable[[list[Any]], None]) -> None:
    """Parse image `name` of directory `d`, let `change` edit its messages, write it back."""
    head, messages = entries(d / name, cls)
    change(messages)
    write(d / name, head, messages)




@contextlib.contextmanager
def dumped(config: Any, edit_spec: Callable[[dict[str, Any]], None] | None = None,
           settle: float = 0.5) -> Iterator[tuple[Path, Path]]:
    """A container of `config` (its spec edited by `edit_spec`) started on a fresh state
    directory, run `settle` seconds, then dumped with --leave-running: (images, bundle),
    everything removed afterwards."""
    from phaul.containers.runc import RuncContainers
    from phaul.errors import PhaulError

    state = Path(tempfile.mkdtemp(prefix="phaul-imgcheck-", dir="/tmp"))
    host = f"t{uuid.uuid4().hex[:10]}"
    kind = RuncContainers(state, host)
    try:
        kind.create(config)
        bundle = kind.bundle_dir(config.id)
        if edit_spec is not None:
            spec = json.loads((bundle / "config.json").read_text())
            edit_spec(spec)
            (bundle / "config.json").write_text(json.dumps(spec))
        kind.start(config.id)
        time.sleep(settle)
        kind.checkpoint(config.id, state / "images", state / "work", leave_running=True)
        yield state / "images", bundle
    finally:
        try:
            kind.destroy(config.id, timeout=1)
        except PhaulError:
            pass
        remove_host_cgroups(host)
        shutil.rmtree(state, ignore_errors=True)

