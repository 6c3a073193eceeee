"""The `phaul` command line: argument parsing and output only."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from phaul import __version__, output
from phaul.channels import messages
from phaul.channels.client import Agent, connect
from phaul.channels.transport import Credentials
from phaul.checks import CheckState
from phaul.config import AgentConfig, MigrationOptions, Timeouts
from phaul.containers import ContainerConfig
from phaul.errors import ExitCode, InDoubt, InvalidInput, NotFound, PhaulError, ToolFailed
from phaul.fleet import migrate_call
from phaul.fleet.controls import follow, source_of
from phaul.hosts import HostEntry, HostsFile, PkiFiles, read_hosts
from phaul.memory import choice
from phaul.migration.preflight import CHECKS, check_force
from phaul.migration.report import Result
from phaul.migration.steps import NO_HOOK, StepHook
from phaul.rpc import phaul_pb2 as pb
from phaul.standby import cli as standby_cli
from phaul.validate import check_id, parse_size

log = logging.getLogger(__name__)

# Entry points that add subcommands: each is called with the subparsers action.
COMMAND_PLUGINS = "phaul.commands"
START_LOG_LINES = 20  # lines of its output `ct start` shows of a command that exited at once
LOG_POLL = 0.5  # s: `ct logs --follow` asks for new output this often
CREATE_TIMEOUT = 3600.0  # s: the first debian root of a package set is built during the call
TIMEOUTS, MIGRATION = Timeouts(), MigrationOptions()  # the defaults the options show

HOST_HELP = (
    "the agent to talk to: a name from the hosts file, before or after the command (default: $PHAUL_HOST, "
    "else the agent serving /run/phaul/agent.sock ($PHAUL_AGENT_SOCKET) here, else the one host of the hosts file "
    "whose agent socket is on this machine, else alpha)"
)
HOST_ENV = "PHAUL_HOST"
HOSTS_FILE_HELP = "hosts file (default: $PHAUL_HOSTS_FILE, the lab's, /etc/phaul/hosts.json)"
PKI_DIR_HELP = "the CA's directory (default: /etc/phaul/pki)"
CT_ID_HELP = "the container's ID"

DESCRIPTION = """\
Live migration of Linux containers between hosts with CRIU.

Every host runs `phaul agent`; the CLI talks to agents over mutual TLS. Hosts
are named in a hosts file (the lab writes one: `phaul lab up`).

  phaul lab up                              build a two-host lab (alpha, beta)
  phaul --host alpha ct create web --memory 256M
  phaul --host alpha ct start web -- /bin/sh -c 'while :; do sleep 1; done'
  phaul --host alpha migrate web beta       move it, running, to beta
"""

PRECOPY_ALIASES = {"off": "stop-and-copy", "auto": "precopy"}  # --precopy, before --method
MIGRATE_EPILOG = """\
memory methods (--method):
  precopy        rounds of dumps while the container runs, then one freeze for
                 what changed since; a failure at any point leaves the source
                 running (this host's kind: page deltas between full dumps, or
                 CRIU pre-dumps where the kernel tracks dirty pages)
  stop-and-copy  one freeze for the whole dump and transfer; the simplest
  postcopy       one short freeze without the memory: the container runs on
                 HOST at once and its pages follow on demand; from the resume
                 until the last page the container depends on both hosts
  hybrid         pre-copy rounds, then post-copy: after the resume only the
                 pages that differ from the last round cross the link
  auto           (default) predicts each method's pauses as a client sees them
                 and takes a safe one (precopy, stop-and-copy) when it meets
                 --max-downtime, else the shortest pause that costs no more
                 in all than stop-and-copy (postcopy and hybrid only when
                 asked for); the report says which ran and why
  --offline      no memory moves: the container is stopped (SIGTERM, SIGKILL
                 after 10 s), its files synced, and its command started afresh
                 on HOST; a created or stopped container always moves so and
                 stays created there (the report's memory_method: offline)

exit status: 0 the container runs on HOST; 1 the migration was rolled back
(the container still runs here) or failed (the report says where it is); 2 bad
input or refused before anything changed; 3 in doubt (the migration started
and its stream broke, or no report came): run `phaul recover`; 4 busy (this
host already runs its most migrations at once): try again later.
"""


COPY_EPILOG = """\
A cold copy: the copy's root file system is synced from the source while the
source runs on (untouched), and the copy's command starts afresh on HOST (a
copy of a stopped container stays created). The copy starts from the file
system, not from the memory: it has its own ID, MAC and address (--ip; none
without it), so two running copies never share an identity.

