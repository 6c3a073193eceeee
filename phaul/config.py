"""What an agent runs with and what a migration does by default: one
configuration object each, built once (from the command line) and passed in.
Nothing here is a module global that code changes at run time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from phaul.channels.transport import Credentials


@dataclass(frozen=True)
class Timeouts:
    """How long an agent waits for things, in seconds."""

    gate: float = 300.0  # a dumped container held frozen this long without a decision resumes
    link: float = 30.0  # a data channel that moves nothing this long while it has data to move is dead
    dump: float = 300.0  # a CRIU dump (a pre-copy round or the final dump) must end within this
    restore: float = 300.0  # `runc restore` on the destination, and applying a page delta there
    resolve_interval: float = 15.0  # unsettled migrations are retried this often; 0: only at start-up

    @property
    def call(self) -> float:
        """How long one call to a peer may wait on a link that may be dead."""
        return max(5.0, self.link)


@dataclass(frozen=True)
class MigrationOptions:
    """How one migration runs; the defaults are `phaul migrate`'s."""

    tcp: str = "keep"  # keep | close: established TCP connections travel, or end with a FIN
    precopy: str = "auto"  # auto | off (a single stop-and-copy)
    max_rounds: int = 8  # pre-copy rounds at most
    max_downtime_ms: int = 300  # pre-copying stops once the predicted freeze is within this
    bandwidth: int = 0  # bytes/s cap of the pre-copy rounds, 0 = none (the frozen phase is never capped)
    force: tuple[str, ...] = ()  # preflight checks whose failure does not stop the migration


@dataclass(frozen=True)
class AgentConfig:
    """Everything `phaul agent` runs with."""

    name: str  # this host's name, as in its certificate
    listen: str  # ADDR:PORT served (mutual TLS)
    state_dir: Path
    creds: Credentials
    socket: Path | None = None  # also served on this unix socket, for the local CLI
    bridge: str | None = None  # the bridge addressed containers are plugged into
    peers: frozenset[str] = frozenset()  # hosts this one migrates to and from
    admins: frozenset[str] = frozenset()  # clients that manage containers and migrations
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_migrations: int = 4  # outgoing migrations at once
