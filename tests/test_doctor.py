"""phaul.linux.doctor against the real host: real CRIU, real PATH lookups, no mocks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from phaul.linux import doctor
from phaul.linux.doctor import Check

OLD_CRIU = Path("/usr/sbin/criu")  # Debian bookworm's criu 3.17, too old for this kernel


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@pytest.fixture
def fresh_features():
    """features() is cached per process; give a test its own answer and leave none behind."""
    doctor.features.cache_clear()
    yield
    doctor.features.cache_clear()


@pytest.fixture(scope="module")
def checks() -> list[Check]:
    return doctor.run_checks()


def test_criu_on_this_machine_is_ok_and_recent(checks: list[Check]) -> None:
    path = doctor.criu_path()
    assert path is not None
    version = doctor.criu_version(path)
    assert version is not None and version >= (4, 2)
    by = _by_name(checks)
    assert by["criu"].status == "pass", by["criu"]
    assert ".".join(map(str, version)) in by["criu"].detail
    assert by["criu check"].status == "pass", by["criu check"]


def test_every_check_has_a_known_status_and_fails_carry_a_fix(checks: list[Check]) -> None:
    assert checks
    names = [c.name for c in checks]
    assert len(names) == len(set(names))
    for c in checks:
        assert c.status in {"pass", "warning", "failure"}, c
        assert c.detail, c
        if c.status == "failure":
            assert c.fix, c
    for expected in ("criu", "fs.pipe-max-size", "network lock (iptables)", "runc", "rsync", "socat",
                     "busybox", "cgroups", "root"):
        assert expected in names
    for f in doctor.FEATURES:
        assert any(f.criu_name in n for n in names), f.criu_name


def test_features_are_bools_and_agree_with_criu_check(fresh_features) -> None:
    feats = doctor.features()
    assert set(feats) == {"soft_dirty", "uffd", "pagemap_scan"}
    assert all(isinstance(v, bool) for v in feats.values())
    assert doctor.features() is feats  # cached
    criu = doctor.criu_path()
    assert criu is not None
    names = {"soft_dirty": "mem_dirty_track", "uffd": "uffd-noncoop", "pagemap_scan": "pagemap_scan"}
    for key, name in names.items():
        r = subprocess.run([criu, "check", "--feature", name], capture_output=True, text=True, timeout=10)
        assert feats[key] == (r.returncode == 0), (key, r.stdout, r.stderr)


def test_feature_checks_agree_with_features(checks: list[Check], fresh_features) -> None:
    feats = doctor.features()
    for f in doctor.FEATURES:
        if not f.key:
            continue
        (check,) = [c for c in checks if f"({f.criu_name})" in c.name]
        assert check.status == ("pass" if feats[f.key] else "warning"), check
        if not feats[f.key]:
            assert f.fallback in check.detail


def test_old_criu_first_on_path_fails_with_setup_fix(tmp_path: Path, monkeypatch, fresh_features) -> None:
    old_version = doctor.criu_version(str(OLD_CRIU)) if OLD_CRIU.exists() else None
    if old_version is not None and old_version < (4, 2):
        (tmp_path / "criu").symlink_to(OLD_CRIU)  # Debian's real 3.17, where installed
    else:  # a stand-in that answers as bookworm's 3.17 does on this kernel
        old_version = (3, 17, 1)
        (tmp_path / "criu").write_text(
            "#!/bin/sh\n"
            'if [ "$1" = --version ]; then echo "Version: 3.17.1"; exit 0; fi\n'
            'echo "Error (criu/vdso.c:1): vdso: Unexpected rt vDSO area bounds" >&2; exit 1\n'
        )
        (tmp_path / "criu").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    assert doctor.criu_path() == str(tmp_path / "criu")
    assert doctor.criu_version(doctor.criu_path()) == old_version
    by = _by_name(doctor.run_checks())
    assert by["criu"].status == "failure"
    assert by["criu"].fix == doctor.SETUP_FIX
    assert "make setup" in by["criu"].fix
    assert ".".join(map(str, old_version)) in by["criu"].detail
    # Without a usable CRIU no method that needs a kernel feature is offered.
    assert doctor.features() == {"soft_dirty": False, "uffd": False, "pagemap_scan": False}


def test_missing_binaries_fail_with_install_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: nothing is found
    by = _by_name(doctor.run_checks())
    assert by["criu"].status == "failure" and by["criu"].fix == doctor.SETUP_FIX
    assert by["network lock (iptables)"].status == "failure"
    assert by["network lock (iptables)"].fix == "apt-get install iptables"
    for name in ("runc", "rsync", "socat"):
        assert by[name].status == "failure" and by[name].fix == f"apt-get install {name}", by[name]
    assert by["busybox"].status == "failure" and by["busybox"].fix == "apt-get install busybox-static"
    for name in ("mmdebstrap", "skopeo", "umoci"):  # only --template debian / --image need them
        assert by[name].status == "warning" and by[name].fix == f"apt-get install {name}", by[name]
        assert "ct create" in by[name].detail, by[name]


def test_the_root_file_system_tools_are_reported_here(checks: list[Check]) -> None:
    by = _by_name(checks)
    for name in ("mmdebstrap", "skopeo", "umoci"):  # setup installs them
        assert by[name].status == "pass" and "version" in by[name].detail, by[name]


def test_report_table_and_summary() -> None:
    checks = [
        Check("criu", "pass", "/usr/local/sbin/criu, version 4.2.1"),
        Check("fs.pipe-max-size", "warning", "1048576 bytes", "sysctl -w fs.pipe-max-size=4194304"),
        Check("rsync", "failure", "`rsync` not found on PATH", "apt-get install rsync"),
    ]
    table = doctor.report_table(checks).splitlines()
    assert table[0].split() == ["STATUS", "NAME", "DETAIL"]
    rows = [ln for ln in table[1:] if not ln.lstrip().startswith("fix:")]
    assert [r.split()[0] for r in rows] == ["pass", "warning", "failure"]
    detail_cols = {r.index(c.detail) for r, c in zip(rows, checks)} | {table[0].index("DETAIL")}
    assert len(detail_cols) == 1  # aligned
    fixes = [ln.strip() for ln in table if ln.lstrip().startswith("fix:")]
    assert fixes == ["fix: sysctl -w fs.pipe-max-size=4194304", "fix: apt-get install rsync"]

    assert doctor.summary(checks[:1]) == "all good"
    s = doctor.summary(checks)
    assert s.startswith("2 problems: ")
    assert s.index("rsync") < s.index("fs.pipe-max-size")  # fails first
