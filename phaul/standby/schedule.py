"""The primary's side: the standby copies its containers have, and their refreshes.

Each standby is a `Schedule` persisted in `STATE/standby-out/<ct>.json` and a
thread that refreshes it every interval (phaul.standby.refresh); an agent restart
resumes them. Before its first refresh and after a failed one the thread asks the
standby host whether CT failed over there; when it did (or the standby host refuses
a refresh for that reason, or fences this host through `fence`) the schedule turns
`failed-over`: the refreshes end, a copy of CT still running here is killed, and
`ct start` refuses it (`stale`), until the admin destroys it or protects the new
primary's copy from here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from phaul.agent.host import Host
from phaul.channels.client import connect
from phaul.endpoint import parse_endpoint
from phaul.errors import Conflict, InvalidInput, NotFound, PhaulError, Refused
from phaul.linux.fsutil import write_atomic
from phaul.rpc import phaul_pb2 as pb
from phaul.standby.basis import Bases
from phaul.standby.refresh import StandbyRefresh
from phaul.standby.store import FAILED_OVER_MARK
from phaul.validate import check_id

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 86400.0
ACTIVE, FAILED_OVER = "active", "failed-over"  # Schedule.state


@dataclass
class Schedule:
    """One standby of a container of this host, and how its refreshes went."""

    ct: str
    host: str  # the standby host
    address: str  # its agent's ADDR:PORT
    interval_s: float
    max_lag_s: float
    state: str = ACTIVE  # ACTIVE | FAILED_OVER
    checkpoint_at: float = 0.0  # the recovery point: when the last kept checkpoint was taken
    refresh_bytes: int = 0  # what the last refresh sent
    pause_ms: float = 0.0  # how long the last refresh held the container still
    refreshes: int = 0
    error: str = ""  # the last refresh's failure ("" once one succeeds)

    def to_proto(self, primary: str) -> pb.StandbyInfo:
        return pb.StandbyInfo(
            ct=self.ct, role="primary", primary=primary, standby=self.host, interval_s=self.interval_s,
            max_lag_s=self.max_lag_s, checkpoint_at=self.checkpoint_at, refresh_bytes=self.refresh_bytes,
            pause_ms=self.pause_ms, refreshes=self.refreshes, error=self.error, state=self.state,
        )


class Standbys:
    """Every standby of this host's containers."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.dir = host.state_dir / "standby-out"
        self._lock = threading.Lock()
        self._stops: dict[str, threading.Event] = {}
        self._refreshing: dict[str, threading.Lock] = {}  # held through each refresh: `stop` waits for it

    def _path(self, ct_id: str) -> Path:
        return self.dir / f"{check_id(ct_id)}.json"

    def get(self, ct_id: str) -> Schedule | None:
        try:
            return Schedule(**json.loads(self._path(ct_id).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _save(self, s: Schedule) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self._path(s.ct), json.dumps(dataclasses.asdict(s), indent=2) + "\n")

    def list(self) -> list[Schedule]:
        if not self.dir.is_dir():
            return []
        found = (self.get(p.stem) for p in sorted(self.dir.glob("*.json")))
        return [s for s in found if s is not None]

    def start(self, ct_id: str, host: str, address: str, interval_s: float, max_lag_s: float) -> Schedule:
        """Keep a standby of `ct_id` on `host` (a peer), refreshed every `interval_s`."""
        check_id(ct_id)
        check_id(host, "standby host name")
        parse_endpoint(address)
        if host == self.host.name:
            raise InvalidInput(f"{host} is the host {ct_id} runs on", "name another host as the standby")
        if host not in self.host.peers:
            raise Refused(f"{self.host.name} does not migrate to {host}", f"add {host} to the agent's --peers list")
        if not MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S:
            raise InvalidInput(f"--interval {interval_s:g} s is out of range",
                               f"give {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} seconds")
        if max_lag_s < interval_s:
            raise InvalidInput(f"--max-lag {max_lag_s:g} s is shorter than --interval {interval_s:g} s",
                               "give a --max-lag of at least the interval (the default is three intervals)")
        info = self.host.containers.info(ct_id)  # NotFound when it is not here
        if info.state != "running":
            raise Conflict(f"container {ct_id} is {info.state} on {self.host.name}, not running",
                           f"start it first: `phaul --host {self.host.name} ct start {ct_id}`")
        with self._lock:
            old = self.get(ct_id)
            if old is not None and old.state == ACTIVE:
                raise Conflict(f"{ct_id} already has a standby on {old.host}",
                               f"stop it first: `phaul --host {self.host.name} standby stop {ct_id}`")
            s = Schedule(ct_id, host, address, interval_s, max_lag_s)
            self._save(s)
            self._spawn(s)
        log.info("standby of %s on %s every %g s", ct_id, host, interval_s)
        return s

    def stop(self, ct_id: str) -> None:
        """End the standby of `ct_id`: its refreshes, and the checkpoint on the standby host."""
        s = self.get(ct_id)
        if s is None:
            raise NotFound(f"{ct_id} has no standby from {self.host.name}", "`phaul standby status` lists them")
        self._halt(ct_id)
        with self._refresh_lock(ct_id):  # a refresh under way ends first: none keeps a checkpoint after the drop
            pass
        if s.state == ACTIVE and self._failed_over_there(s):
            self._failed_over(s)
            s = dataclasses.replace(s, state=FAILED_OVER)
        if s.state == FAILED_OVER and self.host.containers.container_dir(ct_id).exists():
            raise Conflict(  # its schedule is what keeps the stale copy from running
                f"{ct_id} failed over to {s.host}: its stale copy on {self.host.name} must go first",
                f"destroy it (`phaul --host {self.host.name} ct destroy {ct_id}`), then stop the standby again",
            )
        try:
            with connect(s.address, s.host, self.host.creds) as agent:
                agent.call("DropStandby", pb.ContainerRef(id=ct_id), timeout=30)
        except PhaulError as e:
            if s.state == ACTIVE:
                with self._lock:
                    self._spawn(s)  # the refreshes go on
                raise type(e)(f"{s.host} could not drop its standby of {ct_id} (it goes on): {e.message}",
                              "run it again once the standby host answers") from None
        self._path(ct_id).unlink(missing_ok=True)
        Bases(self.host.state_dir).drop(ct_id)

    def resume_all(self) -> None:
        """Agent start-up: the refreshes of every active standby go on."""
        for s in self.list():
            if s.state == ACTIVE:
                with self._lock:
                    self._spawn(s)

    def stop_all(self) -> None:
        for ev in list(self._stops.values()):
            ev.set()

    def fence(self, ct_id: str, caller: str) -> bool:
        """The standby host `caller` is about to fail `ct_id` over: True (refused) while it
        runs here; else it never runs here again (the schedule turns failed-over)."""
        s = self.get(ct_id)
        if s is None or s.host != caller:
            raise Refused(f"{caller} keeps no standby of {ct_id} for {self.host.name}")
        try:
            state = self.host.containers.info(ct_id).state
        except NotFound:
            state = "gone"
        if state in ("running", "paused"):  # "created": stopped, its bundle kept
            return True
        self._failed_over(s)
        return False

    def stale(self, ct_id: str) -> Schedule | None:
        """The schedule of `ct_id` if it failed over elsewhere (its copy here is stale)."""
        s = self.get(ct_id)
        return s if s is not None and s.state == FAILED_OVER else None

    # -- the refresh thread ---------------------------------------------------------

    def _spawn(self, s: Schedule) -> None:
        stop = self._stops[s.ct] = threading.Event()
        threading.Thread(target=self._loop, args=(s.ct, stop), name=f"standby-{s.ct}", daemon=True).start()

    def _refresh_lock(self, ct_id: str) -> threading.Lock:
        with self._lock:
            return self._refreshing.setdefault(ct_id, threading.Lock())

    def _halt(self, ct_id: str) -> None:
        with self._lock:
            ev = self._stops.pop(ct_id, None)
        if ev is not None:
            ev.set()

    def _loop(self, ct_id: str, stop: threading.Event) -> None:
        ask = True  # whether CT failed over: at start and after a failure
        while not stop.is_set():
            s = self.get(ct_id)
            if s is None or s.state != ACTIVE:
                return
            t0 = time.monotonic()
            if ask and self._failed_over_there(s):
                self._failed_over(s)
                return
            with self._refresh_lock(ct_id):
                ask = stop.is_set() or not self._refresh(s, stop)
            stop.wait(max(0.0, s.interval_s - (time.monotonic() - t0)))

    def _refresh(self, s: Schedule, stop: threading.Event) -> bool:
        r = StandbyRefresh(self.host, s.ct, s.host, s.address)
        try:
            r.preflight()
        except PhaulError as e:
            if FAILED_OVER_MARK in e.message:
                self._failed_over(s)
                stop.set()
                return True
            self._record(s.ct, error=f"refresh refused: {e.message}")
            return False
        report = r.run()
        if report.result != "ok":
            self._record(s.ct, error=f"refresh {report.result}: {report.error}")
            return False
        self._record(s.ct, checkpoint_at=r.checkpoint_at, pause_ms=r.pause_ms,
                     refresh_bytes=report.bytes_sent + report.fs_bytes_sent)
        return True

    def _record(self, ct_id: str, error: str = "", **figures: float) -> None:
        with self._lock:
            s = self.get(ct_id)
            if s is None or s.state != ACTIVE:
                return
            if error:
                log.warning("standby of %s on %s: %s", ct_id, s.host, error)
            else:
                s.refreshes += 1
            s = dataclasses.replace(s, error=error, **figures)  # type: ignore[arg-type]
            self._save(s)

    def _failed_over_there(self, s: Schedule) -> bool:
        try:
            with connect(s.address, s.host, self.host.creds) as agent:
                reply = agent.call("StandbyList", pb.Empty(), timeout=10)
        except PhaulError as e:
            log.info("standby of %s: cannot ask %s whether it failed over: %s", s.ct, s.host, e.message)
            return False
        return any(i.ct == s.ct and i.state == FAILED_OVER for i in reply.standbys)

    def _failed_over(self, s: Schedule) -> None:
        """CT failed over to the standby host: no refresh again, and no copy runs here."""
        with self._lock:
            self._stops.pop(s.ct, None)
            self._save(dataclasses.replace(s, state=FAILED_OVER, error=f"failed over to {s.host}"))
        log.error("%s failed over to %s: its copy here is stale and stays stopped", s.ct, s.host)
        Bases(self.host.state_dir).drop(s.ct)
        try:
            if self.host.containers.info(s.ct).state in ("running", "paused"):
                self.host.containers.kill(s.ct)
        except NotFound:
            pass
        except PhaulError as e:
            log.error("cannot stop the stale copy of %s: %s", s.ct, e)
