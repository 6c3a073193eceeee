"""CRIU pieces phaul drives around runc: the commit gate and CRIU's statistics.

The commit gate holds a dumped container frozen until the migration decides:
CRIU runs an action script at `post-dump`; while the script waits, the dumped
tree stays frozen; exit 0 lets CRIU kill it (commit), non-zero makes the dump
fail and the tree resume, TCP connections included (rollback).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import ToolFailed
from phaul.linux import freezer as freezer_mod
from phaul.linux import procfs

log = logging.getLogger(__name__)

_GATE_SCRIPT = """#!/bin/sh
# phaul commit gate (generated). CRIU runs this at each action.
case "$CRTOOLS_SCRIPT_ACTION" in
  pre-dump) date +%s%N > {dir}/frozen-at; {freeze} ;;
  post-dump)
    echo $$ > {dir}/waiting
    : > {dir}/reached
    verdict=$({timeout} {limit} {head} -n 1 {dir}/verdict)
    echo "$verdict" > {dir}/ack.new && {mv} -f {dir}/ack.new {dir}/ack  # never seen half written
    rm -f {dir}/waiting
    [ "$verdict" = commit ] ;;
esac
"""


class CommitGate:
    """A gate in directory `path` for one final dump. `criu_options()` are the
    lines to put in the CRIU configuration file runc passes to CRIU."""

    def __init__(self, path: Path, timeout: float, freezer: Path | None = None) -> None:
        self.dir = path
        path.mkdir(parents=True, exist_ok=True)
        self.script = path / "gate.sh"
        limit = max(1, int(timeout))  # nobody decided (the agent died and did not come back): resume
        tools = {t: shutil.which(t) or f"/usr/bin/{t}" for t in ("timeout", "head", "mv")}
        # With `freezer` (a freezer.state file) the script freezes the cgroup at pre-dump
        # (phaul.linux.freezer): CRIU then skips its 100 ms freezer poll. A rollback must thaw it.
        freeze = freezer_mod.freeze_snippet(freezer, path / "frozen")
        self.script.write_text(_GATE_SCRIPT.format(dir=path, limit=limit, freeze=freeze, **tools))
        self.script.chmod(0o700)
        for name in ("reached", "frozen-at", "frozen", "verdict", "waiting", "ack", "ack.new"):
            (path / name).unlink(missing_ok=True)
        os.mkfifo(path / "verdict", 0o600)

    @classmethod
    def attach(cls, path: Path) -> CommitGate:
        """The gate of an earlier dump in `path` (e.g. after an agent restart), unchanged."""
        gate = cls.__new__(cls)
        gate.dir = path
        gate.script = path / "gate.sh"
        return gate

    def waiting(self) -> bool:
        """True while the gate script holds the dumped container and waits for a verdict.
        Never touches the FIFO (opening it would end the wait)."""
        try:
            pid = int((self.dir / "waiting").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return False
        return str(self.script).encode() in cmdline and procfs.alive(pid)

    def verdict(self) -> str | None:
        """The verdict the gate script read ("commit", "abort", "" when it timed out),
        or None while it has not ended."""
        try:
            return (self.dir / "ack").read_text().strip()
        except OSError:
            return None

    def criu_options(self) -> str:
        return f"action-script {self.script}\n"

    def wait_reached(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Wait until the dump is complete and the tree held frozen. Raises
        ToolFailed when the dump process ends first or the timeout passes."""
        deadline = time.monotonic() + timeout
        reached = self.dir / "reached"
        while not reached.exists():
            if proc.poll() is not None:
                raise ToolFailed(f"the final dump failed (exit {proc.returncode})", "see the CRIU log below")
            if time.monotonic() > deadline:
                raise ToolFailed(f"the final dump did not finish within {timeout:.0f} s")
            time.sleep(0.002)

    def frozen(self) -> bool:
        """True once the gate script has frozen the cgroup itself (with `freezer`):
        nothing in the container changes any more, though CRIU is still dumping."""
        return (self.dir / "frozen").exists()

    def frozen_at_ns(self) -> int:
        """Wall-clock time (ns) just before CRIU froze the tree."""
        try:
            return int((self.dir / "frozen-at").read_text().strip())
        except (OSError, ValueError):
            return time.time_ns()

    def release(self, commit: bool, timeout: float = 10.0) -> bool:
        """Tell the waiting script: commit (the dumped tree is killed) or abort
        (it resumes). Returns False if no script was waiting."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.dir / "verdict", os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    return False
                if not (self.dir / "reached").exists() or not self.waiting():
                    return False
                time.sleep(0.002)
        try:
            os.write(fd, b"commit\n" if commit else b"abort\n")
        finally:
            os.close(fd)
        return True


def read_stats(work_dir: Path, which: str) -> dict[str, float]:
    """CRIU's own timings (ms) and page counts from `stats-dump` or `stats-restore`
    (CRIU writes them into its work directory)."""
    from phaul.linux import pycriu_module  # `phaul doctor` imports this module and runs without pycriu

    pycriu = pycriu_module.load("read CRIU's statistics")
    path = work_dir / f"stats-{which}"
    try:
        with open(path, "rb") as f:
            entry = pycriu.images.load(f)["entries"][0][which]
    except (OSError, KeyError, IndexError, Exception) as e:  # pycriu raises its own types
        log.debug("no CRIU statistics in %s: %s", path, e)
        return {}
    out: dict[str, float] = {}
    for key, value in entry.items():
        if key.endswith("_time"):
            out[key[: -len("_time")]] = int(value) / 1000.0
        else:
            out[key] = float(value)
    return out


# CRIU logs this error whenever root lacks CAP_SYS_RESOURCE; it is harmless.
_HARMLESS = "RLIMIT_NOFILE"


def error_lines(text: str) -> list[str]:
    """CRIU's error lines in `text` (a log, or CRIU's output), the harmless RLIMIT_NOFILE one skipped."""
    return [line for line in text.splitlines() if "Error" in line and _HARMLESS not in line]


def read_log(path: Path) -> str | None:
    """A CRIU log's text, or None when it cannot be read (CRIU did not write it)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def log_tail(path: Path, lines: int = 15, *, context: int = 0) -> str:
    """For error messages: the last `lines` error lines of the CRIU log at `path`, or
    its last lines when it has none; with `context`, the error lines are followed by
    the log's last `context` lines (after "..."). "" when the log cannot be read."""
    text = read_log(path)
    if text is None:
        return ""
    errors = error_lines(text)[-lines:]
    if not context:
        return "\n".join(errors or text.splitlines()[-lines:])
    tail = [line for line in text.splitlines()[-context:] if line not in errors]
    return "\n".join(errors + (["..."] if errors and tail else []) + tail)


