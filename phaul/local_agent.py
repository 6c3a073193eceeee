"""The agent running on this machine, for the CLI's default `--host`.

An agent run from its configuration file (a service, `phaul agent install-unit`)
serves the local CLI on /run/phaul/agent.sock (phaul.agent.config.DEFAULT_SOCKET;
$PHAUL_AGENT_SOCKET names another). When that socket exists, `phaul` without
--host and $PHAUL_HOST talks to it. Its name (which its certificate must carry)
comes from the hosts file's entry with that socket, else from the agent's own
configuration file; the CLI's certificate from the hosts file, else
/etc/phaul/pki/admin.crt, admin.key and ca.crt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from phaul.agent.config import DEFAULT_CONFIG, DEFAULT_SOCKET, load_config
from phaul.channels import pki
from phaul.endpoint import agent_endpoints
from phaul.errors import InvalidInput
from phaul.hosts import ADMIN, HostEntry, HostsFile, PkiFiles

log = logging.getLogger(__name__)

SOCKET_ENV = "PHAUL_AGENT_SOCKET"
DEFAULT_PKI = PkiFiles(
    ca=pki.DEFAULT_PKI_DIR / "ca.crt", cert=pki.DEFAULT_PKI_DIR / f"{ADMIN}.crt", key=pki.DEFAULT_PKI_DIR / f"{ADMIN}.key",
)


def local_socket() -> Path:
    """Where the local agent serves the CLI: $PHAUL_AGENT_SOCKET, else /run/phaul/agent.sock."""
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


def find_local_agent(hosts: HostsFile | None, config: Path | None = None) -> HostEntry | None:
    """The agent whose socket is on this machine, or None when there is no socket. Its name comes
    from `hosts`, else from its configuration (`config`, default /etc/phaul/agent.toml).
    InvalidInput when a socket is there but nothing says whose it is."""
    config = config or DEFAULT_CONFIG
    sock = local_socket()
    if not sock.exists():
        return None
    for entry in (hosts.hosts.values() if hosts is not None else ()):
        if entry.socket is not None and _same(entry.socket, sock):
            return entry
    if config.exists():
        try:
            cfg = load_config(config)
        except InvalidInput as e:
            log.warning("cannot tell the local agent's name from %s: %s", config, e.message)
        else:
            if cfg.socket is not None and _same(cfg.socket, sock):
                advertised = agent_endpoints(cfg.listen, cfg.advertise)[1]  # load_config checked them
                return HostEntry(name=cfg.name, address=str(advertised), socket=sock)
    raise InvalidInput(
        f"an agent socket is at {sock}, but neither the hosts file nor {config} says whose it is",
        "name the agent with --host NAME (or $PHAUL_HOST), or add `\"socket\": \"" + str(sock) + "\"` to its entry "
        "in the hosts file",
    )


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False
