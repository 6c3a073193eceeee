"""The revocation list: certificate serials an agent refuses, re-read when it changes.

The file (`revoked.txt` in the PKI directory, written by `phaul pki revoke`) is
plain text, one serial per line in hexadecimal as `openssl x509 -serial` prints
it (case and ':' separators do not matter); text after the serial and lines
starting with '#' are comments, e.g.::

    # phaul revocation list: one certificate serial (hex) per line
    5A3C0E...91F2  beta revoked 2026-12-02T00:40:00Z

Agents check it on every RPC (phaul.agent.server `_authorize`). The data
channels (rsync, page streams) need the per-migration secret that only the
migration's gRPC caller receives from Prepare, so refusing a revoked
certificate at gRPC refuses its data channels too: a revoked peer gets no new
secret, and a Prepare it made before revocation is ended by its next RPC.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

from cryptography import x509

from phaul.errors import InvalidInput

log = logging.getLogger(__name__)

REVOKED_FILE = "revoked.txt"
REVOKED_HEADER = "# phaul revocation list: one certificate serial (hex) per line; text after it is a comment\n"
_HEX = re.compile(r"^[0-9a-f]{1,40}$")
_CACHE_MAX = 1024  # certificates whose serial is remembered (by PEM bytes)


def parse_serial(text: str) -> int:
    """A serial as the user or the file writes it: hex, optional ':' separators, any case."""
    value = text.strip().lower().replace(":", "")
    if value.startswith("0x"):
        value = value[2:]
    if not _HEX.match(value):
        raise InvalidInput(f"invalid certificate serial {text!r}", "give it in hex as `phaul pki list` shows it")
    return int(value, 16)


def format_serial(serial: int) -> str:
    """The form `phaul pki list` shows and the file holds: upper-case hex, no separators."""
    return f"{serial:X}"


def read_serials(path: Path) -> frozenset[int]:
    """Every serial in the revocation list at `path`; a missing file is an empty list.
    A line that is not a serial is logged and skipped (it never hides the others)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return frozenset()
    serials = set()
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            serials.add(parse_serial(words[0]))
        except InvalidInput:
            log.warning("%s line %d: %r is not a certificate serial; skipped", path, number, words[0])
    return frozenset(serials)


class RevocationList:
    """The serials in `path`, re-read whenever the file's mtime or size changes (no restart needed)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._by_pem: dict[bytes, int] = {}

    def serials(self) -> frozenset[int]:
        """The current list (a stat per call; the file is read only when it changed)."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._serials = read_serials(self.path) if stamp else frozenset()
                self._stamp = stamp
                log.info("revocation list %s: %d serials", self.path, len(self._serials))
            return self._serials

    def serial_of(self, pem: bytes) -> int:
        """The serial of a PEM certificate, parsed once per distinct certificate."""
        with self._lock:
            serial = self._by_pem.get(pem)
        if serial is None:
            serial = x509.load_pem_x509_certificate(pem).serial_number
            with self._lock:
                if len(self._by_pem) >= _CACHE_MAX:
                    self._by_pem.clear()
                self._by_pem[pem] = serial
        return serial

    def revoked(self, pem: bytes) -> int | None:
        """The certificate's serial if it is revoked, else None."""
        serial = self.serial_of(pem)
        return serial if serial in self.serials() else None


def default_list(cert: Path, ca: Path) -> Path | None:
    """The PKI directory's revocation list when the agent's certificate lives beside its CA, else None."""
    cert, ca = Path(cert).absolute(), Path(ca).absolute()
    return cert.parent / REVOKED_FILE if cert.parent == ca.parent else None
