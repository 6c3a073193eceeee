"""The systemd unit that runs the agent as a service (`phaul agent install-unit`).

`render_unit` gives the unit's text; `install_unit` writes it and, if asked,
enables and starts it with systemctl. The agent tells systemd when it serves,
reloads and stops (phaul.agent.notify, Type=notify); `systemctl reload`
sends SIGHUP, which re-reads peers, admins and the revocation list from the
configuration file without dropping a connection or a migration.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from phaul.errors import ToolFailed
from phaul.linux.fsutil import write_atomic

log = logging.getLogger(__name__)

UNIT_NAME = "phaul-agent.service"
DEFAULT_UNIT_PATH = Path("/etc/systemd/system") / UNIT_NAME

# Why the unit is as it is:
# - KillMode=process: on stop or restart systemd signals the agent only. The agent's
#   helpers must outlive it: each container's console keeper (phaul.containers.console)
#   is the subreaper of the container's init and holds its stdout/stderr pipe (killing
#   it ends the container's output and leaves it writing into a closed pipe), and a
#   post-copy keeper, CRIU's page server hub and the data channels run until their
#   migration ends; a restarted agent finds them through its journal
#   (phaul.migration.recovery). The containers' own tasks live in their own cgroups
#   (/phaul-NAME/ID, runc's cgroupsPath), outside the service's, so systemd never
#   touches them whatever KillMode says.
# - No NoNewPrivileges, ProtectSystem, ProtectHome, PrivateTmp, PrivateDevices,
#   ProtectKernel*, RestrictNamespaces, SystemCallFilter or CapabilityBoundingSet:
#   CRIU needs full root (every capability, ptrace of any task, new namespaces of
#   every kind, mounts, /proc/sys and /sys/fs/cgroup writable, the host's /dev and
#   /tmp as the containers see them), and runc builds the containers from that
#   root. Each of those settings breaks a dump or a restore.
# - No UMask= either: the agent runs with the umask it has everywhere else (tests
#   included), since containers' non-root tasks read some of what it writes.
# - What is kept: no core dumps (they could hold keys and container memory), a
#   bounded time to stop, and restart on failure with a rate limit.
_UNIT = """\
# Written by `phaul agent install-unit`; the comments in phaul/agent/unit.py say why it is so.
[Unit]
Description=phaul agent: live migration of containers (CRIU, runc)
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
# the agent's helpers (console keepers: the containers' subreapers, post-copy
# keepers, data channels) outlive a stop or restart: only the agent is signalled
KillMode=process
# start-up settles the migrations the journal left unfinished (asking their peers) before READY=1
TimeoutStartSec=600
TimeoutStopSec=30
LimitCORE=0
LimitNOFILE=65536
RuntimeDirectory=phaul
RuntimeDirectoryPreserve=yes
# CRIU needs full root: no NoNewPrivileges, ProtectSystem, PrivateTmp, SystemCallFilter...

[Install]
WantedBy=multi-user.target
"""


def phaul_command() -> list[str]:
    """The absolute command of the running phaul: its installed script (a venv's or the
    system's), or this Python with `-m phaul` when run as a module. Symbolic links are
    kept: a venv's python is a link, and resolving it would leave the venv."""
    script = Path(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "phaul" and script.is_file():
        return [str(script)]
    return [os.path.abspath(sys.executable), "-m", "phaul"]


def agent_argv(command: list[str], config: Path) -> list[str]:
    """The unit's ExecStart as an argument list: `command` (absolute: phaul_command()) runs
    `agent --config config` (what to run where there is no systemd, e.g. in the lab)."""
    if not command or not Path(command[0]).is_absolute():
        raise ValueError(f"the unit's command must start with an absolute path, not {command!r}")
    return [*command, "agent", "--config", str(Path(config).absolute())]


def render_unit(command: list[str], config: Path) -> str:
    """The unit's text, whose ExecStart is agent_argv(command, config)."""
    return _UNIT.format(exec_start=" ".join(_systemd_quote(a) for a in agent_argv(command, config)))


def _systemd_quote(arg: str) -> str:
    """An ExecStart= word: systemd splits on white space, honours quotes and C escapes
    (in quotes too); `$` and `%` are its own expansions and are doubled."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if not any(c in arg for c in " \t\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def install_unit(text: str, path: Path = DEFAULT_UNIT_PATH, *, enable: bool = False) -> None:
    """Write the unit to `path` (mode 0644); with `enable`, reload systemd and enable and start it."""
    write_atomic(Path(path), text, 0o644)
    log.info("wrote %s", path)
    if enable:
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", Path(path).name]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise ToolFailed(
                    f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}",
                    "is systemd running here (PID 1)? Start the agent by hand with the unit's ExecStart line, "
                    "or fix the unit and run `systemctl enable --now " + Path(path).name + "`",
                )
