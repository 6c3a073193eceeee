"""The container's stdout and stderr, kept in a bounded log inside its directory.

`run(cmd, log_dir, ...)` runs `cmd` (`runc run --detach`, `runc create` or
`runc restore --detach`) under a small keeper process, started detached from the
agent (`python -m phaul.containers.console`). The keeper:

- makes itself a child subreaper, then runs `cmd` with stdin at /dev/null and
  stdout and stderr on a pipe it reads; the container inherits that pipe (runc
  passes a detached container its own stdio, and on restore hands CRIU the
  pipe for the one recorded at the dump: CRIU's inherit-fd of `pipe:[...]`);
- reports `cmd`'s exit status to the agent, which waits for it;
- appends what it reads to `log_dir/console.log`, renamed to console.log.1
  (replacing the previous one) once it reaches `max_bytes`: at most twice that
  on disk;
- reaps the container's init (runc exits, so the init is re-parented to the
  keeper) and writes how it ended to `log_dir/exit` ("exit N", "signal N");
- ends when every writer of the pipe is gone and its last child has ended.

`log_dir` lies in the container's directory, so a migration moves the log
with it; the destination's `restore` runs a new keeper appending to it.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import ToolFailed

log = logging.getLogger(__name__)

LOG_DIR = "log"  # in the container's directory
LOG = "console.log"
OLD = "console.log.1"
EXIT = "exit"
PID = "keeper.pid"
KEPT = (LOG, OLD)  # what moves with the container (EXIT and PID are this host's)
DEFAULT_MAX = 1 << 20  # bytes per file
READ_MAX = 256 << 10  # bytes one `read_since` returns at most
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Chunk:
    """Log bytes from (file_id, offset) on, and where the next read continues."""

    data: bytes
    file_id: int  # the inode of the file `offset` is in
    offset: int


def run(cmd: list[str], log_dir: Path, timeout: float, max_bytes: int = DEFAULT_MAX) -> int:
    """Run `cmd` under a keeper writing its output (and its container's) to `log_dir`;
    its exit status. ToolFailed if it takes longer than `timeout` s (it is killed)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / EXIT).unlink(missing_ok=True)
    keeper = [sys.executable, "-m", "phaul.containers.console", "--dir", str(log_dir), "--max", str(max_bytes), "--", *cmd]
    proc = subprocess.Popen(keeper, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/")
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    pid, buf = 0, b""
    try:
        while True:
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"pid "):
                    pid = int(line[4:])
                elif line.startswith(b"rc "):
                    return int(line[3:])
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                if pid:
                    os.kill(pid, signal.SIGKILL)
                raise ToolFailed(f"{cmd[0]} did not finish within {timeout:g} s", "see the agent's log and runc's state")
            data = os.read(proc.stdout.fileno(), 256)
            if not data:
                raise ToolFailed(f"the console keeper of {log_dir} ended without running {cmd[0]}", "see the agent's log")
            buf += data
    finally:
        proc.stdout.close()
        proc.wait()  # the keeper's first process exits once the keeper runs on its own


def wait_keeper(log_dir: Path, timeout: float = 5.0) -> bool:
    """Wait until the keeper of `log_dir` (if any) has ended; False if it still runs."""
    try:
        pid = int((log_dir / PID).read_text())
    except (OSError, ValueError):
        return True
    deadline = time.monotonic() + timeout
    while _is_keeper(pid, log_dir):
        if time.monotonic() >= deadline:
            log.warning("the console keeper %d of %s still runs", pid, log_dir)
            return False
        time.sleep(0.02)
    return True


def _is_keeper(pid: int, log_dir: Path) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return b"phaul.containers.console" in args and os.fsencode(log_dir) in args and ") Z " not in stat


def exit_status(log_dir: Path) -> str | None:
    """How the container's init ended ("exit N", "signal N"), if the keeper saw it."""
    try:
        return (log_dir / EXIT).read_text().strip() or None
    except OSError:
        return None


def tail(log_dir: Path, lines: int) -> bytes:
    """The last `lines` lines of the log (0: all that is kept), the rotated file's included."""
    data = b"".join(_read(log_dir / name) for name in (OLD, LOG))
    if lines <= 0:
        return data
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts = parts[:-1]
        return b"\n".join(parts[-lines:]) + b"\n" if parts else b""
    return b"\n".join(parts[-lines:])


def read_since(log_dir: Path, file_id: int, offset: int) -> Chunk:
    """What was written after (file_id, offset) (0, 0: the end of the log now, nothing read)."""
    current = _inode(log_dir / LOG)
    if file_id == 0:
        return Chunk(b"", current, _size(log_dir / LOG))
    if file_id == current:
        data = _read(log_dir / LOG, offset)
        return Chunk(data, current, offset + len(data))
    # rotated since: the rest of the old file, then the new one from its start
    rest = _read(log_dir / OLD, offset) if _inode(log_dir / OLD) == file_id else b""
    if len(rest) >= READ_MAX:
        return Chunk(rest, file_id, offset + len(rest))
    new = _read(log_dir / LOG)[: READ_MAX - len(rest)]
    return Chunk(rest + new, current, len(new))


def _read(path: Path, offset: int = 0) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(READ_MAX)
    except OSError:
        return b""


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


# -- the keeper process ------------------------------------------------------------


def _keeper(log_dir: Path, max_bytes: int, cmd: list[str]) -> None:
    if os.fork() != 0:  # the agent waits for this first process: it ends at once
        os._exit(0)
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    dfd = os.open(log_dir, os.O_DIRECTORY | os.O_RDONLY)
    _write_at(dfd, PID, f"{os.getpid()}\n")
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    child = subprocess.Popen(cmd, stdin=devnull, stdout=w, stderr=w, cwd="/")
    os.close(w)
    os.close(devnull)
    report = sys.stdout.buffer
    report.write(f"pid {child.pid}\n".encode())
    report.flush()
    rc = child.wait()
    report.write(f"rc {rc}\n".encode())
    report.flush()
    os.close(1)
    os.open(os.devnull, os.O_WRONLY)  # fd 1 again, never the agent's pipe
    out = _Writer(dfd, max_bytes)
    while True:
        ready = select.select([r], [], [], 0.5)[0]
        if ready:
            data = os.read(r, 65536)
            if not data:
                break
            out.write(data)
        _reap(dfd)
    while _reap(dfd, block=True):  # an init that closed its stdout (systemd does) still ends later
        pass


class _Writer:
    def __init__(self, dfd: int, max_bytes: int) -> None:
        self.dfd, self.max = dfd, max_bytes
        self.fd = self._open()

    def _open(self) -> int:
        return os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640, dir_fd=self.dfd)

    def write(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
            if os.fstat(self.fd).st_size >= self.max:
                os.rename(LOG, OLD, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
                os.close(self.fd)
                self.fd = self._open()
        except OSError:
            pass  # the container's directory is gone (migrated away, destroyed): drop it


def _reap(dfd: int, block: bool = False) -> bool:
    """Reap ended children (`block`: wait for one); an ended init's status goes to EXIT.
    False once none is left."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        text = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        _write_at(dfd, EXIT, f"{text}\n")
        if block:
            return True


def _write_at(dfd: int, name: str, text: str) -> None:
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640, dir_fd=dfd)
        os.write(fd, text.encode())
        os.close(fd)
    except OSError:
        pass  # the container's directory is gone


def main() -> None:
    p = argparse.ArgumentParser(description="keeps a container's console log (phaul.containers.console)")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--max", type=int, default=DEFAULT_MAX)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    _keeper(a.dir, a.max, cmd)


if __name__ == "__main__":
    main()