# What a CRIU error line means and what to do, by a phrase in it (the first match wins).
_HINTS: tuple[tuple[str, str], ...] = (
    ("Can't get rlimit", "a task of another user: this CRIU cannot read its limits without CAP_SYS_RESOURCE; "
     "build phaul's patched CRIU (`make setup`, patches/criu/README) or give the agent CAP_SYS_RESOURCE"),
    ("not stopped after seize", "a task was stopped (SIGSTOP) while CRIU seized it; migrate again"),
    ("file locks", "the container holds file locks; CRIU needs --file-locks to carry them"),
    ("Address already in use", "an address or port the container uses is taken on this host; free it and migrate again"),
    ("Can't open file", "a file the container's processes hold is missing or different here: "
     "its root file system did not arrive whole; migrate again"),
    ("Can't dump ghost file", "a file deleted while still open is larger than the ghost limit phaul gives CRIU "
     "(1 GiB, criu.conf); let the program close it, or keep it linked until after the migration"),
    ("Unexpected EOF", "an image is cut short (the transfer or the disk failed); migrate again"),
    ("Can't fork for", "the PID is taken: another process holds it in the target PID namespace"),
    ("Timeout", "a task did not respond in time (stopped, or traced by a debugger)"),
)
_FALLBACK_HINT = "read CRIU's log (named below) for its full account"
_LOG_PREFIX = re.compile(r"^\s*(?:\(\s*[\d.]+\)\s*)?(?:pie:\s*)?(?:(\d+):\s*)?(?:Error|Warn)\s*\([^)]*\):\s*")
_OBJECTS = (
    re.compile(r"\bpid:?\s*(\d+)", re.IGNORECASE), re.compile(r"\bfor (\d+)\b"), re.compile(r"\btask (\d+)\b"),
)
_FILE = re.compile(r"(?:file|path)\s+(\S+)|(/[\w.@+-]+(?:/[\w.@+-]+)+)")


@dataclass(frozen=True)
class Failure:
    """CRIU's own account of a failure: its first error line, the object it names, what to do."""

    cause: str  # CRIU's root-cause line without its timestamp and source location, "" when none
    where: str  # "pid 12", "file bin/busybox (pid 1)" or ""
    fix: str

    def __str__(self) -> str:
        if not self.cause:
            return "CRIU logged no error"
        return f"CRIU: {self.cause}" + (f" [{self.where}]" if self.where else "")


def explain(text: str) -> Failure:
    """The Failure in a CRIU log's `text`: the first error line is the cause (later ones follow from it)."""
    errors = error_lines(text)
    if not errors:
        return Failure("", "", _FALLBACK_HINT)
    cause = _LOG_PREFIX.sub("", errors[0]).strip()
    fix = next((hint for phrase, hint in _HINTS if phrase in cause), _FALLBACK_HINT)
    return Failure(cause, _object(errors), fix)


def _object(errors: list[str]) -> str:
    parts: list[str] = []
    for line in errors:
        text = _LOG_PREFIX.sub("", line)
        m = _LOG_PREFIX.match(line)
        if m and m.group(1) and not any(p.startswith("pid") for p in parts):
            parts.append(f"pid {m.group(1)}")  # the restoring task that logged it
        m = _FILE.search(text)
        if m and not any(p.startswith("file") for p in parts):
            parts.insert(0, f"file {(m.group(1) or m.group(2)).rstrip(':,')}")
        for rx in _OBJECTS:
            m = rx.search(text)
            if m and not any(p.startswith("pid") for p in parts):
                parts.append(f"pid {m.group(1)}")
    return ", ".join(parts)


def explain_log(path: Path) -> Failure:
    """explain() of the CRIU log at `path` (a Failure saying so when it was not written)."""
    text = read_log(path)
    if text is None:
        return Failure("", "", f"{path} was not written: CRIU did not start (see runc's log)")
    return explain(text)
