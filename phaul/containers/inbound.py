"""Checks on what a source pushed, before the destination uses it.

The data channel lets a source write files into its migration's directory
only (rsync daemon, chrooted). Before the destination moves the container
directory into place and hands its bundle to runc, `check_container_dir`
makes sure it is a plain directory tree of the expected container: no
symbolic link where phaul or runc will write, the stored configuration naming
the expected container, and a bundle that mounts nothing from the host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phaul.errors import InvalidInput

# The file systems a container's own mounts may have (runc spec's defaults):
# nothing is bind-mounted from the host.
ALLOWED_MOUNT_TYPES = frozenset({"proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2"})
MAX_JSON = 1 << 20


def check_container_dir(ct_dir: Path, ct_id: str) -> None:
    """Raise InvalidInput unless `ct_dir` (pushed by the source) holds container `ct_id`, safely."""
    for path in (ct_dir, ct_dir / "phaul.json", ct_dir / "criu.conf", ct_dir / "bundle", ct_dir / "bundle" / "config.json"):
        if path.is_symlink():
            raise InvalidInput(f"the pushed container has a symbolic link at {path.name}; refused")
    config = _load(ct_dir / "phaul.json")
    if not isinstance(config, dict) or config.get("id") != ct_id:
        raise InvalidInput(f"the pushed container's phaul.json does not describe {ct_id}")
    spec = _load(ct_dir / "bundle" / "config.json")
    if not isinstance(spec, dict):
        raise InvalidInput("the pushed bundle's config.json is not an object")
    root = (spec.get("root") or {}).get("path")
    if root != "rootfs":
        raise InvalidInput(f"the pushed bundle's root is {str(root)[:100]!r}, not rootfs")
    if (ct_dir / "bundle" / "rootfs").is_symlink():
        raise InvalidInput("the pushed bundle's rootfs is a symbolic link; refused")
    for m in spec.get("mounts") or []:
        if not isinstance(m, dict) or m.get("type") not in ALLOWED_MOUNT_TYPES or "bind" in (m.get("options") or []):
            raise InvalidInput(f"the pushed bundle mounts {_short(m)}; only {sorted(ALLOWED_MOUNT_TYPES)} are accepted")
    for hook in ("hooks",):
        if spec.get(hook):
            raise InvalidInput("the pushed bundle has OCI hooks (commands run on the host); refused")
    linux = spec.get("linux") or {}
    for ns in linux.get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("path"):
            raise InvalidInput("the pushed bundle joins an existing namespace of the host; refused")


def _load(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON + 1)
    except OSError as e:
        raise InvalidInput(f"the pushed container lacks {path.name}: {e.strerror}") from None
    if len(raw) > MAX_JSON:
        raise InvalidInput(f"the pushed {path.name} is too large")
    try:
        return json.loads(raw)
    except ValueError:
        raise InvalidInput(f"the pushed {path.name} is not valid JSON") from None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) < 120 else text[:117] + "..."
