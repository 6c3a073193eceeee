"""The standby host's side: the checkpoints it keeps of other hosts' containers.

Layout, all the agent's own: `STATE/standby/<ct>/`
- `gen-<migration id>/`: one complete checkpoint, the directory of the refresh that
  pushed it (phaul.migration.dest: `recv/ct` the container's root file system,
  `recv/images` CRIU's images of the same instant), with `kept.json` (`Kept`: who sent
  it, when it was taken, the container's configuration as validated at Prepare);
- `current.json`: which generation is the recovery point, replaced atomically once a
  newer one is complete and checked (a half-received refresh never becomes it);
- `failed-over.json`: CT failed over here (a tombstone): its old primary is told so
  when it asks to refresh again, and never runs its stale copy.

A refresh's root file system starts as hard links of the current one's
(`seed`): rsync replaces a changed file by a new one, so the kept generation
never changes while the next one arrives, and only what changed travels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phaul.containers import ContainerConfig
from phaul.errors import Conflict, NotFound, ToolFailed
from phaul.linux.fsutil import write_atomic
from phaul.migration.dest import Incoming
from phaul.validate import check_id

log = logging.getLogger(__name__)

FAILED_OVER_MARK = "has failed over to"  # in Prepare's refusal to a primary whose container failed over
CURRENT = "current.json"
TOMBSTONE = "failed-over.json"
KEPT = "kept.json"


@dataclass(frozen=True)
class Kept:
    """One checkpoint kept here."""

    ct: str
    source: str  # the primary
    source_address: str  # its agent's ADDR:PORT (from Prepare; dialled with its name checked)
    migration_id: str  # the refresh that pushed it: gen-<id>
    checkpoint_at: float  # wall-clock s the container was frozen for it
    config: ContainerConfig  # as validated at Prepare

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Kept:
        d: dict[str, Any] = json.loads(text)
        d["config"] = ContainerConfig(**d["config"])
        return cls(**d)


class StandbyStore:
    """The checkpoints of `state_dir/standby`."""

    def __init__(self, state_dir: Path, host_name: str) -> None:
        self.root = state_dir / "standby"
        self.host_name = host_name
        self._lock = threading.Lock()  # a refresh kept and a failover marked never cross
        self.failover_lock = threading.Lock()  # one failover at a time on this host

    def ct_dir(self, ct_id: str) -> Path:
        return self.root / check_id(ct_id)

    def current(self, ct_id: str) -> Kept | None:
        """The recovery point of `ct_id` here, if any."""
        try:
            gen = json.loads((self.ct_dir(ct_id) / CURRENT).read_text())["gen"]
            return Kept.from_json((self.ct_dir(ct_id) / check_id(gen, "generation") / KEPT).read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def gen_dir(self, kept: Kept) -> Path:
        return self.ct_dir(kept.ct) / f"gen-{check_id(kept.migration_id, 'migration ID')}"

    def failed_over(self, ct_id: str) -> dict[str, Any] | None:
        """The tombstone of `ct_id`, if it failed over here."""
        try:
            d = json.loads((self.ct_dir(ct_id) / TOMBSTONE).read_text())
            return d if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None

    def check_refresh(self, ct_id: str, source: str) -> None:
        """Prepare of a refresh: refused when CT failed over here (the primary is told with
        FAILED_OVER_MARK) or when another host keeps a standby of it here."""
        if self.failed_over(ct_id) is not None:
            raise Conflict(
                f"{ct_id} {FAILED_OVER_MARK} {self.host_name}: the copy on {source} is stale",
                f"protect the copy on {self.host_name} instead: `phaul --host {self.host_name} standby {ct_id} {source}`",
            )
        kept = self.current(ct_id)
        if kept is not None and kept.source != source:
            raise Conflict(f"{self.host_name} keeps a standby of {ct_id} for {kept.source}, not {source}",
                           f"stop it first: `phaul --host {kept.source} standby stop {ct_id}`")

    def seed(self, ct_id: str, recv_ct: Path, recv_images: Path, base: str) -> str:
        """Fill a refresh's empty `recv/ct` with hard links of the current checkpoint's files,
        and its `recv/images` with its images' when the current checkpoint is `base` (the one
        the source holds too: it sends a page delta against it). Returns `base` when the
        images were seeded, "" when the source must send them whole. Hard links are safe:
        the delta replaces a linked pages file, never patches it (phaul.memory.page_delta)."""
        kept = self.current(ct_id)
        if kept is None:
            return ""
        gen = self.gen_dir(kept) / "recv"
        try:
            link_tree(gen / "ct", recv_ct)
            if not base or base != kept.migration_id:
                return ""
            link_tree(gen / "images", recv_images)
            return base
        except ToolFailed as e:  # the refresh then sends every file
            log.warning("seeding the refresh of %s: %s", ct_id, e.message)
            return ""

    def keep(self, m: Incoming, checkpoint_at: float) -> Kept:
        """Make refresh `m` (handed over by Destination.keep) the recovery point of its
        container; older generations go."""
        assert m.config is not None
        ct_dir = self.ct_dir(m.ct_id)
        ct_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept = Kept(m.ct_id, m.source, m.source_address, m.migration_id, checkpoint_at, m.config)
        gen = self.gen_dir(kept)
        write_atomic(m.dir / KEPT, kept.to_json())
        with self._lock:
            if self.failed_over(m.ct_id) is not None:  # a refresh that was under way when it failed over
                shutil.rmtree(m.dir, ignore_errors=True)
                self.check_refresh(m.ct_id, m.source)  # raises, saying so
            m.dir.rename(gen)
            write_atomic(ct_dir / CURRENT, json.dumps({"gen": gen.name}) + "\n")
        self._drop_old(m.ct_id, keep=gen.name)
        log.info("standby of %s from %s: checkpoint of %s kept", m.ct_id, m.source, time.ctime(checkpoint_at))
        return kept

    def take(self, ct_id: str) -> tuple[Kept, Incoming]:
        """Failover: the recovery point as a migration to restore (its directory in place)."""
        kept = self.current(ct_id)
        if kept is None:
            raise NotFound(f"{self.host_name} keeps no standby of {ct_id}", "`phaul standby status` says which host does")
        gen = self.gen_dir(kept)
        if not (gen / "recv" / "images").is_dir():
            raise ToolFailed(f"the checkpoint of {ct_id} in {gen} is incomplete", "fail over to another standby, if any")
        m = Incoming(f"failover-{kept.migration_id}", ct_id, kept.source, gen, config=kept.config,
                     source_address=kept.source_address)
        return kept, m

    def mark_failed_over(self, kept: Kept) -> None:
        """CT is about to run here: the tombstone (`unmark` if it does not)."""
        with self._lock:
            write_atomic(self.ct_dir(kept.ct) / TOMBSTONE, json.dumps(
                {"ct": kept.ct, "from": kept.source, "at": time.time(), "checkpoint_at": kept.checkpoint_at}) + "\n")

    def unmark(self, ct_id: str) -> None:
        (self.ct_dir(ct_id) / TOMBSTONE).unlink(missing_ok=True)

    def failed_over_done(self, ct_id: str) -> None:
        """CT runs here: its checkpoints go."""
        (self.ct_dir(ct_id) / CURRENT).unlink(missing_ok=True)
        self._drop_old(ct_id, keep="")

    def drop(self, ct_id: str, source: str) -> None:
        """`standby stop` from the primary `source`: remove the checkpoints, and the tombstone
        of a failover from `source` (it knows now: its `standby stop` ended its schedule)."""
        kept = self.current(ct_id)
        if kept is not None and kept.source != source:
            raise Conflict(f"the standby of {ct_id} on {self.host_name} belongs to {kept.source}, not {source}")
        (self.ct_dir(ct_id) / CURRENT).unlink(missing_ok=True)
        self._drop_old(ct_id, keep="")
        if (self.failed_over(ct_id) or {}).get("from") == source:
            self.unmark(ct_id)

    def list(self) -> list[tuple[Kept | None, dict[str, Any] | None]]:
        """Every container kept here or failed over here: (recovery point, tombstone)."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            kept, tomb = self.current(d.name), self.failed_over(d.name)
            if kept is not None or tomb is not None:
                out.append((kept, tomb))
        return out

    def _drop_old(self, ct_id: str, keep: str) -> None:
        for gen in self.ct_dir(ct_id).glob("gen-*"):
            if gen.name != keep:
                shutil.rmtree(gen, ignore_errors=True)


def link_tree(src: Path, dest: Path) -> None:
    """Make `dest` (new, or an empty directory) a copy of directory `src` whose files are hard
    links: cheap, and a file replaced in one (as rsync replaces a changed file) stays in the other."""
    r = subprocess.run(["cp", "-a", "--link", "--", f"{src}/.", str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ToolFailed(f"cannot link {src} into {dest}: {r.stderr.strip()[-300:]}", f"check the disk of {dest.parent}")
