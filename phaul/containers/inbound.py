"""What a source pushed for a container, before the destination uses it.

The destination never reads the configuration files a source pushes: the
container kind rebuilds them from the validated Prepare configuration
(`ContainerKind.adopt`). The pushed container directory contributes its root
file system and its console log. `strip_container_dir` checks its structure
without following anything (`ct/`, `ct/bundle` and `ct/bundle/rootfs` real
directories) and removes every other entry of `ct/` and `ct/bundle` (links
themselves, never their targets) but `ct/log`, of which it keeps the log's
regular files only (phaul.containers.console appends to them). The rootfs's contents may hold links, devices and setuid
files: they are the container's, and the agent does not look inside.
"""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

from phaul.containers.console import KEPT, LOG_DIR
from phaul.errors import InvalidInput
from phaul.linux.datatree import DataDir

log = logging.getLogger(__name__)


def strip_container_dir(ct_dir: Path) -> None:
    """Raise InvalidInput unless pushed `ct_dir` holds bundle/rootfs as real directories;
    remove everything else in `ct_dir` and `ct_dir/bundle`."""
    with DataDir(ct_dir) as ct:
        st = ct.lstat(LOG_DIR)
        _keep_only(ct, "bundle", LOG_DIR if st is not None and stat.S_ISDIR(st.st_mode) else "")
        if st is not None and stat.S_ISDIR(st.st_mode):
            with ct.subdir(LOG_DIR) as logs:
                for name in logs.names():
                    entry = logs.lstat(name)
                    if name not in KEPT or entry is None or not stat.S_ISREG(entry.st_mode):
                        _remove(logs, name)
        with ct.subdir("bundle") as bundle:
            _keep_only(bundle, "rootfs")
            bundle.subdir("rootfs").close()


def _keep_only(d: DataDir, keep: str, also: str = "") -> None:
    st = d.lstat(keep)
    if st is None:
        raise InvalidInput(f"the pushed container has no {d.path.name}/{keep}", "the source must push its bundle's rootfs")
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"the pushed container's {d.path.name}/{keep} is not a directory; refused")
    for name in d.names():
        if name not in (keep, also):
            _remove(d, name)


def _remove(d: DataDir, name: str) -> None:
    st = d.lstat(name)
    if st is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=d.fd)  # fd-based: never follows a link inside
    else:
        d.unlink(name, missing_ok=True)
    log.debug("removed pushed %s/%s: the destination writes its own", d.path, name)
