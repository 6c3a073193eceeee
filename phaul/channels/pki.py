"""A small certificate authority for the agents' mutual TLS.

One directory holds `ca.crt`/`ca.key` and a `NAME.crt`/`NAME.key` pair per host
or user. Keys are EC P-256 and written with mode 0600. `load` returns the paths
and bytes a gRPC channel or server needs, after checking that they belong
together.

`issued.json` records every certificate issued (serial, CN, SANs, validity,
issue time) for `phaul pki list`; `revoked.txt` is the revocation list agents
check (phaul.channels.revocation describes its format). `issue` refuses a name
or address that another host's certificate (or the hosts file) already holds:
a certificate naming another host would let its holder pass for that host.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from phaul.channels.revocation import REVOKED_FILE, REVOKED_HEADER, format_serial, parse_serial, read_serials
from phaul.errors import Conflict, InvalidInput, NotFound
from phaul.linux.fsutil import write_atomic
from phaul.validate import check_id

log = logging.getLogger(__name__)

DEFAULT_PKI_DIR = Path("/etc/phaul/pki")
CA_NAME = "ca"
RECORD_FILE = "issued.json"
CA_VALIDITY = datetime.timedelta(days=3650)
CERT_VALIDITY = datetime.timedelta(days=365)
CLOCK_SKEW = datetime.timedelta(minutes=5)
_DNS = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$", re.I)


class BadCredentials(InvalidInput):
    """A certificate or key exists but cannot be used (unreadable, expired, wrong CA or key)."""


@dataclass(frozen=True)
class IssuedCert:
    """A checked certificate, its key and the CA that signed it, as paths and PEM bytes."""

    name: str
    ca: Path
    cert: Path
    key: Path
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    not_after: datetime.datetime
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class Issued:
    """One certificate this PKI directory issued, as `issued.json` records it."""

    serial: str  # hex, as revocation.format_serial writes it
    name: str  # the CN
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    not_after: str  # ISO 8601, UTC
    issued_at: str

    def status(self, now: datetime.datetime, revoked: frozenset[int], current: Mapping[str, str]) -> str:
        """revoked, expired, replaced (NAME.crt is a newer certificate) or valid."""
        if parse_serial(self.serial) in revoked:
            return "revoked"
        if datetime.datetime.fromisoformat(self.not_after) < now:
            return "expired"
        return "valid" if current.get(self.name) == self.serial else "replaced"


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
    not_before: datetime.datetime, not_after: datetime.datetime, *, ca: bool,
) -> x509.CertificateBuilder:
    """What every phaul certificate starts with: the CA's signs certificates only, a
    host's signs its TLS handshakes only."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )


