"""The hosts file: which agents the CLI can talk to, and with which credentials.

Looked up as `--hosts-file`, else $PHAUL_HOSTS_FILE, else the lab's hosts file
(LAB_DIR/hosts.json, written by `phaul lab up`; $PHAUL_LAB_DIR moves it), else
/etc/phaul/hosts.json. The format, JSON::

    {"pki": {"ca": "pki/ca.crt", "cert": "pki/admin.crt", "key": "pki/admin.key"},
     "hosts": {"alpha": {"address": "10.0.0.11:7473", "socket": "/run/phaul/agent.sock",
                         "bridge": "br0"},
               "beta": {"address": "[fd00:7068::12]:7473"},
               "gamma": {"address": "gamma.example.net:7473"}}}

An address is IPV4:PORT, [IPV6]:PORT or HOSTNAME:PORT (phaul.endpoint); a host
name is resolved where it is dialed, and the agent's certificate is checked
against the host's name (the key, e.g. "gamma"), whatever address it is
reached at.

Relative paths are relative to the file. `socket`, `netns`, `bridge` and
`state_dir` are optional (the lab fills them in); `subnet` and `client`
describe the lab.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from phaul.channels import pki
from phaul.endpoint import parse_endpoint
from phaul.errors import InvalidInput, NotFound, PhaulError

log = logging.getLogger(__name__)

LAB_DIR = Path("/var/lib/phaul-lab")
LAB_DIR_ENV = "PHAUL_LAB_DIR"
HOSTS_FILE_ENV = "PHAUL_HOSTS_FILE"
ETC_HOSTS_FILE = Path("/etc/phaul/hosts.json")
ADMIN = "admin"  # the CLI's certificate name


def default_lab_dir() -> Path:
    """The lab directory: $PHAUL_LAB_DIR if set, else /var/lib/phaul-lab."""
    env = os.environ.get(LAB_DIR_ENV)
    return Path(env).absolute() if env else LAB_DIR




@dataclass(frozen=True)
class PkiFiles:
    """The TLS files the CLI presents to agents."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class HostEntry:
    """One agent host: where to reach it and, in the lab, where it lives."""

    name: str
    address: str  # "HOST:PORT" (phaul.endpoint: IPv4, [IPv6] or a host name)
    socket: Path | None = None
    netns: str | None = None
    bridge: str | None = None
    state_dir: Path | None = None

    @property
    def ip(self) -> str:
        """The host part: an IP address (no brackets) or a host name."""
        return parse_endpoint(self.address).host

    @property
    def port(self) -> int:
        return parse_endpoint(self.address).port


@dataclass(frozen=True)
class ClientEntry:
    """The lab's client namespace."""

    netns: str
    address: str


@dataclass(frozen=True)
class HostsFile:
    """A parsed hosts.json: the hosts the CLI can talk to and the credentials to use."""

    path: Path
    subnet: str | None
    pki: PkiFiles
    hosts: dict[str, HostEntry]
    client: ClientEntry | None = None

    def host(self, name: str) -> HostEntry:
        """The entry for host `name`, or NotFound naming the known hosts."""
        try:
            return self.hosts[name]
        except KeyError:
            raise NotFound(
                f"no host {name!r} in {self.path}", f"known hosts: {', '.join(sorted(self.hosts)) or 'none'}"
            ) from None

    def to_dict(self) -> dict:
        """The JSON form written to hosts.json."""
        hosts = {}
        for name, h in self.hosts.items():
            entry: dict[str, str] = {"address": h.address}
            for key in ("socket", "netns", "bridge", "state_dir"):
                value = getattr(h, key)
                if value is not None:
                    entry[key] = str(value)
            hosts[name] = entry
        out: dict = {"subnet": self.subnet, "pki": {k: str(v) for k, v in asdict(self.pki).items()}, "hosts": hosts}
        if self.client is not None:
            out["client"] = asdict(self.client)
        return out


