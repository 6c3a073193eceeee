"""Fleet membership pushed to a running agent (the SetPeers RPC of `phaul host add/remove`).

An update replaces the agent's peers and adds certificate serials to its revocation
list, live and kept across restarts, without a restart:

- the peers are written to `STATE_DIR/peers.json` ({"peers": [...]}); when that file
  exists it takes the place of the configuration's `peers` (at start-up and on every
  SIGHUP reload: `effective`). Delete it to go back to the configuration's list.
- the serials are added to the agent's revocation list file (the configured one, else
  `STATE_DIR/revoked.txt`, which the agent then reads from start-up on). Serials are
  only ever added.
- both are applied through the SIGHUP path, `Host.reload`, so calls, streams and
  migrations running go on, and a peer removed is refused at its next call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from phaul.agent.host import Host
from phaul.channels.revocation import REVOKED_FILE, REVOKED_HEADER, format_serial, parse_serial, read_serials
from phaul.config import AgentConfig
from phaul.errors import InvalidInput
from phaul.linux.fsutil import write_atomic
from phaul.validate import check_id

log = logging.getLogger(__name__)

PEERS_FILE = "peers.json"
MAX_PEERS = 1000
MAX_SERIALS = 10000


@dataclass(frozen=True)
class PeersUpdate:
    """A checked update: the complete new peer list and serials to refuse from now on."""

    peers: frozenset[str]
    revoked: frozenset[int]

    @classmethod
    def parse(cls, peers: Iterable[str], serials: Iterable[str], host_name: str) -> PeersUpdate:
        """Check what an admin sent (names are certificate names, serials hex)."""
        names, given = list(peers), list(serials)
        if len(names) > MAX_PEERS or len(given) > MAX_SERIALS:
            raise InvalidInput(f"too many peers ({len(names)}) or serials ({len(given)})",
                               f"send at most {MAX_PEERS} peers and {MAX_SERIALS} serials")
        checked = frozenset(check_id(n, "peer host name") for n in names)
        if host_name in checked:
            raise InvalidInput(f"{host_name} cannot be its own peer", f"leave {host_name} out of the peer list")
        return cls(checked, frozenset(parse_serial(s) for s in given))


def effective_peers(configured: frozenset[str], state_dir: Path) -> frozenset[str]:
    """The peers an agent runs with: those last pushed (STATE_DIR/peers.json), else `configured`."""
    path = Path(state_dir) / PEERS_FILE
    try:
        doc = json.loads(path.read_text())
        peers = doc["peers"]
        if not isinstance(peers, list):
            raise TypeError("peers is not a list")
        pushed = frozenset(check_id(str(n), "peer host name") for n in peers)
    except FileNotFoundError:
        return configured
    except (OSError, ValueError, KeyError, TypeError, InvalidInput) as e:
        raise InvalidInput(f"{path} is not a peer list: {e}", f"delete {path} (the configuration's peers apply again)") from e
    if pushed != configured:
        log.info("peers from %s (pushed by `phaul host add/remove`): %s", path, ", ".join(sorted(pushed)) or "none")
    return pushed


def effective(config: AgentConfig, state_dir: Path) -> AgentConfig:
    """`config` with what was pushed: its peers (`effective_peers`) and revocation list (`revocation_list`)."""
    return dataclasses.replace(config, peers=effective_peers(config.peers, state_dir),
                               revoked=revocation_list(config.revoked, state_dir))


def revocation_list(configured: Path | None, state_dir: Path) -> Path | None:
    """The revocation list an agent reads: the configured one, else STATE_DIR/revoked.txt once a push made it."""
    if configured is not None:
        return configured
    pushed = Path(state_dir) / REVOKED_FILE
    return pushed if pushed.exists() else None


def apply(host: Host, base: AgentConfig, update: PeersUpdate) -> tuple[int, Path]:
    """Write `update` where it is kept and apply it to the running `host` through `Host.reload`
    (`base`: the configuration it runs with); return (serials new to the revocation list, its path)."""
    path = host.revocations.path if host.revocations is not None else host.state_dir / REVOKED_FILE
    fresh = dataclasses.replace(base, peers=update.peers, admins=host.admins, revoked=path)
    write_atomic(host.state_dir / PEERS_FILE, json.dumps({"peers": sorted(update.peers)}) + "\n", 0o644)
    new = sorted(update.revoked - read_serials(path))
    if new:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = REVOKED_HEADER
        text += "".join(f"{format_serial(s)}  pushed by an admin (SetPeers)\n" for s in new)
        write_atomic(path, text, 0o644)
    summary = host.reload(fresh)
    log.info("SetPeers: %d serial(s) added to %s; %s", len(new), path, summary)
    return len(new), path