exit status: 0 the copy is on HOST; 1 it failed and was removed (the source
is as it was); 2 bad input or refused before anything changed (NEWID exists
on HOST, the address is in use); 3 in doubt: run `phaul recover`; 4 busy.
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else list(argv))
    _setup_logging(args)
    if not hasattr(args, "func"):
        parser.print_help()
        return ExitCode.REFUSED
    try:
        return int(args.func(args) or 0)
    except PhaulError as e:
        print(output.error(e) if getattr(args, "json", False) else f"phaul: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("phaul: interrupted", file=sys.stderr)
        return 130


def _setup_logging(args: argparse.Namespace) -> None:
    """The agent logs at INFO, with timestamps or journald's priorities (phaul.agent.journald); the rest warnings."""
    if args.command != "agent":
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
        return
    from phaul.agent import journald

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(journald.formatter(sys.stderr))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phaul", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"phaul {__version__}")
    p.add_argument("--host", default=None, help=HOST_HELP)
    p.add_argument("--hosts-file", type=Path, help=HOSTS_FILE_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for plugin in entry_points(group=COMMAND_PLUGINS):  # e.g. `phaul lab` (phaul.testing.lab_cli)
        plugin.load()(sub)

    _agent_parser(sub)

    k = sub.add_parser("pki", help="make a CA and host certificates")
    ksub = k.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    ki = ksub.add_parser("init", help="create a CA")
    ki.add_argument("--dir", type=Path, default=Path("/etc/phaul/pki"), help=PKI_DIR_HELP)
    ki.add_argument("--force", action="store_true", help="replace an existing CA")
    ki.set_defaults(func=cmd_pki_init)
    ks = ksub.add_parser("issue", help="issue a certificate for a host or client")
    ks.add_argument("name", help="the host's name (its agent's --name) or a client's (e.g. admin)")
    ks.add_argument("--dir", type=Path, default=Path("/etc/phaul/pki"), help=PKI_DIR_HELP)
    _connection_options(ks)
    ks.add_argument("--ip", action="append", default=[], help="an IPv4 or IPv6 address for the certificate (repeatable)")
    ks.add_argument("--dns", action="append", default=[], help="an extra DNS name (repeatable)")
    ks.add_argument("--force", action="store_true",
                    help="issue even if a name or address is another host's (another certificate here, or --hosts-file)")
    ks.set_defaults(func=cmd_pki_issue)
    kl = ksub.add_parser("list", help="the certificates issued here: serial, names, expiry, status")
    kl.add_argument("--dir", type=Path, default=Path("/etc/phaul/pki"), help=PKI_DIR_HELP)
    kl.add_argument("--json", action="store_true", help="print the certificates as JSON")
    kl.set_defaults(func=cmd_pki_list)
    kc = ksub.add_parser("csr", help="on the host itself: make its private key (mode 0600) and a certificate signing request")
    kc.add_argument("name", help="this host's name (its agent's name)")
    kc.add_argument("--dir", type=Path, default=Path("/etc/phaul/pki"),
                    help="where NAME.key and NAME.csr are written (default: /etc/phaul/pki)")
    kc.add_argument("--ip", action="append", default=[], help="an IP address of this host for the certificate (repeatable)")
    kc.add_argument("--dns", action="append", default=[],
                    help="an extra DNS name of this host, e.g. NAME.example.org (repeatable)")
    kc.set_defaults(func=cmd_pki_csr)
    kg = ksub.add_parser("sign", help="on the CA's host: issue the certificate a host's request (`pki csr`) asks for")
    kg.add_argument("csr", type=Path, help="the request file (NAME.csr)")
    kg.add_argument("--dir", type=Path, default=Path("/etc/phaul/pki"), help=PKI_DIR_HELP)
    kg.add_argument("--name", help="refuse the request unless it is for this host name")
    kg.add_argument("--admins", default="admin", help="comma-separated admin names no host may get (default: admin)")
    kg.add_argument("--out", type=Path, help="also write the certificate here (default: only NAME.crt in --dir)")
    _connection_options(kg)
    kg.set_defaults(func=cmd_pki_sign)
    kr = ksub.add_parser("revoke", help="add a certificate (or every one issued to a name) to revoked.txt")
    kr.add_argument("what", metavar="SERIAL|NAME", help="a certificate's serial (hex), or a name: every certificate issued to it")
    kr.add_argument("--dir", type=Path, default=Path("/etc/phaul/pki"), help=PKI_DIR_HELP)
    kr.set_defaults(func=cmd_pki_revoke)

    ct = sub.add_parser("ct", help="containers on --host")
    _connection_options(ct)
    csub = ct.add_subparsers(dest="ct_command", metavar="ACTION", required=True)
    cc = csub.add_parser("create", help="create a container (not started)")
    cc.add_argument("id", help=CT_ID_HELP)
    cc.add_argument("--template", choices=("busybox", "debian"),
                    help="root file system template: busybox (the default) or debian (bookworm, mmdebstrap)")
    cc.add_argument("--packages", action="append", default=[], metavar="PKG[,PKG]",
                    help="--template debian: Debian packages to install (the root is built once per package set, then cached)")
    cc.add_argument("--rootfs", metavar="DIR|TARBALL",
                    help="copy this root file system (a directory or a tar archive on the agent's host) in")
    cc.add_argument("--image", metavar="PATH",
                    help="unpack this OCI image (layout directory, OCI archive or `docker save` archive on the agent's "
                         "host); its command, environment, user and working directory become the container's")
    cc.add_argument("--image-ref", default="", metavar="TAG", help="--image: the tag to use when it holds several images")
    cc.add_argument("--init", choices=("systemd",),
                    help="boot systemd as PID 1 (debian: the systemd package is added); `ct stop` halts it")
    cc.add_argument("--memory", help="memory limit, e.g. 256M")
    cc.add_argument("--cpus", type=float, help="CPU limit in CPUs, e.g. 0.5")
    cc.add_argument("--pids", type=int, help="maximum number of processes")
    cc.add_argument("--ip", help="ADDR/PREFIX on the host's bridge")
    cc.add_argument("--gateway", help="default gateway for --ip")
    cc.add_argument("--cap-add", action="append", default=[], metavar="CAP[,CAP]",
                    help="capabilities beyond the default set: MKNOD, NET_RAW (ping), SYS_PTRACE")
    cc.add_argument("--seccomp", choices=("default", "unconfined"), default="default",
                    help="the Docker/Podman default seccomp profile (default), or none")
    cc.set_defaults(func=cmd_ct_create)
    cs = csub.add_parser("start", help="start a container, optionally with a command")
    cs.add_argument("id", help=CT_ID_HELP)
    cs.add_argument("cmd", nargs="*", metavar="-- CMD ARGS", help="the command to run instead of the default (after `--`)")
    cs.set_defaults(func=cmd_ct_start)
    ce = csub.add_parser("exec", help="run a command in a running container; exits with its code")
    ce.add_argument("id", help=CT_ID_HELP)
    ce.add_argument("cmd", nargs="*", metavar="-- CMD ARGS",
                    help="the command and its arguments, after `--` (phaul's own options go before it)")
    ce.add_argument("--timeout", type=float, default=60.0, metavar="S",
                    help="kill the command after S seconds (default 60)")
    ce.set_defaults(func=cmd_ct_exec)
    cg = csub.add_parser("logs", help="the container's stdout and stderr (kept in a bounded log that moves with it)")
    cg.add_argument("id", help=CT_ID_HELP)
    cg.add_argument("--tail", type=int, default=0, metavar="N", help="only the last N lines")
    cg.add_argument("-f", "--follow", action="store_true", help="keep printing what it writes (Ctrl-C ends)")
    cg.set_defaults(func=cmd_ct_logs)
    cl = csub.add_parser("list", help="list containers: ID, state, init PID, memory used and limit")
    cl.add_argument("--json", action="store_true", help="print the containers as JSON")
    cl.set_defaults(func=cmd_ct_list)
    for name, func, text in (
        ("stop", cmd_ct_stop, "stop a container (kept, startable)"), ("destroy", cmd_ct_destroy, "stop and remove a container"),
    ):
        c = csub.add_parser(name, help=text)
        c.add_argument("id", help=CT_ID_HELP)
        c.set_defaults(func=func)

    for action_parser in csub.choices.values():
        _connection_options(action_parser)

    m = sub.add_parser(
        "migrate", help="live-migrate a container from --host to HOST", epilog=MIGRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("id", help="the container")
    m.add_argument("dest", metavar="HOST", help="the destination host's name")
    m.add_argument("--json", action="store_true", help="print only the report, as JSON")
    m.add_argument("--tcp", choices=("keep", "close"), default="keep",
                   help="keep established TCP connections (default) or close them")
    m.add_argument("--method", choices=choice.REQUESTS, default=None,
                   help="how memory moves (see below; default auto)")
    m.add_argument("--precopy", choices=("auto", "off"), default=None,
                   help="the older spelling: --precopy=off is --method stop-and-copy, --precopy=auto --method precopy")
    m.add_argument("--max-rounds", type=int, default=MIGRATION.max_rounds, metavar="N",
                   help=f"at most N pre-copy rounds before the final dump (default {MIGRATION.max_rounds})")
    m.add_argument("--max-downtime", type=int, default=MIGRATION.max_downtime_ms, metavar="MS",
                   help=f"stop pre-copying once the predicted frozen time is within MS (default {MIGRATION.max_downtime_ms})")
    m.add_argument("--bandwidth", metavar="RATE",
                   help="cap the pre-copy rounds' data rate in bytes/s, e.g. 50M (the frozen phase is never capped)")
    m.add_argument("--force", action="append", default=[], metavar="CHECK",
                   help="go ahead although preflight check CHECK fails (repeatable; see `phaul check`)")
    m.add_argument("--offline", action="store_true",
                   help="restart mode: stop, sync, start on HOST (its memory and connections are not kept)")
    _connection_options(m)
    m.set_defaults(func=cmd_migrate)

    cp = sub.add_parser(
        "copy", help="a cold copy of a container on HOST under a new ID; the source is left as it is",
        epilog=COPY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cp.add_argument("id", help="the container to copy")
    cp.add_argument("dest", metavar="HOST", help="the host the copy is made on")
    cp.add_argument("--as", dest="copy_as", metavar="NEWID", default=None,
                    help="the copy's ID (default ID-copy); refused when HOST has a container NEWID")
    cp.add_argument("--ip", dest="copy_ip", metavar="ADDR/PREFIX", default="",
                    help="the copy's address on HOST's bridge (never the source's; default: none)")
    cp.add_argument("--json", action="store_true", help="print only the report, as JSON")
    cp.add_argument("--force", action="append", default=[], metavar="CHECK",
                    help="go ahead although preflight check CHECK fails (repeatable; see `phaul check`)")
    _connection_options(cp)
    cp.set_defaults(func=cmd_copy)

    d = sub.add_parser("doctor", help="what this host has for migration, and what is missing")
    d.add_argument("--json", action="store_true", help="print the checks as JSON")
    d.set_defaults(func=cmd_doctor)

    ck = sub.add_parser(
        "check", help="preflight: could --host move container ID to HOST? (pass, warning, failure)",
        description="Run every check `migrate` runs first, without migrating, and print each as pass, warning "
        "or failure (the words of `phaul doctor`) with its reason. Checks: " + ", ".join(CHECKS) + ". `migrate` "
        "refuses on a failure unless "
        "given `--force CHECK` for that check. Exit status: 0 no failure, 1 a failure, 2 bad input.",
    )
    ck.add_argument("id", help="the container")
    ck.add_argument("dest", metavar="HOST", help="the destination host's name")
    ck.add_argument("--json", action="store_true", help="print the checks as JSON")
    _connection_options(ck)
    ck.set_defaults(func=cmd_check)

    ms = sub.add_parser(
        "migrations", help="recent migrations --host took part in, and their states",
        description="List the migrations in --host's journal, newest first: ID, role (source or destination), "
        "container, peer, last step, state (running, ok, rolled_back, failed, in_doubt). A migration in_doubt "
        "is settled by `phaul recover ID`.",
    )
    ms.add_argument("--json", action="store_true", help="print the list as JSON (with --follow: one JSON line per event)")
    ms.add_argument("--follow", nargs="?", const="", default=None, metavar="ID",
                    help="show the live progress of migration ID (default: the one running on --host) until it ends: "
                    "phase, round, bytes sent, rate, predicted pause; exit status as `migrate`'s")
    _connection_options(ms)
    ms.set_defaults(func=cmd_migrations)
    ab = sub.add_parser(
        "abort", help="abort a running migration before its commit (the container keeps running on its source)",
        description="Ask the source agent of MIGRATION-ID to abort it: before its commit it rolls back (the "
        "container runs on its source again, the destination is cleaned); after the commit the abort is refused "
        "(exit 2), the container running on the destination. Waits for the rollback. The source host is --host, "
        "else the host of the hosts file whose journal has the migration as its source. Exit status: 0 rolled "
        "back, 1 it ended otherwise, 2 refused (unknown ID, already committed or ended), 3 in doubt.",
    )
    ab.add_argument("migration_id", metavar="MIGRATION-ID", help="the migration (see `phaul migrations`)")
    ab.add_argument("--no-wait", action="store_true", help="return once the abort is taken, without waiting for the rollback")
    ab.add_argument("--json", action="store_true", help="print the outcome as JSON")
    _connection_options(ab)
    ab.set_defaults(func=cmd_abort)
    r = sub.add_parser(
        "recover", help="settle migrations left in doubt (all of --host's, or MIGRATION-ID)",
        description="Ask both agents what they hold and finish the migration one way or the other: the "
        "container ends running on exactly one host. Run it on either host of the migration.",
    )
    r.add_argument("migration_id", nargs="?", metavar="MIGRATION-ID", help="one migration (default: every unsettled one)")
    r.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    _connection_options(r)
    r.set_defaults(func=cmd_recover)

    _evacuate_parser(sub)
    _host_commands(sub)
    standby_cli.add_parsers(sub, _connection_options)
    co = sub.add_parser("completion", help="print a shell completion script (bash or zsh)",
                        description="Print a completion script for phaul's commands and options. "
                        "bash: phaul completion bash > /etc/bash_completion.d/phaul; "
                        "zsh: phaul completion zsh > \"${fpath[1]}/_phaul\"")
    co.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete in")
    co.set_defaults(func=cmd_completion)
    return p


def _evacuate_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evacuate", help="move every container off HOST (maintenance)",
        description="Move every container off HOST to the other hosts of the hosts file (or --to): running ones "
        "live, created and stopped ones offline (their files), as `phaul migrate` moves them; a paused one stays. "
        "Unsettled migrations of HOST are settled first (`phaul recover`). Each container goes where its "
        "preflight passes, to the destination with the most memory left after the containers' declared "
        "limits; smallest first. A container that cannot move stays running where it is and is named with "
        "the reason. Interrupted (Ctrl-C), no more migrations start and those under way finish; run it "
        "again to move what is left.",
        epilog="exit status: 0 every container moved (--dry-run: every one has a destination); 1 some did "
        "not move (they still run on HOST); 2 bad input; 3 some are in doubt: run `phaul recover`.",
    )
    e.add_argument("source", metavar="HOST", help="the host to empty")
    e.add_argument("--to", default="", metavar="HOST[,HOST]",
                   help="the destinations to use (default: every other host in the hosts file)")
    e.add_argument("--parallel", type=int, metavar="N",
                   help="migrations at once (default: as many as the link carries within one restore's time, by "
                   "what this source measured of its migrations, and at most one per destination; at least 1)")
    e.add_argument("--dry-run", action="store_true", help="print the plan (container, destination, why) and change nothing")
    e.add_argument("--method", choices=choice.REQUESTS, default="auto", help="the memory method of every migration")
    e.add_argument("--json", action="store_true", help="print only the outcome, as JSON")
    _connection_options(e)
    e.set_defaults(func=cmd_evacuate)


AGENT_DESCRIPTION = """\
Run this host's agent (mutual TLS only).

Configuration: --config FILE (TOML; the format is in phaul/agent/config.py); without
--config, /etc/phaul/agent.toml when it exists and --name is not given; else the
flags alone (--name, --listen, --cert, --key and --ca are then required). Every flag
given overrides the file. An agent run from a file also serves the local CLI on
/run/phaul/agent.sock unless the file says `socket = ""`.

Under systemd (`phaul agent install-unit`), the agent reports ready, reloading and
stopping (Type=notify), logs with journald's priorities, and on SIGHUP (`systemctl
reload phaul-agent`) re-reads peers, admins and the revocation list from its file
without dropping a connection or a migration.
"""


def _agent_parser(sub: argparse._SubParsersAction) -> None:
    """`phaul agent [flags]` and `phaul agent install-unit`."""
    a = sub.add_parser("agent", help="run this host's agent (mutual TLS only)", description=AGENT_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--config", type=Path, metavar="FILE",
                   help="the agent's TOML configuration (default: /etc/phaul/agent.toml when it exists and no --name)")
    a.add_argument("--name", help="this host's name, as in its certificate")
    a.add_argument("--listen", metavar="HOST:PORT",
                   help="TCP address to serve on: IPV4:PORT, [IPV6]:PORT or NAME:PORT; 0.0.0.0 or [::] (every "
                   "address) needs --advertise")
    a.add_argument("--advertise", metavar="HOST[:PORT]",
                   help="the address peers and the CLI are told to dial back (default: the --listen address; "
                   "the port defaults to --listen's)")
    a.add_argument("--socket", type=Path, help="also serve on this unix socket (for the local CLI)")
    a.add_argument("--state-dir", type=Path, help="containers, images, reports (default: /var/lib/phaul)")
    a.add_argument("--cert", type=Path, help="this host's certificate")
    a.add_argument("--key", type=Path, help="its private key")
    a.add_argument("--ca", type=Path, help="the CA that signs every host and client")
    a.add_argument("--peers", help="comma-separated names of the hosts this one migrates to and from")
    a.add_argument("--admins", help="comma-separated certificate names of the clients that manage this agent")
    a.add_argument("--gate-timeout", type=float, metavar="S",
                   help="longest time a dumped container is held frozen without a decision before it resumes "
                   f"(default {TIMEOUTS.gate:g})")
    a.add_argument("--link-timeout", type=float, metavar="S",
                   help=f"a data channel that moves nothing this long fails the migration (default {TIMEOUTS.link:g})")
    a.add_argument("--resolve-interval", type=float, metavar="S",
                   help="retry settling unfinished migrations this often; 0: only at start-up "
                   f"(default {TIMEOUTS.resolve_interval:g})")
    a.add_argument("--revoked", type=Path, metavar="FILE",
                   help="the revocation list of certificate serials to refuse, re-read when it changes "
                        "(default: revoked.txt beside --cert when the certificate lives beside --ca)")
    a.add_argument("--bridge", help="the bridge on the containers' segment: containers with --ip are plugged into it")
    a.add_argument("--cache-dir", type=Path,
                   help="where built root file systems are kept, one tarball per package set "
                        "(default: /var/cache/phaul/rootfs)")
    a.add_argument("--build-netns", type=Path, metavar="PATH",
                   help="network namespace (e.g. /proc/1/ns/net) the debian template's downloads run in "
                        "(default: the agent's own)")
    a.add_argument("--workload-dir", type=Path, metavar="DIR",
                   help="the project's workload programs (built with `make -C workloads`) that templates add to new "
                        "containers (default: $PHAUL_WORKLOAD_DIR, the checkout's workloads/bin, "
                        "/usr/local/lib/phaul/workloads)")
    a.set_defaults(func=cmd_agent)
    asub = a.add_subparsers(dest="agent_command", metavar="[install-unit]",
                            help="install-unit: write the agent's systemd unit; without it, the agent runs")
    iu = asub.add_parser(
        "install-unit", help="write the systemd unit that runs this agent (phaul-agent.service)",
        description="Write a systemd unit (Type=notify, restart on failure, reload by SIGHUP) whose ExecStart is "
        "this phaul with `agent --config FILE`. The agent's helpers outlive a restart (KillMode=process); "
        "phaul/agent/unit.py says why each setting is so.",
    )
    iu.add_argument("--config", dest="unit_config", type=Path, metavar="FILE",
                    help="the configuration the unit's agent reads (default: /etc/phaul/agent.toml)")
    iu.add_argument("--output", type=Path, metavar="PATH",
                    help="where to write the unit (default: /etc/systemd/system/phaul-agent.service)")
    iu.add_argument("--enable", action="store_true", help="then `systemctl daemon-reload` and `enable --now` it")
    iu.set_defaults(func=cmd_agent_install_unit)


def _host_commands(sub: argparse._SubParsersAction) -> None:
    """`phaul host add|remove` (phaul.bootstrap.hostadd)."""
    h = sub.add_parser("host", help="add a host to the fleet over SSH, or remove one")
    hsub = h.add_subparsers(dest="host_command", metavar="ACTION", required=True)
    ha = hsub.add_parser(
        "add", help="bootstrap a host over SSH: its key and certificate, agent.toml, the unit, its agent; tell the others",
        description="Bootstrap NAME over SSH: check it (`phaul doctor`), have it make its key and a certificate request "
        "(the key never leaves it), sign the request with the local CA, copy the certificate and CA back, write "
        "agent.toml and the systemd unit, start the agent, wait for it over mutual TLS, add it to the hosts file and "
        "push the new peer list to the other agents (no restart). Exit 2 when refused before anything changed.",
    )
    ha.add_argument("name", help="the new host's name (its certificate's and agent's)")
    ha.add_argument("--ssh", required=True, metavar="USER@ADDR",
                    help="where to log in (root, or a user that may run phaul as root)")
    ha.add_argument("--port", type=int, default=22, help="SSH port (default 22)")
    ha.add_argument("--identity", type=Path, metavar="FILE", help="SSH private key file (default: the SSH agent's and ~/.ssh's)")
    hk = ha.add_mutually_exclusive_group()
    hk.add_argument("--known-hosts", type=Path, metavar="FILE",
                    help="known_hosts file holding the host's key (default ~/.ssh/known_hosts)")
    hk.add_argument("--fingerprint", metavar="SHA256:...",
                    help="accept the host key with this fingerprint (`ssh-keygen -lf` of its key, read on its console)")
    ha.add_argument("--install", action="store_true",
                    help="first copy this checkout there (--remote-install-dir, /opt/phaul/src) and run its scripts/setup.sh")
    ha.add_argument("--remote-phaul", metavar="CMD",
                    help="the absolute command that runs phaul there (default /usr/local/bin/phaul; "
                    "with --install /opt/phaul/src/.venv/bin/phaul)")
    ha.add_argument("--listen", metavar="ADDR:PORT", help="the new agent's address (default: the SSH address, port 7473)")
    ha.add_argument("--dns", action="append", default=[], help="an extra DNS name for its certificate, e.g. NAME.example.org")
    ha.add_argument("--bridge", help="the bridge containers with --ip are plugged into there")
    ha.add_argument("--start", choices=("auto", "systemd", "command"), default="auto",
                    help="how to start the agent: systemd (enable --now), command (the unit's ExecStart line detached "
                    "with setsid nohup, for hosts without systemd as PID 1), auto (default: systemd when it is PID 1)")
    ha.add_argument("--remote-install-dir", default="/opt/phaul", metavar="DIR",
                    help="--install: where the checkout (DIR/src) and its .venv go there (default /opt/phaul)")
    ha.add_argument("--remote-etc", default="/etc/phaul", metavar="DIR", help="agent.toml and pki/ there (default /etc/phaul)")
    ha.add_argument("--remote-state-dir", default="/var/lib/phaul", metavar="DIR",
                    help="the agent's state there (default /var/lib/phaul)")
    ha.add_argument("--remote-unit-dir", default="/etc/systemd/system", metavar="DIR",
                    help="where the unit is written there (default /etc/systemd/system)")
    ha.add_argument("--remote-socket", default="/run/phaul/agent.sock", metavar="PATH",
                    help="the agent's local socket there (default /run/phaul/agent.sock)")
    ha.add_argument("--ca-dir", type=Path, metavar="DIR", help="the local CA (default: the directory of the hosts file's CA)")
    _connection_options(ha)
    ha.set_defaults(func=cmd_host_add)
    hr = hsub.add_parser("remove", help="revoke a host's certificate, tell the other agents, drop it from the hosts file")
    hr.add_argument("name", help="the host to remove")
    hr.add_argument("--ca-dir", type=Path, metavar="DIR", help="the local CA (default: the directory of the hosts file's CA)")
    _connection_options(hr)
    hr.set_defaults(func=cmd_host_remove)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    """--host and --hosts-file accepted after the subcommand too (the top-level parser holds the defaults)."""
    parser.add_argument("--host", default=argparse.SUPPRESS, help=HOST_HELP)
    parser.add_argument("--hosts-file", type=Path, default=argparse.SUPPRESS, help=HOSTS_FILE_HELP)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`; what follows the first `--` is the command of `ct start`, `ct exec` or `lab exec`
    (never phaul's options: `ct exec web --timeout 5 -- ls` gives --timeout to phaul)."""
    head, tail = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, None)
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):
            args = parser.parse_args(head)
            if tail is not None and not hasattr(args, "cmd"):
                parser.error(f"`phaul {args.command or ''}` takes no command after `--`")
    except SystemExit as e:
        text, code = usage.getvalue(), e.code if isinstance(e.code, int) else int(ExitCode.REFUSED)
        if code != 0 and "--json" in head:  # a script asked for JSON: the usage error as JSON too
            message = text.strip().splitlines()[-1] if text.strip() else "invalid arguments"
            text = output.usage_error(message.split(": error: ", 1)[-1], code) + "\n"
        sys.stderr.write(text)
        raise
    sys.stderr.write(usage.getvalue())
    if tail is not None:
        args.cmd = [*args.cmd, *tail]
    return args


# -- connections -------------------------------------------------------------------


def _hosts(args: argparse.Namespace) -> HostsFile:
    return read_hosts(args.hosts_file)


def _hosts_if_any(args: argparse.Namespace):  # -> HostsFile | None
    """The hosts file; None when none was named and none exists (a host with only its local agent)."""
    from phaul.hosts import HOSTS_FILE_ENV

    try:
        return _hosts(args)
    except NotFound:
        if args.hosts_file is not None or os.environ.get(HOSTS_FILE_ENV):
            raise
        return None


def _host(args: argparse.Namespace) -> str:
    """The agent --host names; without --host: $PHAUL_HOST, else the local agent (its socket,
    phaul.local_agent), else the only host of the hosts file whose agent socket is on this
    machine, else alpha (the lab's). Stored back in args.host."""
    if args.host is None:
        args.host = os.environ.get(HOST_ENV) or _default_host(args)
    return str(check_id(args.host, "host name"))


def _default_host(args: argparse.Namespace) -> str:
    from phaul.local_agent import find_local_agent

    hosts = _hosts_if_any(args)
    local_agent = find_local_agent(hosts)
    if local_agent is not None:
        return local_agent.name
    if hosts is None:
        hosts = _hosts(args)  # no local agent and no hosts file: say so
    local = sorted(h.name for h in hosts.hosts.values() if h.socket is not None and h.socket.exists())
    name = local[0] if len(local) == 1 else "alpha"
    if name not in hosts.hosts:
        raise InvalidInput(
            f"no --host given, and {'the local agents are ' + ', '.join(local) if local else 'no agent socket is here'}",
            f"name the agent: --host NAME (known: {', '.join(sorted(hosts.hosts)) or 'none'}) or ${HOST_ENV}=NAME",
        )
    return name


def _agent(args: argparse.Namespace) -> Agent:
    from phaul.local_agent import DEFAULT_PKI, find_local_agent

    hosts = _hosts_if_any(args)
    name = _host(args)
    entry = hosts.hosts.get(name) if hosts is not None else None
    if entry is None:
        local_agent = find_local_agent(hosts)
        entry = local_agent if local_agent is not None and local_agent.name == name else _hosts(args).host(name)
    if hosts is None:
        return _connect(DEFAULT_PKI, entry, "the default without a hosts file")
    return _connect(hosts.pki, entry, f"the \"pki\" section of {hosts.path}")


def _connect(files: PkiFiles, entry: HostEntry, where: str) -> Agent:
    """A connection to `entry`'s agent (its local socket when here) with the CLI's credentials
    `files` (`where` says where they were named)."""
    for what, path in (("certificate", files.cert), ("key", files.key), ("CA certificate", files.ca)):
        if not path.is_file():
            raise InvalidInput(
                f"the CLI's {what} {path} ({where}) does not exist",
                "issue the CLI's certificate with `phaul pki issue admin` on the CA's host, copy admin.crt, admin.key and "
                "ca.crt here and name them in the hosts file's \"pki\" section",
            )
    creds = Credentials("admin", files.cert, files.key, files.ca)
    target = f"unix:{entry.socket}" if entry.socket and entry.socket.exists() else entry.address
    try:
        return connect(target, entry.name, creds)
    except OSError as e:
        raise InvalidInput(f"cannot read the CLI's credentials: {e}", "check the files' owner and mode") from e


def _command(rest: list[str], what: str) -> list[str]:
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest and what:
        raise InvalidInput(f"no command given to {what}", f"write it after `--`, e.g. phaul {what} ID -- echo hello")
    return rest


# -- agent, pki ------------------------------------------------------------------


def cmd_agent(args: argparse.Namespace, hook: StepHook = NO_HOOK) -> int:
    """Run the agent; `hook` is called at its migrations' step boundaries (a test agent plugs one in)."""
    from phaul.agent.server import serve

    serve(agent_config(args), hook, reread=lambda: agent_config(args))  # SIGHUP reads the file (and flags) again
    return ExitCode.OK


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """The agent's configuration: --config FILE, else /etc/phaul/agent.toml when it exists and
    --name is not given, else the flags alone; the flags given override the file."""
    from phaul.agent.config import DEFAULT_CONFIG, config_from, load_config

    overrides = _agent_overrides(args)
    path = args.config or (DEFAULT_CONFIG if args.name is None and DEFAULT_CONFIG.exists() else None)
    config = load_config(path, overrides) if path is not None else config_from(overrides, "the command line")
    for what, file in (("certificate", config.creds.cert), ("key", config.creds.key), ("CA certificate", config.creds.ca)):
        if not file.is_file():
            raise InvalidInput(f"the agent's {what} {file} does not exist",
                               "make certificates with `phaul pki init` and `phaul pki issue NAME`")
    return config


def _agent_overrides(args: argparse.Namespace) -> dict:
    """The `phaul agent` flags given, in the configuration file's shape (phaul.agent.config)."""
    def names(text: str) -> list[str]:
        return [check_id(n.strip(), "certificate name") for n in text.split(",") if n.strip()]

    top = {
        "name": args.name, "listen": args.listen, "advertise": args.advertise, "socket": args.socket, "state_dir": args.state_dir,
        "cache_dir": args.cache_dir, "bridge": args.bridge, "build_netns": args.build_netns,
        "workload_dir": args.workload_dir, "revoked": args.revoked,
        "peers": names(args.peers) if args.peers is not None else None,
        "admins": names(args.admins) if args.admins is not None else None,
    }
    tables = {
        "tls": {"cert": args.cert, "key": args.key, "ca": args.ca},
        "timeouts": {"gate": args.gate_timeout, "link": args.link_timeout, "resolve_interval": args.resolve_interval},
    }
    out: dict = {k: v for k, v in top.items() if v is not None}
    out.update({t: {k: v for k, v in values.items() if v is not None} for t, values in tables.items()})
    return out


def cmd_agent_install_unit(args: argparse.Namespace) -> int:
    from phaul.agent.config import DEFAULT_CONFIG, load_config
    from phaul.agent.unit import DEFAULT_UNIT_PATH, install_unit, phaul_command, render_unit

    config = (args.unit_config or DEFAULT_CONFIG).absolute()
    load_config(config)  # a unit for a file the agent would refuse would only fail to start
    output_path = args.output or DEFAULT_UNIT_PATH
    install_unit(render_unit(phaul_command(), config), output_path, enable=args.enable)
    print(f"{output_path}" + (" (enabled and started)" if args.enable else ""))
    return ExitCode.OK


def cmd_pki_init(args: argparse.Namespace) -> int:
    from phaul.channels import pki

    print(pki.init_ca(args.dir, force=args.force))
    return ExitCode.OK


def cmd_pki_issue(args: argparse.Namespace) -> int:
    from phaul.channels import pki

    hosts: dict[str, list[str]] = {}
    if args.hosts_file is not None:
        hosts = {h.name: [h.ip] for h in _hosts(args).hosts.values()}
    cert, key = pki.issue(args.dir, args.name, args.ip, args.dns, hosts=hosts, force=args.force)
    print(f"{cert}\n{key}")
    return ExitCode.OK


def cmd_pki_csr(args: argparse.Namespace) -> int:
    from phaul.channels import pki

    csr, key = pki.make_csr(args.dir, args.name, args.ip, args.dns)
    print(f"{csr}\n{key}")
    return ExitCode.OK


def cmd_pki_sign(args: argparse.Namespace) -> int:
    from phaul.channels import pki
    from phaul.linux.fsutil import write_atomic

    try:
        pem = args.csr.read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read the request {args.csr}: {e.strerror}", "give the NAME.csr `phaul pki csr` wrote") from e
    hosts: dict[str, list[str]] = {}
    if args.hosts_file is not None:
        hosts = {h.name: [h.ip] for h in _hosts(args).hosts.values()}
    admins = [a.strip() for a in args.admins.split(",") if a.strip()]
    name, cert = pki.sign_csr(args.dir, pem, name=args.name, hosts=hosts, admins=admins)
    if args.out is not None:
        write_atomic(args.out, cert, 0o644)
    print(args.out or args.dir / f"{name}.crt")
    return ExitCode.OK


def cmd_pki_list(args: argparse.Namespace) -> int:
    from phaul.channels import pki

    rows = pki.listing(args.dir)
    if args.json:
        print(output.dumps(output.certificates(rows)))
        return ExitCode.OK
    print(f"{'SERIAL':<42} {'NAME':<16} {'STATUS':<9} {'NOT AFTER':<17} {'DAYS':>5}  NAMES")
    for r in rows:
        print(
            f"{r['serial']:<42} {r['name']:<16} {r['status']:<9} {r['not_after'][:16].replace('T', ' '):<17} "
            f"{r['days_left']:>5}  {','.join([*r['dns'], *r['ips']])}"
        )
    return ExitCode.OK


def cmd_pki_revoke(args: argparse.Namespace) -> int:
    from phaul.channels import pki

    added = pki.revoke(args.dir, args.what)
    print("\n".join(added) if added else f"{args.what} is already revoked")
    return ExitCode.OK


# -- containers ----------------------------------------------------------------------


def cmd_ct_create(args: argparse.Namespace) -> int:
    packages = [p for text in args.packages for p in text.split(",") if p.strip()]
    sources = [o for o, v in (("--template", args.template), ("--rootfs", args.rootfs), ("--image", args.image)) if v]
    if len(sources) > 1:
        raise InvalidInput(f"{' and '.join(sources)} both say where the root comes from", "give one of them")
    if packages and args.template != "debian":
        raise InvalidInput("--packages needs --template debian", "add --template debian")
    if args.image_ref and not args.image:
        raise InvalidInput("--image-ref needs --image", "add --image PATH")
    template = args.template or ("rootfs" if args.rootfs else "image" if args.image else "busybox")
    config = ContainerConfig(
        id=check_id(args.id), template=template, packages=packages, init=args.init or "",
        rootfs=os.path.abspath(args.rootfs) if args.rootfs else "", image=os.path.abspath(args.image) if args.image else "",
        image_ref=args.image_ref,
        memory=parse_size(args.memory, "memory limit") if args.memory else None,
        cpus=args.cpus, pids=args.pids, ip=args.ip, gateway=args.gateway,
        cap_add=[c for text in args.cap_add for c in text.split(",") if c.strip()], seccomp=args.seccomp,
    )
    with _agent(args) as agent:
        # a debian root is built on first use of a package set: minutes
        info = agent.call("CreateContainer", messages.config_to_proto(config), timeout=CREATE_TIMEOUT)
    print(f"{info.id} created on {args.host}")
    return ExitCode.OK


def cmd_ct_start(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        info = agent.call("StartContainer", pb.StartRequest(id=check_id(args.id), args=_command(args.cmd, "")))
        if info.state == "stopped":  # its command exited at once: say how, with what it wrote
            out = agent.call("ContainerLogs", pb.LogsRequest(id=info.id, tail=START_LOG_LINES)).data
            status = info.exit_status or "exit status unknown"
            print(f"{info.id} exited at once on {args.host} ({status}); its output ends:", file=sys.stderr)
            sys.stderr.write(out.decode(errors="replace") or "(no output)\n")
            return ExitCode.OK if status == "exit 0" else ExitCode.FAILED
    print(f"{info.id} {info.state} on {args.host}, init PID {info.pid}")
    return ExitCode.OK


def cmd_ct_logs(args: argparse.Namespace) -> int:
    ct_id = check_id(args.id)
    if args.tail < 0:
        raise InvalidInput(f"invalid --tail {args.tail}", "give a number of lines")
    with _agent(args) as agent:
        if not args.follow:
            r = agent.call("ContainerLogs", pb.LogsRequest(id=ct_id, tail=args.tail))
            sys.stdout.buffer.write(r.data)
            return ExitCode.OK
        # Following: the tail comes from the same positioned reads as what follows (a separate
        # tail request would lose what is written between it and the first follow request).
        now = agent.call("ContainerLogs", pb.LogsRequest(id=ct_id, follow=True))  # the current file
        r = agent.call("ContainerLogs", pb.LogsRequest(id=ct_id, follow=True, file_id=now.file_id, offset=0))
        seen = r.data
        while r.data:
            r = agent.call("ContainerLogs", pb.LogsRequest(id=ct_id, follow=True, file_id=r.file_id, offset=r.offset))
            seen += r.data
        lines = seen.splitlines(keepends=True)
        sys.stdout.buffer.write(b"".join(lines[-args.tail:] if args.tail else lines))
        sys.stdout.flush()
        try:
            while True:
                r = agent.call("ContainerLogs", pb.LogsRequest(id=ct_id, follow=True, file_id=r.file_id, offset=r.offset))
                sys.stdout.buffer.write(r.data)
                sys.stdout.flush()
                if not r.data:
                    time.sleep(LOG_POLL)
        except KeyboardInterrupt:
            return ExitCode.OK


def cmd_ct_exec(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        r = agent.call(
            "ExecContainer", pb.ExecRequest(id=check_id(args.id), args=_command(args.cmd, "ct exec"), timeout=args.timeout),
            timeout=args.timeout + 10,
        )
    sys.stdout.buffer.write(r.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(r.stderr)
    return int(r.returncode)


def cmd_ct_list(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        infos = [messages.info_from_proto(i) for i in agent.call("ListContainers", pb.Empty()).containers]
    if args.json:
        print(output.dumps(output.containers(infos)))
        return ExitCode.OK
    print(f"{'ID':<20} {'STATE':<9} {'PID':>7} {'MEMORY':>10} {'LIMIT':>10}  IP")
    for i in infos:
        print(f"{i.id:<20} {i.state:<9} {i.pid or '-':>7} {_mib(i.memory_used):>10} {_mib(i.memory_limit):>10}  {i.ip or '-'}")
    return ExitCode.OK


def cmd_ct_stop(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        agent.call("StopContainer", pb.ContainerRef(id=check_id(args.id)))
    print(f"{args.id} stopped on {args.host}")
    return ExitCode.OK


def cmd_ct_destroy(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        agent.call("DestroyContainer", pb.ContainerRef(id=check_id(args.id)))
    print(f"{args.id} destroyed on {args.host}")
    return ExitCode.OK


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


# -- migrate, doctor ------------------------------------------------------------------


def _dest_host(args: argparse.Namespace) -> HostEntry:
    """The destination HOST of `migrate` and `copy`: in the hosts file, not the source."""
    hosts = _hosts(args)
    _host(args)
    dest = hosts.host(check_id(args.dest, "destination host name"))
    if dest.name == args.host:
        raise InvalidInput(f"the destination {dest.name} is the source host (--host {args.host})",
                           "name another host as the destination, or pick the source with --host")
    return dest


def cmd_migrate(args: argparse.Namespace) -> int:
    dest = _dest_host(args)
    if args.offline and (args.method or args.precopy):
        raise InvalidInput("--offline moves no memory: it takes no --method or --precopy", "give only one of them")
    if args.max_rounds < 1:
        raise InvalidInput(
            f"--max-rounds {args.max_rounds} is below 1", "use --max-rounds 1 or more, or --method stop-and-copy for no rounds"
        )
    method = args.method or PRECOPY_ALIASES.get(args.precopy, "auto")
    if args.method and args.precopy and PRECOPY_ALIASES[args.precopy] != args.method:
        raise InvalidInput(
            f"--method {args.method} and --precopy={args.precopy} disagree", "give only --method"
        )
    if args.max_downtime < 1:
        raise InvalidInput(
            f"--max-downtime {args.max_downtime} ms is below 1 ms", "give the longest acceptable freeze in ms, e.g. 300"
        )
    request = pb.MigrateRequest(
        ct_id=check_id(args.id), dest_name=dest.name, dest_address=dest.address, tcp_close=args.tcp == "close",
        method=method, max_rounds=args.max_rounds, max_downtime_ms=args.max_downtime,
        bandwidth=parse_size(args.bandwidth, "bandwidth") if args.bandwidth else 0,
        force=list(check_force(args.force)), offline=args.offline,
    )
    return _run_migrate(args, request)


def cmd_copy(args: argparse.Namespace) -> int:
    dest = _dest_host(args)
    ct_id = check_id(args.id)
    copy_as = check_id(args.copy_as or f"{ct_id}-copy", "copy ID (--as)")
    if copy_as == ct_id:
        raise InvalidInput(f"the copy must have an ID of its own, not {ct_id}", "give another one with --as NEWID")
    request = pb.MigrateRequest(
        ct_id=ct_id, dest_name=dest.name, dest_address=dest.address, force=list(check_force(args.force)),
        offline=True, copy_as=copy_as, copy_ip=args.copy_ip,
    )
    return _run_migrate(args, request)


def _run_migrate(args: argparse.Namespace, request: pb.MigrateRequest) -> int:
    """Run `request` on the --host agent (`migrate`, `copy`); print the report, return the exit status."""
    show_progress = not args.json and sys.stderr.isatty()
    with _agent(args) as agent:
        report = migrate_call.run(agent, request, args.host, _print_progress if show_progress else None,
                                  None if args.json else _print_started,  # --json: the report carries the ID
                                  ctrl_c_aborts=True)
    print(output.dumps(output.report(report)) if args.json else report.to_table())
    return migrate_call.exit_code(report)


def _print_progress(p: pb.Progress) -> None:
    print(migrate_call.progress_line(p), file=sys.stderr, flush=True)


def _print_started(migration_id: str) -> None:
    print(f"migration {migration_id}", flush=True)


def _print_ct_progress(ct: str, p: pb.Progress) -> None:
    print(f"{ct}: {migrate_call.progress_line(p).strip()}", file=sys.stderr, flush=True)


def cmd_doctor(args: argparse.Namespace) -> int:
    from phaul.linux import doctor

    checks = doctor.run_checks()
    if args.json:
        print(output.dumps(output.doctor(checks)))
    else:
        print(doctor.report_table(checks))
        print(doctor.summary(checks))
    return ExitCode.FAILED if any(c.status == CheckState.FAILURE for c in checks) else ExitCode.OK


def cmd_host_add(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import PurePosixPath

    from phaul.bootstrap.hostadd import DEFAULT_PHAUL, AddPlan, RemotePaths, add_host, installed_phaul
    from phaul.bootstrap.ssh import SshTarget

    target = SshTarget.parse(args.ssh, port=args.port, identity=args.identity, known_hosts=args.known_hosts,
                             fingerprint=args.fingerprint)
    hosts = _hosts_if_any(args) or _new_hosts_file(args.ca_dir)
    phaul_cmd = args.remote_phaul or (installed_phaul(args.remote_install_dir) if args.install else DEFAULT_PHAUL)
    remote = RemotePaths(
        phaul=tuple(shlex.split(phaul_cmd)), etc=PurePosixPath(args.remote_etc), state_dir=PurePosixPath(args.remote_state_dir),
        unit_dir=PurePosixPath(args.remote_unit_dir), socket=PurePosixPath(args.remote_socket),
        install_dir=PurePosixPath(args.remote_install_dir),
    )
    plan = AddPlan(
        name=args.name, ssh=target, hosts=hosts, ca_dir=args.ca_dir or hosts.pki.ca.parent, remote=remote,
        listen=args.listen, bridge=args.bridge, install=args.install, start=args.start, dns=tuple(args.dns),
    )
    result = add_host(plan)
    return ExitCode.OK if all(p.ok for p in result.pushed) else ExitCode.FAILED


def _new_hosts_file(ca_dir: Path | None) -> HostsFile:
    """The first `host add` on an admin machine without a hosts file starts /etc/phaul/hosts.json,
    naming the CA's directory's ca.crt and the CLI's admin certificate (`phaul pki issue admin`)."""
    from phaul.channels import pki
    from phaul.hosts import ADMIN, ETC_HOSTS_FILE

    d = ca_dir or pki.DEFAULT_PKI_DIR
    files = PkiFiles(ca=d / "ca.crt", cert=d / f"{ADMIN}.crt", key=d / f"{ADMIN}.key")
    for path in (files.ca, files.cert, files.key):
        if not path.is_file():
            raise NotFound(f"no hosts file, and {path} does not exist",
                           "make the CA and the CLI's certificate first: `phaul pki init` and `phaul pki issue admin`")
    ETC_HOSTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    return HostsFile(path=ETC_HOSTS_FILE, subnet=None, pki=files, hosts={})


def cmd_host_remove(args: argparse.Namespace) -> int:
    from phaul.bootstrap.hostadd import remove_host

    hosts = _hosts(args)
    pushed = remove_host(hosts, args.ca_dir or hosts.pki.ca.parent, args.name)
    return ExitCode.OK if all(p.ok for p in pushed) else ExitCode.FAILED


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError as e:
        raise ToolFailed(f"shell completion needs shtab ({e})", "pip install shtab (a dependency of phaul's package)") from e
    print(shtab.complete(build_parser(), shell=args.shell))
    return ExitCode.OK


# -- migrations, recover ------------------------------------------------------------------


def cmd_migrations(args: argparse.Namespace) -> int:
    if args.follow is not None:
        return cmd_follow(args)
    with _agent(args) as agent:
        records = agent.call("ListMigrations", pb.Empty()).migrations
    doc = output.migrations(records)
    rows = doc["migrations"]
    if args.json:
        print(output.dumps(doc))
        return ExitCode.OK
    print(f"{'MIGRATION':<14} {'ROLE':<12} {'CT':<16} {'PEER':<10} {'STATE':<12} {'STEP':<17} STARTED")
    for r in rows:
        print(
            f"{r['migration_id']:<14} {r['role']:<12} {r['ct']:<16} {r['peer']:<10} {r['state']:<12} {r['step']:<17} "
            f"{r['started_at']}"
        )
    return ExitCode.OK


def cmd_follow(args: argparse.Namespace) -> int:
    """`migrations --follow [ID]`: one line (or JSON line) per event until the migration's end."""
    mid = check_id(args.follow, "migration ID") if args.follow else ""
    if mid:
        _find_source(args, mid)
    def show(event: pb.FollowEvent) -> None:
        print(output.dumps_line(output.follow_event(event)) if args.json else follow_line(event), flush=True)

    with _agent(args) as agent:
        try:
            report = follow(agent, mid, show)
        except KeyboardInterrupt:
            return ExitCode.OK  # stops following; the migration goes on
    if report is None:
        raise InDoubt(f"the agent on {args.host} stopped the progress of {mid or 'its migration'} before its end",
                      migrate_call.in_doubt_hint(args.host, mid))
    return migrate_call.exit_code(report)


def follow_line(e: pb.FollowEvent) -> str:
    """One followed event as a terminal line."""
    head = f"{e.migration_id} {e.ct} {e.source}->{e.destination}"
    if e.HasField("report"):
        r = e.report
        why = f" (aborted by {r.aborted_by})" if r.aborted_by else (f": {r.error}" if r.error else "")
        return f"{head}: {r.result.upper()}{why}"
    return f"{head} {migrate_call.progress_line(e.progress).strip()}  [{e.total_bytes / (1 << 20):.1f} MiB sent in all]"


def cmd_abort(args: argparse.Namespace) -> int:
    """`phaul abort MIGRATION-ID`: ask its source agent, then wait for the outcome."""
    mid = check_id(args.migration_id, "migration ID")
    _find_source(args, mid)
    with _agent(args) as agent:
        asked = agent.call("AbortMigration", pb.AbortRequest(migration_id=mid), timeout=30)
        if not args.json:
            print(f"aborting migration {mid} ({asked.ct} to {asked.destination}) at step {asked.step}", file=sys.stderr)
        report = None if args.no_wait else follow(agent, mid)
    if report is None and not args.no_wait:
        raise InDoubt(f"the progress of migration {mid} stopped before its end",
                      migrate_call.in_doubt_hint(args.host, mid))
    if args.json:
        print(output.dumps(output.abort(asked, report.result if report is not None else "aborting", report)))
    elif report is not None:
        print(report.to_table())
    if report is None:
        return ExitCode.OK  # --no-wait: the abort is taken
    return {Result.ROLLED_BACK: ExitCode.OK, Result.IN_DOUBT: ExitCode.IN_DOUBT}.get(report.result, ExitCode.FAILED)


def _find_source(args: argparse.Namespace, migration_id: str) -> None:
    """Without --host (or $PHAUL_HOST): the host whose journal has the migration as its source."""
    if args.host is not None or os.environ.get(HOST_ENV):
        return
    hosts = _hosts(args).hosts
    agents: dict[str, Agent] = {}
    try:
        for name in hosts:
            args.host = name
            agents[name] = _agent(args)
        args.host = source_of(agents, migration_id)
    finally:
        for a in agents.values():
            a.close()


def cmd_recover(args: argparse.Namespace) -> int:
    mid = check_id(args.migration_id, "migration ID") if args.migration_id else ""
    with _agent(args) as agent:
        outcomes = agent.call("Recover", pb.RecoverRequest(migration_id=mid), timeout=600).outcomes
    doc = output.outcomes(outcomes)
    rows = doc["outcomes"]
    if args.json:
        print(output.dumps(doc))
    elif not rows:
        print(f"nothing to settle on {args.host}")
    for r in [] if args.json else rows:
        print(f"{r['migration_id']} ({r['role']}): {r['result']}: {r['message']}")
    return ExitCode.IN_DOUBT if any(r["result"] in ("in_doubt", "in_progress") for r in rows) else (
        ExitCode.FAILED if any(r["result"] == "failed" for r in rows) else ExitCode.OK
    )


def cmd_evacuate(args: argparse.Namespace) -> int:
    from phaul.fleet.evacuate import EvacuationOptions, Evacuator
    from phaul.fleet.inventory import HostsFileInventory

    hosts = _hosts(args)
    if args.parallel is not None and args.parallel < 1:
        raise InvalidInput(f"--parallel {args.parallel} is below 1", "give 1 or more migrations at once")
    opts = EvacuationOptions(
        source=check_id(args.source, "host name"),
        to=tuple(check_id(n.strip(), "host name") for n in args.to.split(",") if n.strip()),
        parallel=args.parallel, dry_run=args.dry_run, request=pb.MigrateRequest(
            method=args.method, max_rounds=MIGRATION.max_rounds, max_downtime_ms=MIGRATION.max_downtime_ms
        ),
    )
    where = f"the \"pki\" section of {hosts.path}"
    evacuator = Evacuator(HostsFileInventory(hosts), lambda entry: _connect(hosts.pki, entry, where),
                          lambda line: print(line, file=sys.stderr, flush=True))
    evacuation = evacuator.plan(opts)
    if not args.dry_run:
        tty = sys.stderr.isatty() and not args.json
        evacuator.run(evacuation, opts, _print_ct_progress if tty else None)
    print(output.dumps(output.evacuation(evacuation)) if args.json else evacuation.to_table())
    return evacuation.exit_code()


def cmd_check(args: argparse.Namespace) -> int:
    hosts = _hosts(args)
    dest = hosts.host(check_id(args.dest, "destination host name"))
    request = pb.CheckRequest(ct_id=check_id(args.id), dest_name=dest.name, dest_address=dest.address)
    with _agent(args) as agent:
        checks = agent.call("Check", request, timeout=120).checks
    doc = output.preflight(args.id, args.host, dest.name, checks)
    rows = doc["checks"]
    if args.json:
        print(output.dumps(doc))
    else:
        print(f"{'CHECK':<10} {'HOST':<10} {'STATUS':<8} REASON")
        for r in rows:
            print(f"{r['name']:<10} {r['host']:<10} {r['status']:<8} {r['message']}")
        failed = sorted({r["name"] for r in rows if r["status"] == "failure"})
        print(f"{args.id} can move to {dest.name}" if not failed else
              f"{args.id} cannot move to {dest.name}: {', '.join(failed)} failed (`migrate --force CHECK` overrides one)")
    return ExitCode.FAILED if any(r["status"] == "failure" for r in rows) else ExitCode.OK
