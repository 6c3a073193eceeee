"""A migration keeps every property of the root file system's files: owners (numeric,
unknown to the host), modes, file capabilities, ACLs, extended attributes, hard links,
sparse files and device nodes arrive identical (rsync -aHAXS --numeric-ids)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import Lab

pytestmark = pytest.mark.lab

SPARSE_SIZE = 64 << 20


def _make_files(root: Path) -> None:
    d = root / "fidelity"
    d.mkdir()
    (d / "capped").write_bytes(b"#!/bin/sh\n")
    subprocess.run(["setcap", "cap_net_raw,cap_net_bind_service+ep", str(d / "capped")], check=True)
    (d / "acl").write_text("acl\n")
    subprocess.run(["setfacl", "-m", "u:4321:rw,g:555:r", str(d / "acl")], check=True)
    (d / "xattr").write_text("xattr\n")
    os.setxattr(d / "xattr", "user.phaul.note", b"kept")
    os.setxattr(d / "xattr", "trusted.phaul", b"\x00\x01binary")
    (d / "linked").write_text("one inode, two names\n")
    os.link(d / "linked", d / "linked2")
    with open(d / "sparse", "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_SIZE // 2)
        f.write(b"middle")
    os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(d / "fifo", 0o600 | stat.S_IFIFO)
    (d / "owned").write_text("owned\n")
    os.chown(d / "owned", 4321, 555)
    os.chmod(d / "owned", 0o4751)  # setuid survives the chown above only when set after it


def _describe(root: Path) -> dict[str, tuple]:
    d = root / "fidelity"
    out: dict[str, tuple] = {}
    for name in sorted(os.listdir(d)):
        p = d / name
        st = os.lstat(p)
        xattrs = {k: os.getxattr(p, k, follow_symlinks=False) for k in sorted(os.listxattr(p, follow_symlinks=False))}
        out[name] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev, st.st_nlink, xattrs)
    return out


def test_file_properties_survive_migration(clean_lab: Lab) -> None:
    lab = clean_lab
    lab.phaul("--host", "alpha", "ct", "create", "fid1")
    lab.phaul("--host", "alpha", "ct", "start", "fid1")
    _make_files(lab.rootfs("alpha", "fid1"))
    before = _describe(lab.rootfs("alpha", "fid1"))
    assert b"" not in before["capped"][6].values() and "security.capability" in before["capped"][6]
    assert "system.posix_acl_access" in before["acl"][6]
    report = lab.migrate("fid1", "alpha", "beta")
    assert report["result"] == "ok", report
    root = lab.rootfs("beta", "fid1")
    after = _describe(root)
    assert after == before
    d = root / "fidelity"
    assert os.stat(d / "linked").st_ino == os.stat(d / "linked2").st_ino, "the hard link became a copy"
    blocks = os.stat(d / "sparse").st_blocks * 512
    print(f"sparse file: {SPARSE_SIZE >> 20} MiB apparent, {blocks >> 10} KiB allocated on beta")
    assert blocks < 1 << 20, f"the sparse file arrived with {blocks} bytes allocated"
    getcap = subprocess.run(["getcap", str(d / "capped")], capture_output=True, text=True, check=True).stdout
    assert "cap_net_bind_service,cap_net_raw=ep" in getcap, getcap
    assert lab.exec("beta", "fid1", "cat", "/fidelity/linked2") == "one inode, two names\n"
