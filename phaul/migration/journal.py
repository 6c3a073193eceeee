"""The migration journal: each agent writes, durably and before acting, each
step of each migration it takes part in.

One file per migration and role, STATE/journal/ROLE-ID.jsonl, one JSON object
per line. The first record names the migration (ID, role, container, peer and
where to reach it); every later one adds a step. A record is on disk (written,
fsynced, and the directory fsynced when the file is new) before `record()`
returns, so a restarted agent knows everything it may have started.

`Journal.entries()` folds each file into a `JournalEntry`: the migration's
last step, whether it is settled and, once settled, how (`result`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from phaul.errors import InvalidInput, NotFound
from phaul.linux.fsutil import fsync_dir
from phaul.migration.report import Result
from phaul.validate import check_id

log = logging.getLogger(__name__)

ROLES = ("source", "destination")
# A migration is settled once one of these steps is journaled; `result` says how.
SETTLED = (Result.OK, Result.ROLLED_BACK, Result.FAILED, Result.REFUSED)
# Journals of settled migrations kept at start-up (the newest ones).
KEEP_SETTLED = 200
MAX_RECORD = 64 << 10  # bytes; a record larger than this is a bug
MAX_FILE = 4 << 20  # bytes read per journal file


@dataclass
class JournalEntry:
    """What the journal says about one migration on this host."""

    migration_id: str
    role: str  # source | destination
    ct: str
    peer: str  # the other host's name
    peer_address: str = ""  # ADDR:PORT of the other agent (source role: the destination's)
    step: str = ""  # the last step journaled
    steps: list[str] = field(default_factory=list)
    started_at: str = ""
    updated_at: str = ""
    result: Result | Literal[""] = ""  # "" while unsettled; one of SETTLED; IN_DOUBT when marked so
    error: str = ""

    @property
    def settled(self) -> bool:
        return self.result in SETTLED

    def reached(self, step: str) -> bool:
        return step in self.steps


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class Journal:
    """The journal in `state_dir`/journal. Thread-safe; every write is durable."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "journal"
        self._lock = threading.Lock()

    def path(self, migration_id: str, role: str) -> Path:
        check_id(migration_id, "migration ID")
        if role not in ROLES:
            raise InvalidInput(f"invalid journal role {role!r}")
        return self.dir / f"{role}-{migration_id}.jsonl"

    def begin(self, migration_id: str, role: str, ct: str, peer: str, peer_address: str = "", **data: Any) -> None:
        """Start the journal of a migration (the file must not exist yet)."""
        check_id(ct)
        check_id(peer, "peer host name")
        head = {"migration_id": migration_id, "role": role, "ct": ct, "peer": peer, "peer_address": peer_address}
        self._append(migration_id, role, {"step": "begin", **head, **data}, new=True)

    def record(self, migration_id: str, role: str, step: str, **data: Any) -> None:
        """Journal `step` (with details) durably. Call it before acting on the step."""
        self._append(migration_id, role, {"step": step, **data}, new=False)

    def settle(self, migration_id: str, role: str, result: Result, error: str = "") -> None:
        """Journal how the migration ended: ok, rolled_back, failed or refused."""
        if result not in SETTLED:
            raise InvalidInput(f"invalid journal result {result!r}")
        self._append(migration_id, role, {"step": result, "result": result, "error": error[:2000]}, new=False)

    def mark_in_doubt(self, migration_id: str, role: str, error: str) -> None:
        """Journal that the migration could not be settled (yet); it stays unsettled."""
        self._append(migration_id, role, {"step": Result.IN_DOUBT, "result": Result.IN_DOUBT, "error": error[:2000]}, new=False)

    def _append(self, migration_id: str, role: str, record: dict[str, Any], new: bool) -> None:
        path = self.path(migration_id, role)
        record = {"ts": _now(), **record}
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        if len(line) > MAX_RECORD:
            raise InvalidInput(f"journal record for {migration_id} is too large ({len(line)} bytes)")
        with self._lock:
            created = False
            if not self.dir.is_dir():
                self.dir.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.dir.parent)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            if new:
                flags |= os.O_EXCL
                created = True
            elif not path.exists():
                raise NotFound(f"no journal for migration {migration_id} ({role})")
            fd = os.open(path, flags, 0o600)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.dir)

    # -- reading --------------------------------------------------------------------

    def get(self, migration_id: str, role: str | None = None) -> JournalEntry:
        """The entry of one migration (the given role, or whichever this host has)."""
        for r in ((role,) if role else ROLES):
            path = self.path(migration_id, r)
            if path.exists():
                entry = _fold(path)
                if entry is not None:
                    return entry
        raise NotFound(f"no migration {migration_id} in this host's journal", "see `phaul migrations` for the known ones")

    def entries(self) -> list[JournalEntry]:
        """Every journaled migration, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for path in self.dir.glob("*.jsonl"):
            entry = _fold(path)
            if entry is not None:
                out.append(entry)
        out.sort(key=lambda e: (e.started_at, e.migration_id))
        return out

    def unsettled(self) -> list[JournalEntry]:
        return [e for e in self.entries() if not e.settled]

    def prune(self, keep: int = KEEP_SETTLED) -> int:
        """Remove the journals of all but the newest `keep` settled migrations."""
        settled = [e for e in self.entries() if e.settled]
        gone = 0
        for e in settled[: max(0, len(settled) - keep)]:
            self.path(e.migration_id, e.role).unlink(missing_ok=True)
            gone += 1
        return gone


def _fold(path: Path) -> JournalEntry | None:
    """Fold a journal file into one entry; None if its first record is unreadable.
    A torn last line (the agent died while writing it) is ignored."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE)
    except OSError as e:
        log.warning("cannot read journal %s: %s", path, e)
        return None
    entry: JournalEntry | None = None
    for line in raw.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("journal %s: ignoring a torn record", path)
            continue
        if not isinstance(rec, dict):
            continue
        step = str(rec.get("step", ""))
        if entry is None:
            if step != "begin":
                log.warning("journal %s does not start with its begin record", path)
                return None
            try:
                entry = JournalEntry(
                    migration_id=check_id(str(rec["migration_id"]), "migration ID"), role=str(rec["role"]),
                    ct=check_id(str(rec["ct"])), peer=check_id(str(rec["peer"]), "peer host name"),
                    peer_address=str(rec.get("peer_address", "")), started_at=str(rec.get("ts", "")),
                )
            except (KeyError, InvalidInput) as e:
                log.warning("journal %s has a bad begin record: %s", path, e)
                return None
        entry.step = step
        entry.steps.append(step)
        entry.updated_at = str(rec.get("ts", ""))
        if "result" in rec:
            try:
                entry.result = Result(str(rec["result"]))
            except ValueError:
                log.warning("journal %s: ignoring the unknown result %r", path, rec["result"])
            entry.error = str(rec.get("error", ""))
        elif step not in ("begin",):
            # a new step after an in_doubt mark: the migration is being settled again
            if entry.result == Result.IN_DOUBT:
                entry.result = ""
    return entry

