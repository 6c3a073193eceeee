"""What an agent knows about the host it runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from phaul.channels.revocation import RevocationList
from phaul.channels.transport import Credentials
from phaul.config import AgentConfig, Limits, Timeouts
from phaul.containers import ContainerKind
from phaul.endpoint import parse_endpoint
from phaul.errors import InvalidInput
from phaul.migration.journal import Journal
from phaul.migration.steps import NO_HOOK, StepHook
from phaul.validate import check_id


@dataclass
class Host:
    """One host: its name (as in its certificate), state directory, credentials,
    listening address, its containers and its migration journal."""

    name: str
    state_dir: Path
    creds: Credentials
    listen: str  # HOST:PORT the agent serves on (phaul.endpoint)
    containers: ContainerKind
    hook: StepHook = NO_HOOK  # called at each step boundary of its migrations (a test agent plugs one in)
    bridge: str | None = None  # the bridge addressed containers are plugged into (phaul.linux.network)
    peers: frozenset[str] = field(default_factory=frozenset)  # hosts this one migrates to and from
    admins: frozenset[str] = field(default_factory=frozenset)  # clients that manage containers and migrations
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    revocations: RevocationList | None = None  # certificates refused on every RPC (phaul.channels.revocation)
    advertise: str = ""  # HOST:PORT peers dial back (the source address of its migrations); "": listen
    journal: Journal = field(init=False, repr=False)  # the one journal of state_dir, shared by every part of the agent

    def __post_init__(self) -> None:
        self.journal = Journal(self.state_dir)

    def reload(self, config: AgentConfig) -> str:
        """Take the peers, admins and revocation list of `config` (a fresh agent.toml on SIGHUP,
        or a list an admin pushes) for every call from now on: calls, streams and migrations
        running go on, and a peer removed is refused at its next call. InvalidInput, with
        nothing changed, when they are wrong. Returns what it now holds, in one line."""
        check_access(config.peers, config.admins)
        revocations = RevocationList(config.revoked) if config.revoked is not None else None
        serials = len(revocations.serials()) if revocations is not None else 0  # read now, not at the next call
        self.peers, self.admins, self.revocations = config.peers, config.admins, revocations
        listed = f"{config.revoked} ({serials} serials)" if config.revoked is not None else "none"
        return (f"peers {', '.join(sorted(self.peers)) or '-'}; admins {', '.join(sorted(self.admins)) or '-'}; "
                f"revocation list {listed}")

    @property
    def address(self) -> str:
        """The IP address this host's data channels bind to: the listen address's
        (a host name resolved, a wildcard kept)."""
        return parse_endpoint(self.listen, "listen address").resolve().host

    @property
    def advertised(self) -> str:
        """HOST:PORT peers are told to dial back."""
        return self.advertise or self.listen

    def advertised_port(self, port: int) -> str:
        """HOST:PORT of a data channel of this host on `port`, for a peer to dial."""
        return str(parse_endpoint(self.advertised, "advertise address").with_port(port))

    def migration_dir(self, migration_id: str) -> Path:
        """The directory of a migration this host sends (the source role); refuses
        an ID that is not a plain name."""
        return self.state_dir / "migrations" / check_id(migration_id, "migration ID")

    def incoming_dir(self, migration_id: str) -> Path:
        """The directory of a migration this host receives (the destination role),
        agent-owned; the peer writes only into its `recv/` (phaul.migration.dest)."""
        return self.state_dir / "incoming" / check_id(migration_id, "migration ID")


def check_access(peers: frozenset[str], admins: frozenset[str]) -> None:
    """Who may call an agent: certificate names, and at least one of them."""
    for n in peers | admins:
        check_id(n, "certificate name")
    if not (peers | admins):
        raise InvalidInput("the agent would accept nobody", "name its peer hosts with --peers and its clients with --admins")
