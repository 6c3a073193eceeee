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
class Limits:
    """What an agent accepts at once: a compromised or runaway peer can use up
    its own share, never the admins' or the other peers'."""

    incoming: int = 8  # migrations this host receives at once, from all peers
    incoming_per_peer: int = 4  # ... from one peer
    peer_calls: int = 32  # calls from peers running at once
    peer_calls_each: int = 12  # ... from one peer
    admin_calls: int = 24  # calls from admins running at once (the CLI), each admin up to all of them
    quota_factor: float = 2.0  # a migration may write its declared size times this into the state directory
    quota_extra: int = 512 << 20  # ... plus this many bytes (files that change while it runs)
    disk_reserve: int = 256 << 20  # incoming data never fills the state directory's file system beyond this
    idle_prepared: float = 900.0  # s: a prepared migration with no call and no byte received this long is removed

    def quota(self, declared: int) -> int:
        """The bytes a migration that declared `declared` may write on this host."""
        return int(declared * self.quota_factor) + self.quota_extra


@dataclass(frozen=True)
class MigrationOptions:
    """How one migration runs; the defaults are `phaul migrate`'s."""

    tcp: str = "keep"  # keep | close: established TCP connections travel, or end with a FIN
    method: str = "auto"  # phaul.memory.choice.REQUESTS: auto | precopy | postcopy | hybrid | stop-and-copy
    max_rounds: int = 8  # pre-copy rounds at most
    max_downtime_ms: int = 300  # pre-copying stops once the predicted freeze is within this
    bandwidth: int = 0  # bytes/s cap of the pre-copy rounds, 0 = none (the frozen phase is never capped)
    force: tuple[str, ...] = ()  # preflight checks whose failure does not stop the migration
    offline: bool = False  # stop, sync, start (phaul.migration.offline); also when the container is not running
    copy_as: str = ""  # a copy under this ID, the source left as it is (offline); "": a move
    copy_ip: str = ""  # the copy's ADDR/PREFIX; "": none


@dataclass(frozen=True)
class AgentConfig:
    """Everything `phaul agent` runs with: from its flags, or from agent.toml
    (phaul.agent.config) with the flags given overriding the file."""

    name: str  # this host's name, as in its certificate
    listen: str  # HOST:PORT served (mutual TLS; phaul.endpoint)
    state_dir: Path
    creds: Credentials
    socket: Path | None = None  # also served on this unix socket, for the local CLI
    bridge: str | None = None  # the bridge addressed containers are plugged into
    cache_dir: Path = Path("/var/cache/phaul/rootfs")  # built root file systems (debian template), one tarball per package set
    build_netns: Path | None = None  # network namespace template builds download in (None: the agent's)
    workload_dir: Path | None = None  # the workload programs templates add (None: phaul.containers.workloads.find())
    peers: frozenset[str] = frozenset()  # hosts this one migrates to and from
    admins: frozenset[str] = frozenset()  # clients that manage containers and migrations
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_migrations: int = 4  # outgoing migrations at once
    revoked: Path | None = None  # revocation list (phaul.channels.revocation): callers with these serials are refused
    limits: Limits = field(default_factory=Limits)
    advertise: str | None = None  # HOST[:PORT] peers dial back (None: listen; phaul.endpoint.agent_endpoints)
