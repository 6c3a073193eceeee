"""The agent's signals as a sequence the main thread reads: SIGTERM and SIGINT stop
it, SIGHUP reloads its configuration (`systemctl reload phaul-agent`).

A handler only writes one byte to a pipe, which is safe whatever the main
thread was doing when the signal came (taking a lock in a handler is not: the
interrupted code may hold it); `next()` reads them in order.
"""

from __future__ import annotations

import enum
import os
import signal
from types import FrameType


class Signal(enum.Enum):
    STOP = b"S"
    RELOAD = b"H"


_BY_SIGNAL = {signal.SIGTERM: Signal.STOP, signal.SIGINT: Signal.STOP, signal.SIGHUP: Signal.RELOAD}


class Signals:
    """Installs the handlers (in the main thread); `next()` blocks until one came."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._w, False)  # a full pipe drops the byte, never blocks the handler
        for sig in _BY_SIGNAL:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        try:
            os.write(self._w, _BY_SIGNAL[signal.Signals(signum)].value)
        except BlockingIOError:
            pass  # 64 KiB of unread signals: this one changes nothing

    def next(self) -> Signal:
        """The next signal received (in order)."""
        return Signal(os.read(self._r, 1))