def read_hosts(path: Path | None = None) -> HostsFile:
    """Find and parse the hosts file: `path`, else $PHAUL_HOSTS_FILE, else LAB_DIR/hosts.json,
    else /etc/phaul/hosts.json. Relative paths inside it are relative to the file."""
    if path is not None:
        candidates = [(Path(path), "the given hosts file")]
    elif os.environ.get(HOSTS_FILE_ENV):
        candidates = [(Path(os.environ[HOSTS_FILE_ENV]), f"${HOSTS_FILE_ENV}")]
    else:
        candidates = [(default_lab_dir() / "hosts.json", ""), (ETC_HOSTS_FILE, "")]
    for candidate, what in candidates:
        if candidate.exists():
            return _parse_hosts(candidate)
        if what:
            raise NotFound(f"{what} {candidate} does not exist", "check the path, or run `phaul lab up`")
    raise NotFound(
        "no hosts file", f"run `phaul lab up` or write {ETC_HOSTS_FILE} (or set ${HOSTS_FILE_ENV})"
    )


def _parse_hosts(path: Path) -> HostsFile:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise InvalidInput(f"cannot read hosts file {path}: {e.strerror}", "check its owner and mode") from e
    except json.JSONDecodeError as e:
        raise InvalidInput(
            f"hosts file {path} is not valid JSON: {e}", "fix the file, or re-create it with `phaul lab up`"
        ) from e
    fix = "see the format in phaul/hosts.py (`phaul lab up` writes an example)"
    if not isinstance(data, dict) or not isinstance(data.get("hosts"), dict):
        raise InvalidInput(f"hosts file {path} has no \"hosts\" object", fix)
    base = path.parent

    def p(value: object, where: str) -> Path:
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"hosts file {path}: {where} must be a path string", fix)
        return (base / value) if not Path(value).is_absolute() else Path(value)

    pki_data = data.get("pki") or {}
    if not isinstance(pki_data, dict):
        raise InvalidInput(f"hosts file {path}: \"pki\" must be an object", fix)
    files = PkiFiles(
        ca=p(pki_data.get("ca", str(pki.DEFAULT_PKI_DIR / "ca.crt")), "pki.ca"),
        cert=p(pki_data.get("cert", str(pki.DEFAULT_PKI_DIR / f"{ADMIN}.crt")), "pki.cert"),
        key=p(pki_data.get("key", str(pki.DEFAULT_PKI_DIR / f"{ADMIN}.key")), "pki.key"),
    )
    hosts: dict[str, HostEntry] = {}
    for name, h in data["hosts"].items():
        if not isinstance(h, dict):
            raise InvalidInput(f"hosts file {path}: host {name!r} must be an object", fix)
        address = h.get("address")
        if not isinstance(address, str):
            raise InvalidInput(f"hosts file {path}: host {name!r} needs \"address\": \"HOST:PORT\"", fix)
        address = str(parse_endpoint(address, f"hosts file {path}: the address of host {name!r}"))
        hosts[name] = HostEntry(
            name=name,
            address=address,
            socket=p(h["socket"], f"hosts.{name}.socket") if h.get("socket") else None,
            netns=h.get("netns"),
            bridge=h.get("bridge"),
            state_dir=p(h["state_dir"], f"hosts.{name}.state_dir") if h.get("state_dir") else None,
        )
    client = data.get("client")
    return HostsFile(
        path=path,
        subnet=data.get("subnet"),
        pki=files,
        hosts=hosts,
        client=ClientEntry(netns=client["netns"], address=client["address"]) if isinstance(client, dict) else None,
    )


def try_hosts(path: Path) -> HostsFile | None:
    """The lab's own hosts file, or None when it is missing or unreadable (up rewrites it)."""
    if not path.exists():
        return None
    try:
        return _parse_hosts(path)
    except PhaulError as e:
        log.warning("ignoring %s: %s", path, e.message)
        return None
