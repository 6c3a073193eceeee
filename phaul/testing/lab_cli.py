"""`phaul lab ...`: the lab's subcommands, added to the CLI through the
`phaul.commands` entry point (pyproject.toml), so the CLI never imports the lab."""

from __future__ import annotations

import argparse
from typing import Any

from phaul import output
from phaul.cli import _command
from phaul.errors import ExitCode


def add_commands(sub: Any) -> None:
    """Add `lab up|status|exec|down` to the CLI's subparsers `sub`."""
    lab_p = sub.add_parser("lab", help="the lab in network namespaces: alpha, beta (and gamma on request), a switch and a client")
    lsub = lab_p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    lu = lsub.add_parser("up", help="build the lab and start its agents (harmless if already up)")
    lu.add_argument("--subnet", help="IPv4 CIDR used inside the lab (default 10.213.0.0/24)")
    lu.add_argument("--with", dest="extra", action="append", default=[], choices=["gamma"],
                    help="also build this extra host as a full host (certificate, agent, hosts file); repeatable")
    lu.add_argument("--bare", action="append", default=[], choices=["gamma"],
                    help="also build this extra host bare: namespace, bridge and address only, for `phaul host add`")
    lu.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=None,
                    help="give the lab nodes fd00:7068::/64 addresses too and run the agents on them only "
                    "(--no-ipv6: the IPv4 lab; default: as the running lab is, else IPv4)")
    lu.set_defaults(func=cmd_lab_up)
    ls = lsub.add_parser("status", help="show the lab")
    ls.add_argument("--json", action="store_true", help="print the lab's state as JSON")
    ls.set_defaults(func=cmd_lab_status)
    le = lsub.add_parser("exec", help="run a command in a lab namespace (alpha, beta, gamma, client, sw)")
    le.add_argument("name", help="the namespace: alpha, beta, gamma, client or sw")
    le.add_argument("cmd", nargs="*", metavar="-- CMD ARGS", help="the command and its arguments, after `--`")
    le.set_defaults(func=cmd_lab_exec)
    ld = lsub.add_parser("down", help="remove everything the lab made")
    ld.set_defaults(func=cmd_lab_down)


def cmd_lab_up(args: argparse.Namespace) -> int:
    from phaul.testing import lab  # only when a lab command runs: it loads the PKI

    print(lab.up(args.subnet, hosts=(*lab.HOSTS, *args.extra), bare=tuple(args.bare), ipv6=args.ipv6).to_text())
    return ExitCode.OK


def cmd_lab_status(args: argparse.Namespace) -> int:
    from phaul.testing import lab  # only when a lab command runs: it loads the PKI

    st = lab.status()
    print(output.dumps(output.lab_status(st.to_dict())) if args.json else st.to_text())
    return ExitCode.OK if st.healthy else ExitCode.FAILED


def cmd_lab_exec(args: argparse.Namespace) -> int:
    from phaul.testing import lab  # only when a lab command runs: it loads the PKI

    return lab.exec_in(args.name, _command(args.cmd, "lab exec"))


def cmd_lab_down(args: argparse.Namespace) -> int:
    from phaul.testing import lab  # only when a lab command runs: it loads the PKI

    for line in lab.down():
        print(line)
    return ExitCode.OK
