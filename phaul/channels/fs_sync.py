"""How files reach the destination: the file-system sync interface and its
rsync back-end.

`FsSync` is what a migration asks of a back-end: make the destination's copy
of the container's files equal to the source's now. `RsyncFsSync` is the one
back-end today (image deltas of a block device may come later). Underneath,
`RsyncReceiver` runs on the destination: an rsync daemon reachable only through
the migration's TLS endpoint, with one module per area of the tree the peer
may write (`AREAS`, each rooted in its directory, chrooted). `ct` (the
container's directory) keeps what is sent: symbolic links, devices, hard
links (a root file system needs them; the chroot keeps the rsync receiver
inside). The data areas (`DATA_AREAS`: CRIU images, page deltas, pre-dump
rounds) take regular files and directories only: the daemon refuses the
options that would create anything else (-l, -D, --devices, --specials, -H,
-X, -A, -K; -a implies -l and is refused too; note that refusing "devices"
does not refuse -D in rsync 3.5, so both are listed), a receiver without them
skips any other entry a rogue sender lists, and `munge symlinks` would
defuse a link that still got through. Every module requires the migration's
secret (rsync's daemon authentication, user `SECRET_USER`); `RsyncSender`
runs on the source, gives it in RSYNC_PASSWORD and pushes a directory into a
module, sending only what changed since the last push.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from phaul.channels.transport import SECRET_USER, TLS_RSH, Credentials, TlsEndpoint, rsh_env
from phaul.errors import InvalidInput, ToolFailed
from phaul.migration.cancel import Cancellation

log = logging.getLogger(__name__)

AREAS = ("ct", "images", "delta", "rounds")  # the rsync modules, each the directory of that name
DATA_AREAS = frozenset({"images", "delta", "rounds"})  # regular files and directories only
_DATA_REFUSED = "D devices specials links hard-links xattrs acls keep-dirlinks copy-devices write-devices"
_SENT = re.compile(r"^Total bytes sent: ([\d,.]+)", re.MULTILINE)
# rsync's exit codes for files that changed or vanished while it read them
# (23: partial transfer, e.g. a file truncated under it; 24: vanished files)
_LIVE_CHANGES = (23, 24)


@dataclass
class SyncStats:
    bytes_sent: int
    duration_ms: float


class RsyncReceiver:
    """Destination side: accepts pushes from `peer_name` only, holding the secret
    in `secrets` (phaul.channels.transport.write_secret), into the area directories
    of `recv` (`AREAS`), unless file `seal` exists. Its own files (configuration,
    log) go to `own`, which the peer cannot write."""

    def __init__(
        self, creds: Credentials, own: Path, recv: Path, bind: str, peer_name: str, link_timeout: float,
        secrets: Path, seal: Path,
    ) -> None:
        self.own = own
        self.recv = recv
        self.secrets = secrets
        self.link_timeout = link_timeout
        self.conf = own / "rsyncd.conf"
        self.endpoint = TlsEndpoint(
            creds, bind, peer_name, ["rsync", "--server", "--daemon", "--config", self.conf, "."], link_timeout, seal,
            own,
        )

    def open(self) -> str:
        """Write the daemon's configuration and start listening; returns the ADDR:PORT to give the source."""
        modules = []
        for area in AREAS:
            data = area in DATA_AREAS
            modules.append(
                f"[{area}]\n  path = {self.recv / area}\n  read only = no\n  uid = root\n  gid = root\n"
                f"  auth users = {SECRET_USER}\n  secrets file = {self.secrets}\n  strict modes = yes\n"
                f"  timeout = {int(self.link_timeout) * 2}\n"
                + (f"  munge symlinks = yes\n  refuse options = {_DATA_REFUSED}\n" if data else "  munge symlinks = no\n")
            )
        self.conf.write_text(
            "use chroot = yes\nnumeric ids = yes\nreverse lookup = no\nlog file = /dev/null\n" + "".join(modules)
        )
        return self.endpoint.open(self.own / "data-channel.log")

    def close(self) -> None:
        self.endpoint.close()


