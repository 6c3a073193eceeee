"""sd_notify: tell the service manager (systemd, Type=notify) what the agent is doing.

The protocol (sd_notify(3)): one datagram of newline-separated `KEY=VALUE`
lines to the AF_UNIX socket named by $NOTIFY_SOCKET, a path or, starting
with '@', an abstract name. Without $NOTIFY_SOCKET every call does nothing.
`from_environment` removes the variable, as sd_notify's `unset_environment`
does: the agent's children must not see it (runc, given a NOTIFY_SOCKET,
would proxy it into the container and wait for the container's READY=1).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


class Notifier:
    """Sends state changes to one notify socket (or nowhere, for `address=None`)."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] = os.environ) -> Notifier:
        """The notifier $NOTIFY_SOCKET names, which is removed from `env` (children must not inherit it)."""
        return cls(env.pop(ENV, None))

    def ready(self, status: str = "") -> None:
        """The agent serves (also: a reload has ended)."""
        self.send("READY=1", *self._status(status))

    def reloading(self, status: str = "") -> None:
        """A reload begins; `ready` ends it. MONOTONIC_USEC is what systemd 253+ asks of it."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                  *self._status(status))

    def stopping(self, status: str = "") -> None:
        """The agent is shutting down."""
        self.send("STOPPING=1", *self._status(status))

    def status(self, status: str) -> None:
        """A free-form line `systemctl status` shows."""
        self.send(*self._status(status))

    @staticmethod
    def _status(text: str) -> list[str]:
        return [f"STATUS={' '.join(text.split())}"] if text else []  # one line: a newline would end the field

    def send(self, *lines: str) -> bool:
        """Send one datagram of `lines`; False (logged) when there is no socket or it failed.
        A lost notification never stops the agent: systemd times the start out instead."""
        if self.address is None or not lines:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), target)
        except OSError as e:
            log.warning("cannot notify the service manager at %s: %s", self.address, e)
            return False
        return True
