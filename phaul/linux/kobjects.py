"""Kernel objects a container's processes hold that a migration cannot carry.

CRIU 4.2.1 dumps and restores every object kind tests/test_kernel_objects.py
tries (docs/notes/kernel-objects.md has the table), but some reach the
destination as image kinds its image check (phaul.linux.criu_images) refuses
from a peer, so a migration would dump, copy and then roll back:

- terminals other than ptys (consoles, serial and virtual terminals, /dev/tty:
  CRIU's non-PTY tty images) would open a terminal device of the destination
  host; ptys of the container's own devpts move;
- fanotify descriptors: their marks are restored from file handles, which
  reach any inode of the file system they name (inotify moves: its watches
  are dumped with their paths, `force-irmap`, and checked like open files).

Files deleted while open or mapped move: CRIU carries them whole (ghost-file
images), which the destination checks (criu_images `_ghosts`).

`unmovable` finds them in /proc before anything moves, so preflight can name
the process and descriptor and refuse.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phaul.linux import procfs

log = logging.getLogger(__name__)

# Character devices of terminals other than Unix98 ptys (Documentation/admin-guide/devices.txt):
# major 4 (virtual and serial terminals), 5 except minor 2 (/dev/tty, /dev/console; 5:2 is
# /dev/ptmx), 128-135 (BSD pty masters; Unix98 pty slaves are 136-143 and move).
_TTY_MAJORS = frozenset({4, 5, *range(128, 136)})
_PTMX = (5, 2)
_NOTIFY = {"anon_inode:[fanotify]": "a fanotify descriptor"}
WHY = {
    "terminal": "a terminal other than a pty (a console, serial or virtual terminal, /dev/tty) cannot be moved: "
                "the destination takes only ptys of the container's own devpts",
    "notify": "fanotify marks cannot be moved: the destination refuses them "
              "(they are restored from file handles, which reach any file of the file system)",
}
FIX = {
    "terminal": "run the program without that terminal (a pty of the container, or none)",
    "notify": "stop the program that watches files, or migrate it stopped and started again",
}


@dataclass(frozen=True)
class Held:
    """One object of a kind `WHY` names, held by process `pid` (`comm`) at `where` (fd N)."""

    kind: str
    pid: int
    comm: str
    where: str
    target: str


def unmovable(init_pid: int, proc: Path = Path("/proc")) -> list[Held]:
    """The objects of the container whose init is `init_pid` that a migration cannot carry."""
    return [h for pid in procfs.tasks_of(init_pid, proc) for h in held_by(pid, proc)]


def held_by(pid: int, proc: Path = Path("/proc")) -> Iterator[Held]:
    """The objects of one process a migration cannot carry."""
    base = proc / str(pid)
    try:
        comm = (base / "comm").read_text().strip()
    except OSError:
        return
    try:
        fds = sorted(os.listdir(base / "fd"), key=int)
    except OSError:
        fds = []
    for fd in fds:
        link = base / "fd" / fd
        try:
            target = os.readlink(link)
            st = os.stat(link)
        except OSError:
            continue
        kind = _kind(target, st)
        if kind:
            yield Held(kind, pid, comm, f"fd {fd}", target)


def _kind(target: str, st: os.stat_result) -> str | None:
    if target in _NOTIFY:
        return "notify"
    dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if stat.S_ISCHR(st.st_mode) and dev[0] in _TTY_MAJORS and dev != _PTMX:
        return "terminal"
    return None


def describe(found: list[Held], most: int = 4) -> tuple[str, str]:
    """A message naming what `found` holds (at most `most` objects, then a count) and a fix."""
    first = list({(h.kind, h.target): h for h in reversed(found)}.values())[::-1]  # each object once, first holder
    kinds = list(dict.fromkeys(h.kind for h in first))
    named = "; ".join(f"PID {h.pid} ({h.comm}) {h.where}: {h.target}" for h in first[:most])
    more = f"; and {len(first) - most} more" if len(first) > most else ""
    why = "; ".join(WHY[k] for k in kinds)
    return f"{named}{more}. {why}", "; ".join(FIX[k] for k in kinds)