class RsyncSender:
    """Source side: pushes directories to a destination's `RsyncReceiver`."""

    def __init__(
        self, creds: Credentials, peer: str, peer_name: str, link_timeout: float, secret: str, bwlimit: int = 0,
        cancel: Cancellation | None = None,
    ) -> None:
        self.cancel = cancel  # an abort of the migration ends a push under way
        self.env = {**os.environ, **rsh_env(creds, peer, peer_name, link_timeout), "RSYNC_PASSWORD": secret}
        self.bwlimit = bwlimit
        self.link_timeout = link_timeout

    def push(
        self, src: Path, dest: str, excludes: tuple[str, ...] = (), *, bwlimit: int | None = None,
        whole_file: bool = False, checksum: bool = False, live: bool = False,
    ) -> SyncStats:
        """Make `dest` (AREA or AREA/SUBDIR, `AREAS`, on the destination) an exact
        copy of directory `src`; returns what it cost. The data areas get regular
        files and directories only (anything else in `src` is skipped). `bwlimit` (bytes/s,
        0 = none) overrides the sender's cap for this push; `whole_file` sends
        changed files whole instead of rsync's block deltas (for files that never
        have a useful basis on the other side); `checksum` decides what changed by
        content instead of size and modification time. `live`: `src` is in use
        (the container runs), so files changing under rsync are expected; a
        later sync while it is frozen sends them.

        Modification times are compared to the nanosecond (`--modify-window=-1`):
        rsync's default whole seconds miss a file rewritten with the same size
        within the second of the previous sync, which the final sync must not."""
        area = dest.partition("/")[0]
        if area not in AREAS:
            raise InvalidInput(f"no area {area!r} on the destination", f"push into one of {', '.join(AREAS)}")
        args = [
            "rsync", "-rt" if area in DATA_AREAS else "-aHAXS", "--numeric-ids", "--delete", "--stats",
            f"--timeout={max(1, int(self.link_timeout))}", "--modify-window=-1", "-e", f"sh {TLS_RSH}",
        ]
        if checksum:
            args.append("--checksum")
        limit = self.bwlimit if bwlimit is None else bwlimit
        if limit:
            args.append(f"--bwlimit={max(1, limit // 1024)}")
        if whole_file:
            args.append("--whole-file")
        args += [f"--exclude={e}" for e in excludes]
        args += [f"{src}/", f"{SECRET_USER}@peer::{dest}/"]
        t0 = time.monotonic()
        proc = self._run(args)
        ms = (time.monotonic() - t0) * 1000
        if live and proc.returncode in _LIVE_CHANGES:
            log.info("rsync of %s: files changed while it ran (exit %d); the next sync sends them", src, proc.returncode)
        elif proc.returncode != 0:
            raise ToolFailed(
                f"rsync of {src} to the destination failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}",
                "check the link to the destination, its free disk space and its agent log",
            )
        m = _SENT.search(proc.stdout)
        sent = int(re.sub(r"[,.]", "", m.group(1))) if m else 0
        log.debug("rsync %s -> %s: %d bytes in %.0f ms", src, dest, sent, ms)
        return SyncStats(sent, ms)

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        """Run rsync; an abort of the migration kills it (then raises Aborted)."""
        with subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
            if self.cancel is None:
                out, err = p.communicate()
            else:
                with self.cancel.interruptible(p):
                    out, err = p.communicate()
                self.cancel.check()
        return subprocess.CompletedProcess(args, p.returncode, out, err)


class FsSync(ABC):
    """The container's files, kept in sync with the destination's copy."""

    @abstractmethod
    def sync(self, *, live: bool, bwlimit: int | None = None) -> SyncStats:
        """Make the destination's copy equal to the files now. `live`: the container
        runs, so files changing meanwhile are expected (a later sync sends them);
        `bwlimit` (bytes/s, 0 = none) overrides the back-end's own cap."""


class RsyncFsSync(FsSync):
    """rsync of directory `src` into area `dest` on the destination, leaving out `excludes`."""

    def __init__(self, sender: RsyncSender, src: Path, dest: str, excludes: tuple[str, ...] = ()) -> None:
        self.sender = sender
        self.src = src
        self.dest = dest
        self.excludes = excludes

    def sync(self, *, live: bool, bwlimit: int | None = None) -> SyncStats:
        return self.sender.push(self.src, self.dest, self.excludes, bwlimit=bwlimit, live=live)
