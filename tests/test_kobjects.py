"""phaul.linux.kobjects on a real process: what preflight refuses, and what it lets move."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from phaul.linux import kobjects, procfs

# A child holding one object of each kind, then waiting: a fanotify descriptor (refused), and
# what moves: a pty pair, a deleted file open and mapped, a deleted working directory (CRIU's
# ghost files), an inotify descriptor, a memfd and /dev/null.
HOLDER = r"""
import ctypes, mmap, os, sys, tempfile
libc = ctypes.CDLL(None, use_errno=True)
master, slave = os.openpty()
fd, path = tempfile.mkstemp(dir=sys.argv[1])
os.write(fd, b"x" * 4096)
m = mmap.mmap(fd, 4096)
os.unlink(path)
gone = tempfile.mkdtemp(dir=sys.argv[1])
os.chdir(gone)
os.rmdir(gone)
ino = libc.inotify_init()
fan = libc.fanotify_init(0, 0)
assert fan >= 0, ctypes.get_errno()
mem = os.memfd_create("keep")
null = os.open("/dev/null", os.O_RDONLY)
print(fd, ino, fan, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path) -> Iterator[tuple[int, int, int, int]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        deleted, ino, fan = map(int, proc.stdout.readline().split())
        yield proc.pid, deleted, ino, fan
    finally:
        proc.kill()
        proc.wait()


def test_fanotify_is_named_deleted_files_ptys_and_inotify_are_not(holder: tuple[int, int, int, int]) -> None:
    pid, deleted, ino, fan = holder
    assert os.readlink(f"/proc/{pid}/fd/{deleted}").endswith(" (deleted)")
    assert os.readlink(f"/proc/{pid}/cwd").endswith(" (deleted)")
    found = list(kobjects.held_by(pid))
    assert [(h.kind, h.where) for h in found] == [("notify", f"fd {fan}")], found
    assert not [h for h in found if h.where == f"fd {ino}"], found  # inotify moves (watches by path)
    # deleted files (open, mapped, the cwd) move as CRIU's ghost files; the pty pair, memfd and /dev/null move
    message, fix = kobjects.describe(found)
    assert f"PID {pid} (python" in message and "fanotify" in message and "deleted" not in message
    assert "stop the program that watches files" in fix


def test_a_process_with_nothing_unmovable() -> None:
    proc = subprocess.Popen(["sleep", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert list(kobjects.held_by(proc.pid)) == []
        assert procfs.tasks_of(proc.pid)[0] == proc.pid and os.getpid() in procfs.tasks_of(proc.pid)  # one pid namespace
    finally:
        proc.kill()
        proc.wait()
