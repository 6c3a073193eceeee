"""Network endpoints: `HOST:PORT` as users, config files, hosts files and peers write them.

HOST is an IPv4 address (`10.213.0.11:7473`), an IPv6 address in brackets
(`[fd00:7068::11]:7473`) or a DNS host name (`alpha.example.net:7473`). Every
place that reads an address parses it here (`parse_endpoint`, a plain function of
a string) and every place that builds one formats an `Endpoint`: its `str()` is
the canonical `HOST:PORT` (brackets around IPv6), `grpc_target` the gRPC
target (`ipv4:` / `ipv6:` / `dns:`), and `resolve()` turns a host name into the
address a tool such as socat is given.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, replace

from phaul.errors import InvalidInput, Unreachable

log = logging.getLogger(__name__)

FORMS = "10.213.0.11:7473, [fd00:7068::11]:7473 or alpha.example.net:7473"
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")


class HostKind(enum.Enum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    NAME = "name"


@dataclass(frozen=True)
class Endpoint:
    """A validated HOST:PORT. `host`: an IP address in its compressed form (no
    brackets) or a lower-case DNS name."""

    host: str
    port: int
    kind: HostKind

    def __str__(self) -> str:
        return f"{self.host_text}:{self.port}"

    @property
    def host_text(self) -> str:
        """The host as written before `:PORT` (an IPv6 address in brackets)."""
        return host_text(self.host)

    @property
    def grpc_target(self) -> str:
        """The gRPC channel target: `ipv4:A:P`, `ipv6:[A]:P` or `dns:NAME:P`."""
        scheme = {HostKind.IPV4: "ipv4", HostKind.IPV6: "ipv6", HostKind.NAME: "dns"}[self.kind]
        return f"{scheme}:{self}"

    @property
    def is_wildcard(self) -> bool:
        """0.0.0.0 or [::]: every address of the host, which no peer can dial."""
        return self.kind is not HostKind.NAME and ipaddress.ip_address(self.host).is_unspecified

    def with_port(self, port: int) -> Endpoint:
        """The same host on `port` (a port a peer named: checked)."""
        return replace(self, port=_check_port(str(port), str(self)))

    def resolve(self) -> Endpoint:
        """This endpoint with an IP address: itself, or a host name's first address
        (in the order of getaddrinfo, RFC 6724), or Unreachable."""
        if self.kind is not HostKind.NAME:
            return self
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise Unreachable(
                f"cannot resolve host name {self.host!r}: {e.strerror}",
                "check the name, and DNS or /etc/hosts on this host; or give an IP address",
            ) from None
        for fam, _, _, _, sockaddr in infos:
            if fam in (socket.AF_INET, socket.AF_INET6):
                log.debug("host name %s is %s", self.host, sockaddr[0])
                return parse_host(str(sockaddr[0]), self.port)
        raise Unreachable(f"host name {self.host!r} has no IPv4 or IPv6 address", "check its DNS records")


def host_text(host: str) -> str:
    """An address or host name as written before `:PORT`: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def parse_endpoint(value: str, what: str = "address", default_port: int | None = None) -> Endpoint:
    """Parse HOST:PORT (`what` names it in errors, e.g. "--listen"); with `default_port`,
    a HOST alone takes that port. Raises InvalidInput naming the problem and the forms."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} is empty", f"write HOST:PORT, e.g. {FORMS}")
    if value != value.strip() or any(c.isspace() for c in value):
        raise InvalidInput(f"{what} {value!r} has white space", f"write HOST:PORT, e.g. {FORMS}")
    if value.startswith("["):
        m = re.fullmatch(r"\[([^\[\]]*)\](?::(.*))?", value)
        if m is None:
            raise InvalidInput(f"{what} {value!r} has unbalanced brackets", "write an IPv6 address as [ADDRESS]:PORT")
        host, port = m.group(1), m.group(2)
        if not _is_ipv6(host):
            raise InvalidInput(
                f"{what} {value!r}: {host!r} in brackets is not an IPv6 address",
                "brackets are for IPv6 addresses only; write an IPv4 address or a host name without them",
            )
        if port is not None:
            return parse_host(host, _check_port(port, value, what), what)
        if default_port is None:
            raise InvalidInput(f"{what} {value!r} has no port", f"add one, e.g. {value}:7473")
        return parse_host(host, default_port, what)
    if value.count(":") > 1:
        raise InvalidInput(
            f"{what} {value!r}: an IPv6 address needs brackets", "write [ADDRESS]:PORT, e.g. [fd00:7068::11]:7473",
        )
    host, sep, port = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise InvalidInput(f"{what} {value!r} has no port", f"write HOST:PORT, e.g. {value}:7473")
        return parse_host(value, default_port, what)
    return parse_host(host, _check_port(port, value, what), what)


def parse_host(host: str, port: int, what: str = "address") -> Endpoint:
    """An Endpoint of a bare host (IPv4, IPv6 without brackets, or DNS name) and a checked port."""
    if not host:
        raise InvalidInput(f"{what} has no host before the port", f"write HOST:PORT, e.g. {FORMS}")
    if "%" in host:
        raise InvalidInput(
            f"{what}: {host!r} has a scope (a link-local address)", "use a global or unique-local (fd00::/8) address",
        )
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            raise InvalidInput(f"{what}: {host!r} is an IPv4-mapped IPv6 address", f"write the IPv4 address {ip.ipv4_mapped}")
        kind = HostKind.IPV4 if ip.version == 4 else HostKind.IPV6
        return Endpoint(ip.compressed, _check_port(str(port), host, what), kind)
    if re.fullmatch(r"[0-9.]+", host):
        raise InvalidInput(f"{what}: {host!r} is not a valid IPv4 address", "write four numbers from 0 to 255, e.g. 10.213.0.11")
    name = host.lower().removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise InvalidInput(
            f"{what}: {host!r} is neither an IP address nor a valid host name",
            "a host name has labels of letters, digits and '-' (not at either end) separated by dots, "
            f"e.g. {FORMS}",
        )
    return Endpoint(name, _check_port(str(port), host, what), HostKind.NAME)


def _check_port(port: str, value: str, what: str = "address") -> int:
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise InvalidInput(f"{what} {value!r}: invalid port {port!r}", "give a port from 1 to 65535, e.g. :7473")
    return int(port)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def agent_endpoints(
    listen: str, advertise: str | None = None, *, listen_what: str = "--listen", advertise_what: str = "--advertise",
) -> tuple[Endpoint, Endpoint]:
    """An agent's (listen, advertise) endpoints from their strings: `advertise` (HOST
    or HOST:PORT, the port defaulting to the listen port) is what peers and the CLI
    are told to dial back, and defaults to `listen`, which must then not be a wildcard."""
    bind = parse_endpoint(listen, listen_what)
    if not advertise:
        if bind.is_wildcard:
            raise InvalidInput(
                f"{listen_what} {bind} is every address of this host, which peers cannot dial back",
                f"add {advertise_what} (the address peers reach this host at, e.g. "
                + ("[fd00:7068::11]" if bind.kind is HostKind.IPV6 else "10.213.0.11")
                + "), or listen on that address",
            )
        return bind, bind
    told = parse_endpoint(advertise, advertise_what, default_port=bind.port)
    if told.is_wildcard:
        raise InvalidInput(
            f"{advertise_what} {told} is a wildcard, which peers cannot dial",
            "give the address or host name peers reach this host at",
        )
    return bind, told
