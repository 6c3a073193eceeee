"""The agent's signals as a sequence the main thread reads: SIGTERM and SIGINT stop
it, SIGHUP reloads its configuration (`systemctl reload phaul-agent`).

The kernel may deliver a signal sent to the process to any of its threads (gRPC's
own included). Python then runs its handler in the main thread only once that
thread executes again, and a main thread blocked in `read()` never would: a SIGHUP
taken by another thread waited until the next signal that happened to reach the
main thread. So the signals are read through Python's wakeup fd
(`signal.set_wakeup_fd`), which the C-level handler writes the signal's number to
from whichever thread took it; the Python handlers do nothing.
"""

from __future__ import annotations

import enum
import os
import signal
from types import FrameType


class Signal(enum.Enum):
    STOP = "stop"
    RELOAD = "reload"


_BY_SIGNAL = {signal.SIGTERM: Signal.STOP, signal.SIGINT: Signal.STOP, signal.SIGHUP: Signal.RELOAD}


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the wakeup fd already carries the signal."""


class Signals:
    """Installs the handlers and the wakeup fd (in the main thread); `next()` blocks until one came."""

    def __init__(self) -> None:
        self._r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)  # a full pipe drops the byte, never blocks the handler
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in _BY_SIGNAL:
            signal.signal(sig, _ignore)

    def next(self) -> Signal:
        """The next of our signals received (in order); others that wrote to the wakeup fd are skipped."""
        while True:
            signum = os.read(self._r, 1)[0]
            if signum in _BY_SIGNAL:
                return _BY_SIGNAL[signal.Signals(signum)]
