"""Debian root file systems built with Debian's mmdebstrap, cached per package set.

`debian_tarball(cache, packages)` returns a tarball of a Debian bookworm root
(mmdebstrap's `apt` variant: the essential packages, apt, and `packages`),
building it on first use. The cache holds one tarball per suite and sorted
package set (`debian-bookworm-<key>.tar`, with a `.json` naming its packages);
a build takes minutes, later containers unpack the tarball (seconds). A lock
per key lets concurrent creates of the same set wait for one build.
`unpack_tarball` extracts one keeping owners, modes, ACLs, xattrs and file
capabilities.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import InvalidInput, ToolFailed

log = logging.getLogger(__name__)

SUITE = "bookworm"
MAX_PACKAGES = 64
BUILD_TIMEOUT = 3600.0
# A Debian package name, optionally with =VERSION (Debian policy 5.6.1, 5.6.12).
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,99}(=[A-Za-z0-9.+~:-]{1,100})?$")


@dataclass(frozen=True)
class RootfsCache:
    """Where built roots are kept on this host, and the network namespace their downloads
    run in (None: the caller's; the lab's agents live in namespaces without a route out)."""

    dir: Path
    build_netns: Path | None = None


def check_packages(packages: Iterable[str]) -> list[str]:
    """The package list validated, without duplicates, sorted (the cache key's order)."""
    result = sorted({p.strip() for p in packages if isinstance(p, str) and p.strip()})
    for p in result:
        if not _PACKAGE.match(p):
            raise InvalidInput(f"invalid Debian package name {p[:100]!r}", "give names like redis-server or nginx=1.22.1-9")
    if len(result) > MAX_PACKAGES:
        raise InvalidInput(f"{len(result)} packages asked for", f"give at most {MAX_PACKAGES}")
    return result


def cache_key(suite: str, packages: Sequence[str]) -> str:
    """The cache file stem of a suite and package set (order and duplicates do not matter)."""
    digest = hashlib.sha256(json.dumps([suite, check_packages(packages)]).encode()).hexdigest()[:16]
    return f"debian-{suite}-{digest}"


def debian_tarball(cache: RootfsCache, packages: Sequence[str], suite: str = SUITE) -> Path:
    """The cached tarball of a Debian `suite` root with `packages`, built now if missing."""
    packages = check_packages(packages)
    key = cache_key(suite, packages)
    cache.dir.mkdir(parents=True, exist_ok=True)
    tarball = cache.dir / f"{key}.tar"
    with open(cache.dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another create building the same set: wait for it
        if tarball.is_file():
            log.info("debian root %s (%s): cached %s", suite, ",".join(packages) or "no extra packages", tarball)
            return tarball
        _build(cache, suite, packages, tarball)
        (cache.dir / f"{key}.json").write_text(json.dumps({"suite": suite, "packages": packages}) + "\n")
    return tarball


def _build(cache: RootfsCache, suite: str, packages: list[str], tarball: Path) -> None:
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise ToolFailed("mmdebstrap not found on PATH", "install it: apt-get install mmdebstrap (or run scripts/setup.sh)")
    partial = tarball.with_suffix(".tar.partial")
    partial.unlink(missing_ok=True)  # left by a build that was killed
    cmd = [mmdebstrap, "--mode=root", "--variant=apt", "--format=tar", "--aptopt=Acquire::Retries \"3\""]
    if packages:
        cmd.append("--include=" + ",".join(packages))
    cmd += [suite, str(partial)]
    if cache.build_netns is not None:
        cmd = ["nsenter", f"--net={cache.build_netns}", "--", *cmd]
    log.info("building debian root %s with %s (minutes; cached as %s)", suite, packages or "no extra packages", tarball)
    started = time.monotonic()
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # mmdebstrap's progress ("I: ...") goes to the agent's log
            line = line.rstrip()
            if line:
                log.info("mmdebstrap: %s", line)
                tail = (tail + [line])[-15:]
        rc = proc.wait(timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as e:
        partial.unlink(missing_ok=True)
        raise ToolFailed(f"mmdebstrap could not run: {e}", "check that mmdebstrap is installed and the mirror reachable") from e
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise ToolFailed(
            f"mmdebstrap failed (exit {rc}) building {suite} with {packages}:\n" + "\n".join(tail),
            "check the package names exist in Debian " + suite + " and deb.debian.org is reachable from this host",
        )
    partial.rename(tarball)
    log.info("built debian root %s in %.0f s: %s (%d MiB)", suite, time.monotonic() - started, tarball,
             tarball.stat().st_size >> 20)


def unpack_tarball(tarball: Path, rootfs: Path) -> None:
    """Extract `tarball` into `rootfs` (created) keeping numeric owners, modes, ACLs,
    xattrs and file capabilities; GNU tar detects the compression."""
    rootfs.mkdir(parents=True, exist_ok=True)
    cmd = [
        "tar", "--extract", "--file", str(tarball), "--directory", str(rootfs), "--numeric-owner",
        "--preserve-permissions", "--same-owner", "--acls", "--xattrs", "--xattrs-include=*",
    ]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode != 0:
        raise ToolFailed(
            f"cannot unpack {tarball}: {proc.stderr.strip()[-1500:]}",
            "give a tar archive (optionally compressed) of a root file system",
        )
