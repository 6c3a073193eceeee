"""`phaul pki csr` on the host that owns the key, `phaul pki sign` on the CA's host: the key
stays where it was made, and a host gets its own name only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from phaul.channels import pki
from phaul.errors import InvalidInput


def _ca(tmp_path: Path) -> Path:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    pki.issue(ca, "alpha", ips=["10.0.0.11"])
    return ca


def _csr(cn: str, dns: list[str] = (), ips: list[str] = ()) -> bytes:  # type: ignore[assignment]
    """A request made by hand (not with make_csr), for names make_csr would not write."""
    import ipaddress

    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_csr_then_sign(tmp_path: Path) -> None:
    ca, host = _ca(tmp_path), tmp_path / "gamma-pki"
    csr, key = pki.make_csr(host, "gamma", ips=["10.0.0.13"], dns=["gamma.example.org"])
    assert key.stat().st_mode & 0o777 == 0o600 and csr.name == "gamma.csr"
    name, pem = pki.sign_csr(ca, csr.read_bytes(), name="gamma", hosts={"alpha": ["10.0.0.11"]})
    assert name == "gamma" and (ca / "gamma.crt").read_bytes() == pem and not (ca / "gamma.key").exists()
    (host / "gamma.crt").write_bytes(pem)
    (host / "ca.crt").write_bytes((ca / "ca.crt").read_bytes())
    cred = pki.load(host, "gamma")  # the key made there belongs to the certificate signed here
    assert cred.ips == ("10.0.0.13",) and set(cred.dns) == {"gamma", "gamma.example.org"}
    assert [e.name for e in pki.issued(ca)][-1] == "gamma"
    assert pki.revoke(ca, "gamma")  # revocable by name like an issued one


@pytest.mark.parametrize("pem, why", [
    (_csr("beta"), "not 'gamma'"),
    (_csr("gamma", dns=["*.example.org"]), "wildcard"),
    (_csr("*"), "wildcard"),
    (_csr("gamma", dns=["alpha"]), "also asks for the name"),
    (_csr("gamma", dns=["beta.example.org"]), "also asks for the name"),
    (_csr("gamma", ips=["10.0.0.11"]), "names other hosts"),
])
def test_sign_refuses_names_that_are_not_the_hosts(tmp_path: Path, pem: bytes, why: str) -> None:
    ca = _ca(tmp_path)
    with pytest.raises(InvalidInput, match=why.replace("*", r"\*")):
        pki.sign_csr(ca, pem, name="gamma")
    assert not (ca / "gamma.crt").exists()


def test_sign_refuses_admin_ca_and_other_hosts(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    for cn in ("admin", "ops"):
        with pytest.raises(InvalidInput, match="admin's or the CA's name"):
            pki.sign_csr(ca, _csr(cn), admins=("admin", "ops"))
    with pytest.raises(InvalidInput, match="names other hosts"):
        pki.sign_csr(ca, _csr("gamma", ips=["10.0.0.12"]), hosts={"beta": ["10.0.0.12"]})
    with pytest.raises(InvalidInput, match="not a PEM certificate signing request"):
        pki.sign_csr(ca, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    assert sorted(p.name for p in ca.glob("*.crt")) == ["alpha.crt", "ca.crt"]


def test_cli_csr_and_sign(tmp_path: Path) -> None:
    ca, host = _ca(tmp_path), tmp_path / "gamma-pki"

    def phaul(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "phaul", *args], capture_output=True, text=True)

    r = phaul("pki", "csr", "gamma", "--dir", str(host), "--ip", "10.0.0.13")
    assert r.returncode == 0 and r.stdout.split() == [str(host / "gamma.csr"), str(host / "gamma.key")], r.stderr
    assert "PRIVATE" not in r.stdout + r.stderr
    out = tmp_path / "gamma.crt"
    r = phaul("pki", "sign", str(host / "gamma.csr"), "--dir", str(ca), "--name", "gamma", "--out", str(out))
    assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr
    r = phaul("pki", "sign", str(host / "gamma.csr"), "--dir", str(ca), "--name", "delta")
    assert r.returncode == 2 and "not 'delta'" in r.stderr
    r = phaul("pki", "sign", str(tmp_path / "missing.csr"), "--dir", str(ca))
    assert r.returncode == 2 and "cannot read the request" in r.stderr