def init_ca(pki_dir: Path, name: str = "phaul CA", *, force: bool = False) -> Path:
    """Create a CA in `pki_dir` (ca.crt, ca.key with mode 0600) and return the path of ca.crt.

    Refuses to replace an existing CA unless `force`: every certificate it signed
    stops being trusted."""
    pki_dir = Path(pki_dir)
    crt, key_path = pki_dir / "ca.crt", pki_dir / "ca.key"
    if (crt.exists() or key_path.exists()) and not force:
        raise Conflict(
            f"a CA already exists in {pki_dir}",
            "keep it, or pass force to replace it (then re-issue every certificate)",
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(subject, subject, key.public_key(), now - CLOCK_SKEW, now + CA_VALIDITY, ca=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _ensure_dir(pki_dir)
    write_atomic(key_path, _key_pem(key), 0o600)
    write_atomic(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("created CA %r in %s", name, pki_dir)
    return crt


def issue(
    pki_dir: Path, name: str, ips: list[str] | None = None, dns: list[str] | None = None, *,
    hosts: Mapping[str, Iterable[str]] | None = None, force: bool = False,
) -> tuple[Path, Path]:
    """Issue NAME.crt/NAME.key signed by the CA in `pki_dir`; return (cert path, key path).

    CN=name; SAN DNS:name plus `dns` and `ips`; serverAuth and clientAuth; one
    year. Replaces an existing certificate of the same name. Refuses (Conflict)
    a CN, DNS name or IP address that another certificate in `pki_dir` holds,
    or that names another host of `hosts` (host name -> its addresses, from the
    hosts file), unless `force`. Records the certificate in issued.json."""
    pki_dir = Path(pki_dir)
    dns_names, ip_objs = _host_names(name, ips, dns)
    ca_cert, ca_key = _load_ca(pki_dir)
    clashes = _clashes(pki_dir, name, dns_names, [str(i) for i in ip_objs], hosts or {})
    if clashes and not force:
        raise Conflict(
            f"a certificate for {name} would name other hosts: {'; '.join(clashes)}",
            "drop those names from --dns/--ip (each host gets its own certificate), or pass --force "
            f"if {name} really is meant to answer for them",
        )
    if clashes:
        log.warning("issuing %s with names of other hosts (forced): %s", name, "; ".join(clashes))

    key = ec.generate_private_key(ec.SECP256R1())
    crt_path, key_path = pki_dir / f"{name}.crt", pki_dir / f"{name}.key"
    write_atomic(key_path, _key_pem(key), 0o600)
    _sign(pki_dir, name, key.public_key(), dns_names, ip_objs, ca_cert, ca_key)
    return crt_path, key_path


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _sign(
    pki_dir: Path, name: str, public_key: ec.EllipticCurvePublicKey, dns_names: list[str],
    ip_objs: list[_IP], ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> bytes:
    """Sign a host certificate for `public_key`, write NAME.crt, record it; return its PEM."""
    now = _now()
    cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_cert.subject, public_key,
            now - CLOCK_SKEW, min(now + CERT_VALIDITY, ca_cert.not_valid_after_utc), ca=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(_san(dns_names, ip_objs), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    write_atomic(pki_dir / f"{name}.crt", pem, 0o644)
    _write_record(pki_dir, [*_read_record(pki_dir), _issued(cert, now)])
    log.info("issued certificate %s for %s (dns=%s ips=%s) in %s", format_serial(cert.serial_number), name,
             dns_names, [str(i) for i in ip_objs], pki_dir)
    return pem


def _host_names(name: str, ips: list[str] | None, dns: list[str] | None) -> tuple[list[str], list[_IP]]:
    """(DNS names: `name` first, addresses) for a host certificate, checked."""
    check_id(name, "host name")
    if name == CA_NAME:
        raise InvalidInput(f"{name!r} is reserved for the CA's own files", "choose another host name")
    return [name] + [_check_dns(d) for d in (dns or []) if d != name], [_parse_ip(ip) for ip in (ips or [])]


def _san(dns_names: list[str], ip_objs: list[_IP]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns_names)]
    return x509.SubjectAlternativeName(general + [x509.IPAddress(ip) for ip in dict.fromkeys(ip_objs)])


def make_csr(pki_dir: Path, name: str, ips: list[str] | None = None, dns: list[str] | None = None) -> tuple[Path, Path]:
    """On the host that will own it: a new private key NAME.key (mode 0600, never leaves
    `pki_dir`) and a certificate signing request NAME.csr for CN=name, SAN DNS:name plus
    `dns` and `ips`; return (csr path, key path). `sign_csr` on the CA's host issues it.
    Replaces an earlier key and request of the same name."""
    pki_dir = Path(pki_dir)
    dns_names, ip_objs = _host_names(name, ips, dns)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(_san(dns_names, ip_objs), critical=False)
        .sign(key, hashes.SHA256())
    )
    _ensure_dir(pki_dir)
    csr_path, key_path = pki_dir / f"{name}.csr", pki_dir / f"{name}.key"
    write_atomic(key_path, _key_pem(key), 0o600)
    write_atomic(csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("made key %s and request %s for %s (dns=%s ips=%s)", key_path, csr_path, name, dns_names,
             [str(i) for i in ip_objs])
    return csr_path, key_path


def sign_csr(
    pki_dir: Path, csr_pem: bytes, *, name: str | None = None, hosts: Mapping[str, Iterable[str]] | None = None,
    admins: Iterable[str] = ("admin",),
) -> tuple[str, bytes]:
    """Issue the host certificate a request (`make_csr`, from the host that holds the key)
    asks for, signed by the CA in `pki_dir`; return (its name, the certificate's PEM) and
    keep NAME.crt and the record beside the CA like `issue`.

    A host may get only its own name: the request's CN (which must equal `name` when
    given), DNS names that are that name or under it (NAME.example.org), and addresses
    no other host holds. Refused (InvalidInput, nothing issued): a bad signature, a
    wildcard, an admin's name (`admins`), the CA's name, another host's name or address
    (another certificate in `pki_dir`, or `hosts`: name -> addresses from the hosts file)."""
    pki_dir = Path(pki_dir)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise InvalidInput(f"not a PEM certificate signing request: {e}", "make one with `phaul pki csr NAME` on the host") from e
    if not csr.is_signature_valid:
        raise InvalidInput("the certificate signing request's signature is invalid", "make a new one with `phaul pki csr NAME`")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise InvalidInput("the request's key is not an EC key", "make the request with `phaul pki csr NAME`")
    cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) != 1:
        raise InvalidInput(f"the request names {len(cns)} common names, not one", "make it with `phaul pki csr NAME`")
    cn = cns[0]
    remake = f"make a new request on the host with `phaul pki csr {name or 'NAME'}`"
    if "*" in cn:
        raise InvalidInput(f"the request asks for a wildcard name {cn!r}", remake)
    check_id(cn, "host name in the request")
    if name is not None and cn != name:
        raise InvalidInput(f"the request is for {cn!r}, not {name!r}", remake)
    if cn == CA_NAME or cn in set(admins):
        raise InvalidInput(f"the request asks for {cn!r}, an admin's or the CA's name",
                           f"a host gets its own name only; {remake}")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    others = [g for g in san if not isinstance(g, (x509.DNSName, x509.IPAddress))]
    if others:
        raise InvalidInput(f"the request asks for names of other kinds: {others}", remake)
    dns_names = [cn]
    for d in san.get_values_for_type(x509.DNSName):
        if "*" in d:
            raise InvalidInput(f"the request asks for a wildcard name {d!r}", remake)
        low = _check_dns(d).lower()
        if low != cn.lower() and not low.startswith(cn.lower() + "."):
            raise InvalidInput(f"the request for {cn} also asks for the name {d!r}", f"a host gets its own name only; {remake}")
        dns_names.append(d)
    ip_objs: list[_IP] = []
    for ip in san.get_values_for_type(x509.IPAddress):
        if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            raise InvalidInput(f"the request asks for a whole network {ip}, not an address", remake)
        ip_objs.append(ip)
    ca_cert, ca_key = _load_ca(pki_dir)
    clashes = _clashes(pki_dir, cn, dns_names, [str(i) for i in ip_objs], hosts or {})
    if clashes:
        raise InvalidInput(f"the request for {cn} names other hosts: {'; '.join(clashes)}", remake)
    return cn, _sign(pki_dir, cn, public, dns_names, ip_objs, ca_cert, ca_key)


def issued(pki_dir: Path) -> list[Issued]:
    """Every certificate issued in `pki_dir`, oldest first: issued.json, plus current
    NAME.crt files it does not know (issued before the record existed)."""
    pki_dir = Path(pki_dir)
    record = _read_record(pki_dir)
    known = {e.serial for e in record}
    extra = [_issued(c, None) for c in _current_certs(pki_dir).values()]
    return record + sorted((e for e in extra if e.serial not in known), key=lambda e: e.name)


def listing(pki_dir: Path) -> list[dict[str, Any]]:
    """What `phaul pki list` shows: each issued certificate with its status and days left."""
    pki_dir = Path(pki_dir)
    now = _now()
    revoked = read_serials(pki_dir / REVOKED_FILE)
    current = {name: format_serial(c.serial_number) for name, c in _current_certs(pki_dir).items()}
    rows = []
    for e in issued(pki_dir):
        left = datetime.datetime.fromisoformat(e.not_after) - now
        rows.append(asdict(e) | {"status": e.status(now, revoked, current), "days_left": left.days})
    return rows


def revoke(pki_dir: Path, what: str) -> list[str]:
    """Add to `pki_dir`/revoked.txt the serial `what`, or every certificate issued to the
    name `what`; returns the serials added (hex). Agents pick the change up on their next RPC."""
    pki_dir = Path(pki_dir)
    entries = issued(pki_dir)
    chosen = [e for e in entries if e.name == what]
    if chosen:
        serials = {parse_serial(e.serial): e.name for e in chosen}
    else:
        try:
            serial = parse_serial(what)
        except InvalidInput:
            raise NotFound(
                f"no certificate named {what!r} was issued in {pki_dir}", "give a name or a serial from `phaul pki list`"
            ) from None
        names = [e.name for e in entries if parse_serial(e.serial) == serial]
        serials = {serial: names[0] if names else "(not issued here)"}
    path = pki_dir / REVOKED_FILE
    already = read_serials(path)
    new = {s: n for s, n in serials.items() if s not in already}
    if new:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = REVOKED_HEADER
        stamp = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
        text += "".join(f"{format_serial(s)}  {n} revoked {stamp}\n" for s, n in new.items())
        write_atomic(path, text, 0o644)
        log.info("revoked %s in %s", ", ".join(format_serial(s) for s in new), path)
    return [format_serial(s) for s in new]


def load(pki_dir: Path, name: str) -> IssuedCert:
    """Load and check NAME's certificate and key and the CA in `pki_dir`.

    Checks that the files exist and are readable, that the certificate was
    signed by this CA and is valid now, and that the key matches it."""
    pki_dir = Path(pki_dir)
    check_id(name, "host name")
    ca_path, crt_path, key_path = pki_dir / "ca.crt", pki_dir / f"{name}.crt", pki_dir / f"{name}.key"
    reissue = f"run `phaul pki issue {name}`"
    if not ca_path.exists():
        raise NotFound(f"no CA certificate in {pki_dir}", "run `phaul pki init` (or `phaul lab up` for the lab)")
    if not crt_path.exists():
        raise NotFound(f"no certificate for host {name} in {pki_dir}", reissue)
    if not key_path.exists():
        raise NotFound(f"no key for host {name} in {pki_dir} (expected {key_path})", reissue)
    ca_pem, cert_pem, key_pem = (_read(p) for p in (ca_path, crt_path, key_path))
    ca_cert = _parse_cert(ca_path, ca_pem, "run `phaul pki init --force`, then re-issue every certificate")
    cert = _parse_cert(crt_path, cert_pem, reissue)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise BadCredentials(f"{key_path} is not a usable private key: {e}", reissue) from e

    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise BadCredentials(
            f"the certificate for host {name} in {pki_dir} was not signed by the CA in {ca_path}",
            f"{reissue} with this CA (the CA was probably replaced after it was issued)",
        ) from e
    if _public(key) != _public(cert.public_key()):
        raise BadCredentials(f"{key_path} does not belong to {crt_path}", reissue)
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise BadCredentials(
            f"the certificate for host {name} in {pki_dir} is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            reissue,
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(i) for i in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    return IssuedCert(
        name=name, ca=ca_path, cert=crt_path, key=key_path,
        ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem,
        not_after=cert.not_valid_after_utc, dns=dns, ips=ips,
    )


def _clashes(
    pki_dir: Path, name: str, dns: list[str], ips: list[str], hosts: Mapping[str, Iterable[str]]
) -> list[str]:
    """Each requested name or address that another host holds, as 'DNS x (held by ...)'."""
    holders: dict[str, str] = {}  # "DNS x" / "IP y" -> who holds it
    for other, cert in _current_certs(pki_dir).items():
        if other == name:
            continue
        names, cert_ips = _identities(cert)
        for d in names:
            holders.setdefault(f"DNS {d}", f"the certificate of {other} ({pki_dir / (other + '.crt')})")
        for a in cert_ips:
            holders.setdefault(f"IP {a}", f"the certificate of {other} ({pki_dir / (other + '.crt')})")
    for host, host_ips in hosts.items():
        if host == name:
            continue
        holders.setdefault(f"DNS {host.lower()}", f"host {host} in the hosts file")
        for a in host_ips:
            try:
                holders.setdefault(f"IP {ipaddress.ip_address(a)}", f"host {host} in the hosts file")
            except ValueError:
                continue  # a host name, not an address: certificates name addresses only
    wanted = [f"DNS {d.lower()}" for d in dns] + [f"IP {ip}" for ip in ips]
    return [f"{w} (held by {holders[w]})" for w in dict.fromkeys(wanted) if w in holders]


def _identities(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(CN and DNS names in lower case, IP addresses) a certificate answers for."""
    names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names, []
    names += [d.lower() for d in san.get_values_for_type(x509.DNSName)]
    return list(dict.fromkeys(names)), [str(i) for i in san.get_values_for_type(x509.IPAddress)]


def _current_certs(pki_dir: Path) -> dict[str, x509.Certificate]:
    """The NAME.crt certificates in `pki_dir` (not the CA's), by NAME; unreadable ones are skipped."""
    certs = {}
    for path in sorted(pki_dir.glob("*.crt")):
        if path.stem == CA_NAME:
            continue
        try:
            certs[path.stem] = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as e:
            log.warning("skipping %s: %s", path, e)
    return certs


def _issued(cert: x509.Certificate, issued_at: datetime.datetime | None) -> Issued:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns, ips = san.get_values_for_type(x509.DNSName), [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    return Issued(
        serial=format_serial(cert.serial_number), name=str(cn[0].value) if cn else "",
        dns=tuple(dns), ips=tuple(ips),
        not_after=cert.not_valid_after_utc.isoformat(),
        issued_at=(issued_at or cert.not_valid_before_utc + CLOCK_SKEW).isoformat(),
    )


def _read_record(pki_dir: Path) -> list[Issued]:
    path = pki_dir / RECORD_FILE
    try:
        data = json.loads(path.read_text())
        return [
            Issued(str(e["serial"]), str(e["name"]), tuple(e["dns"]), tuple(e["ips"]), str(e["not_after"]), str(e["issued_at"]))
            for e in data
        ]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadCredentials(f"cannot read the record of issued certificates {path}: {e}", "fix or remove the file") from e


def _write_record(pki_dir: Path, entries: list[Issued]) -> None:
    write_atomic(pki_dir / RECORD_FILE, json.dumps([asdict(e) for e in entries], indent=1) + "\n", 0o644)


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_path, key_path = pki_dir / "ca.crt", pki_dir / "ca.key"
    if not ca_path.exists() or not key_path.exists():
        raise NotFound(f"no CA in {pki_dir} (need ca.crt and ca.key)", "run `phaul pki init` first")
    fix = "run `phaul pki init --force`, then re-issue every certificate"
    ca_cert = _parse_cert(ca_path, _read(ca_path), fix)
    try:
        ca_key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as e:
        raise BadCredentials(f"{key_path} is not a usable private key: {e}", fix) from e
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or _public(ca_key) != _public(ca_cert.public_key()):
        raise BadCredentials(f"{key_path} does not belong to {ca_path}", fix)
    return ca_cert, ca_key


def _parse_cert(path: Path, pem: bytes, hint: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise BadCredentials(f"{path} is not a PEM certificate: {e}", hint) from e


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadCredentials(f"cannot read {path}: {e.strerror}", "check its owner and mode (run as root)") from e


def _public(key: Any) -> bytes:
    """DER of a public key, or of a private key's public half, for comparison."""
    pub = key.public_key() if hasattr(key, "public_key") else key
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError as e:
        raise InvalidInput(
            f"invalid IP address {value!r}", "write an address such as 10.213.0.11 or fd00:7068::11 (no brackets)",
        ) from e


def _check_dns(value: str) -> str:
    if not isinstance(value, str) or not _DNS.match(value):
        raise InvalidInput(f"invalid DNS name {value!r}", "use letters, digits, '-' and '.' (e.g. beta.lab)")
    return value.lower()


def _ensure_dir(path: Path) -> None:
    path.mkdir(mode=0o755, parents=True, exist_ok=True)



def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
