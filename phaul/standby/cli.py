"""`phaul standby ...` and `phaul failover ...`: argument parsing and output only."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from phaul import output
from phaul.errors import ExitCode, InvalidInput, LinkBroken, NotFound, Unreachable
from phaul.hosts import HostsFile
from phaul.rpc import phaul_pb2 as pb
from phaul.validate import check_id

STANDBY_DESCRIPTION = """\
Keep a standby copy of a running container on another host, and fail over to it.

  phaul --host alpha standby CT HOST [--interval S] [--max-lag S]
      HOST keeps CT's root file system and a recent consistent checkpoint, refreshed
      every --interval while CT runs on alpha (each refresh freezes CT briefly: a
      full dump and the last file changes). The standby never runs by itself.
  phaul standby status [--json]
      every standby the hosts know: the age of its last checkpoint (the recovery
      point), bytes and pause of the last refresh, whether it lags past --max-lag.
  phaul --host alpha standby stop CT
      end the refreshes and remove the checkpoint on the standby host.
"""
FAILOVER_DESCRIPTION = """\
Run CT on its standby host from the last consistent checkpoint. The primary is
fenced first: while its agent answers and CT runs there the failover is refused
(use `phaul migrate`); when it does not answer, --fenced says the admin made sure
CT cannot run there (powered off). The old primary's agent, back, keeps its stale
copy stopped; `phaul --host NEW standby CT OLD` protects the container again.
"""
FAILOVER_EPILOG = "exit status: 0 CT runs on the standby host; 1 the restore failed (the checkpoint is kept); " \
    "2 refused (no standby, the primary runs CT or is not fenced), nothing changed."
LIST_TIMEOUT_S = 10.0


def add_parsers(sub: argparse._SubParsersAction, connection_options: Callable[[argparse.ArgumentParser], None]) -> None:
    s = sub.add_parser("standby", help="keep a standby copy of a container on another host (status, stop)",
                       description=STANDBY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("words", nargs="+", metavar="CT HOST | status | stop CT",
                   help="CT HOST: start a standby of CT on HOST; status: list them; stop CT: remove CT's")
    s.add_argument("--interval", type=float, default=30.0, metavar="S",
                   help="seconds between refreshes (default 30); each one briefly freezes the container")
    s.add_argument("--max-lag", type=float, metavar="S",
                   help="a recovery point older than this is reported late (default: three intervals)")
    s.add_argument("--json", action="store_true", help="status: print JSON")
    connection_options(s)
    s.set_defaults(func=cmd_standby)
    f = sub.add_parser("failover", help="run a container on its standby host from its last checkpoint",
                       description=FAILOVER_DESCRIPTION, epilog=FAILOVER_EPILOG)
    f.add_argument("id", metavar="CT", help="the container's ID")
    f.add_argument("--to", metavar="HOST", help="the standby host (default: the one holding CT's standby)")
    f.add_argument("--fenced", action="store_true",
                   help="the primary does not answer and the admin made sure CT cannot run there (powered off)")
    f.add_argument("--json", action="store_true", help="print the outcome as JSON")
    connection_options(f)
    f.set_defaults(func=cmd_failover)


def cmd_standby(args: argparse.Namespace) -> int:
    from phaul import cli

    words = args.words
    if words == ["status"]:
        return _status(args)
    if len(words) == 2 and words[0] == "stop":
        with cli._agent(args) as agent:
            agent.call("StandbyStop", pb.ContainerRef(id=check_id(words[1])), timeout=60)
        print(f"standby of {words[1]} removed")
        return ExitCode.OK
    if len(words) != 2:
        raise InvalidInput(f"`standby {' '.join(words)}` is not understood", "give CT HOST, status, or stop CT")
    ct_id, host = check_id(words[0]), check_id(words[1], "standby host name")
    if args.interval <= 0 or (args.max_lag is not None and args.max_lag <= 0):
        raise InvalidInput("--interval and --max-lag must be positive", "give seconds, e.g. --interval 30")
    entry = cli._hosts(args).host(host)
    with cli._agent(args) as agent:
        info = agent.call("Standby", pb.StandbyRequest(
            ct_id=ct_id, host=host, host_address=entry.address, interval_s=args.interval, max_lag_s=args.max_lag or 0.0,
        ), timeout=60)
    print(f"{ct_id}: standby on {info.standby}, refreshed every {info.interval_s:g} s (late after {info.max_lag_s:g} s)")
    return ExitCode.OK


def _gather(hosts: HostsFile, connect: Callable[[Any], Any]) -> tuple[list[pb.StandbyInfo], list[str]]:
    """Every host's StandbyList; the hosts that did not answer."""
    infos: list[pb.StandbyInfo] = []
    silent: list[str] = []
    for entry in hosts.hosts.values():
        try:
            with connect(entry) as agent:
                infos += agent.call("StandbyList", pb.Empty(), timeout=LIST_TIMEOUT_S).standbys
        except (Unreachable, LinkBroken):
            silent.append(entry.name)
    return infos, silent


