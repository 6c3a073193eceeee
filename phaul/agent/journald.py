"""Log lines that suit journald when the agent runs under systemd.

systemd connects a service's stderr to the journal and says so in
$JOURNAL_STREAM ("DEVICE:INODE" of that stream, systemd.exec(5)): when it
matches stderr, each line starts with its syslog priority (`<3>`, sd-daemon(3))
and carries no timestamp of ours (the journal keeps its own). Otherwise lines
keep the format a terminal or a log file wants, with the time.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

ENV = "JOURNAL_STREAM"
PLAIN_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    for level, prio in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6)):
        if levelno >= level:
            return prio
    return 7


class JournaldFormatter(logging.Formatter):
    """`<N>name: message`, every line of a multi-line message (a traceback) prefixed:
    journald reads each line as its own entry."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def under_journald(stream: TextIO, env: Mapping[str, str] = os.environ) -> bool:
    """Whether `stream` is the journal stream $JOURNAL_STREAM names (its device and inode)."""
    dev, _, ino = env.get(ENV, "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file (a test's capture)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def formatter(stream: TextIO = sys.stderr, env: Mapping[str, str] = os.environ) -> logging.Formatter:
    """The agent's log format for `stream`: journald's when it is the journal, else with timestamps."""
    return JournaldFormatter() if under_journald(stream, env) else logging.Formatter(PLAIN_FORMAT)
