"""`phaul pki`: issuing refuses other hosts' names, the record of what was issued, revocation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from phaul.channels import pki
from phaul.channels.revocation import RevocationList, parse_serial, read_serials
from phaul.cli import main
from phaul.errors import Conflict, ExitCode, InvalidInput, NotFound


def _serial(path: Path) -> str:
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:X}"


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "alpha", ips=["10.213.7.11"])
    pki.issue(d, "beta", ips=["10.213.7.12"], dns=["beta.lab"])
    return d


@pytest.mark.parametrize(
    "kwargs, clash",
    [
        ({"dns": ["alpha"]}, "DNS alpha (held by the certificate of alpha"),
        ({"dns": ["BETA.lab"]}, "DNS beta.lab (held by the certificate of beta"),
        ({"ips": ["10.213.7.12"]}, "IP 10.213.7.12 (held by the certificate of beta"),
    ],
)
def test_issue_refuses_another_hosts_name_unless_forced(pki_dir: Path, kwargs: dict, clash: str) -> None:
    with pytest.raises(Conflict) as e:
        pki.issue(pki_dir, "mallory", **kwargs)
    assert clash in str(e.value) and "--force" in str(e.value)
    assert not (pki_dir / "mallory.crt").exists()
    crt, _ = pki.issue(pki_dir, "mallory", **kwargs, force=True)
    assert crt.exists()


def test_issue_refuses_a_cn_another_certificate_names(pki_dir: Path) -> None:
    with pytest.raises(Conflict, match="DNS beta.lab"):
        pki.issue(pki_dir, "beta.lab")


def test_reissue_of_the_same_host_and_hosts_file(pki_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki.issue(pki_dir, "beta", ips=["10.213.7.12"], dns=["beta.lab"])  # its own names: no clash
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({
        "pki": {"ca": "pki/ca.crt", "cert": "pki/alpha.crt", "key": "pki/alpha.key"},
        "hosts": {"gamma": {"address": "10.213.7.13:7473"}},
    }))
    issue = ["--hosts-file", str(hosts), "pki", "issue", "--dir", str(pki_dir), "delta", "--ip", "10.213.7.13"]
    assert main(issue) == ExitCode.REFUSED  # Conflict
    err = capsys.readouterr().err
    assert "IP 10.213.7.13 (held by host gamma in the hosts file)" in err and "--force" in err
    assert main([*issue, "--dns", "gamma", "--force"]) == 0
    assert (pki_dir / "delta.crt").exists()
    with pytest.raises(InvalidInput):
        pki.issue(pki_dir, "epsilon", ips=["10.213.7.300"])


def test_list_and_revoke(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old_beta = _serial(pki_dir / "beta.crt")
    pki.issue(pki_dir, "beta", ips=["10.213.7.12"])
    assert main(["pki", "revoke", "--dir", str(pki_dir), "alpha"]) == 0
    alpha = _serial(pki_dir / "alpha.crt")
    assert capsys.readouterr().out.split() == [alpha]
    assert main(["pki", "revoke", "--dir", str(pki_dir), alpha.lower()]) == 0
    assert "already revoked" in capsys.readouterr().out

    assert main(["pki", "list", "--dir", str(pki_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["certificates"]
    assert [(r["name"], r["status"]) for r in rows] == [("alpha", "revoked"), ("beta", "replaced"), ("beta", "valid")]
    assert rows[1]["serial"] == old_beta and rows[1]["dns"] == ["beta", "beta.lab"] and rows[2]["ips"] == ["10.213.7.12"]
    assert all(364 <= r["days_left"] <= 365 and r["not_after"] > r["issued_at"] for r in rows)

    assert main(["pki", "list", "--dir", str(pki_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["SERIAL", "NAME", "STATUS"]
    assert lines[1].split()[:3] == [alpha, "alpha", "revoked"] and lines[1].endswith("alpha,10.213.7.11")
    assert len(lines) == 4

    assert read_serials(pki_dir / "revoked.txt") == {parse_serial(alpha)}
    with pytest.raises(NotFound, match="no certificate named 'nobody'"):
        pki.revoke(pki_dir, "nobody")


def test_list_shows_certificates_issued_before_the_record(pki_dir: Path) -> None:
    (pki_dir / "issued.json").unlink()
    assert [(r["name"], r["status"]) for r in pki.listing(pki_dir)] == [("alpha", "valid"), ("beta", "valid")]


def test_revocation_list_format_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    pem = (pki.init_ca(tmp_path / "pki")).read_bytes()
    serial = x509.load_pem_x509_certificate(pem).serial_number
    rl = RevocationList(path)
    assert rl.revoked(pem) is None  # no file: nothing revoked
    hexed = f"{serial:x}"
    path.write_text(f"# comment\n\nnot-a-serial\n{':'.join(hexed[i:i + 2] for i in range(0, len(hexed), 2))}  who\n")
    assert rl.revoked(pem) == serial
    path.write_text("# emptied\n")
    assert rl.revoked(pem) is None