def status_rows(infos: list[pb.StandbyInfo], now: float) -> list[dict[str, Any]]:
    """One row per standby: the primary's view, else the standby host's."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for i in sorted(infos, key=lambda i: i.role != "primary"):  # the primary's rows first
        key = (i.ct, i.standby)
        if key in rows:
            continue
        primary = i.role == "primary"
        at = i.checkpoint_at or None
        age = now - at if at is not None else None
        rows[key] = {
            "ct": i.ct, "primary": i.primary, "standby": i.standby, "reported_by": i.role, "state": i.state,
            "interval_s": i.interval_s if primary else None, "max_lag_s": i.max_lag_s if primary else None,
            "checkpoint_at": at, "recovery_point_s": age,
            "late": i.state == "active" and (age is None or (primary and age > i.max_lag_s)),
            "refresh_bytes": i.refresh_bytes if primary else None, "pause_ms": i.pause_ms if primary else None,
            "refreshes": i.refreshes if primary else None, "error": i.error,
        }
    return sorted(rows.values(), key=lambda r: (r["ct"], r["standby"]))


def _status(args: argparse.Namespace) -> int:
    from phaul import cli

    hosts = cli._hosts(args)
    where = f"the \"pki\" section of {hosts.path}"
    infos, silent = _gather(hosts, lambda entry: cli._connect(hosts.pki, entry, where))
    rows = status_rows(infos, time.time())
    for name in silent:
        print(f"{name} does not answer: its standbys are shown as their standby hosts see them", file=sys.stderr)
    if args.json:
        print(output.dumps(output.standby_status(rows)))
        return ExitCode.OK

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print(f"{'CT':<12} {'PRIMARY':<8} {'STANDBY':<8} {'STATE':<12} {'RECOVERY POINT':>14} {'LAG':<5} "
          f"{'BYTES':>10} {'PAUSE ms':>9} {'REFRESHES':>9}  ERROR")
    for r in rows:
        lag = "late" if r["late"] else "ok"
        print(f"{r['ct']:<12} {r['primary']:<8} {r['standby']:<8} {r['state']:<12} "
              f"{num(r['recovery_point_s'], '.1f') + ' s':>14} {lag:<5} {num(r['refresh_bytes'], 'd'):>10} "
              f"{num(r['pause_ms'], '.0f'):>9} {num(r['refreshes'], 'd'):>9}  {r['error']}")
    return ExitCode.OK


def cmd_failover(args: argparse.Namespace) -> int:
    from phaul import cli

    ct_id = check_id(args.id)
    hosts = cli._hosts(args)
    where = f"the \"pki\" section of {hosts.path}"
    t0 = time.monotonic()
    to = check_id(args.to, "standby host name") if args.to else None
    if to is None:
        infos, _ = _gather(hosts, lambda entry: cli._connect(hosts.pki, entry, where))
        found = sorted({i.standby for i in infos if i.ct == ct_id and i.role == "standby" and i.state == "active"})
        if not found:
            raise NotFound(f"no host answering keeps a standby of {ct_id}", "name it with --to HOST")
        if len(found) > 1:
            raise InvalidInput(f"{ct_id} has standbys on {', '.join(found)}", "pick one with --to HOST")
        to = found[0]
    with cli._connect(hosts.pki, hosts.host(to), where) as agent:
        reply = agent.call("Failover", pb.FailoverRequest(ct_id=ct_id, fenced=args.fenced), timeout=600)
    total_ms = (time.monotonic() - t0) * 1000
    if args.json:
        print(output.dumps(output.failover(reply, total_ms)))
    else:
        age = time.time() - reply.checkpoint_at
        print(f"{ct_id} runs on {to} from its checkpoint of {age:.1f} s ago (primary {reply.primary}, fenced: "
              f"{reply.fence}); restored in {reply.restore_ms:.0f} ms, {total_ms:.0f} ms in all")
    return ExitCode.OK
