"""`phaul host add` and `phaul host remove`: a bare host made a peer over SSH, and taken out again.

`add_host(plan)` runs, in order, and stops at the first failure (exit 2 when nothing
was changed on any host yet):

1. log in over SSH with the host key verified (phaul.bootstrap.ssh);
2. with `install`, copy this checkout there (`git archive`) and run its own setup
   (scripts/setup.sh); phaul runs there as `plan.remote.phaul`, an explicit command;
3. `phaul doctor --json` there: a failed check refuses the host;
4. `phaul pki csr NAME` there: the host makes its own key (it never leaves the host)
   and a request, which is read back and signed here with the local CA
   (`pki.sign_csr`: the host gets its own name only);
5. the certificate, the CA certificate and the CA's revocation list go there by SFTP
   with explicit modes, then agent.toml (`render_config`) and the systemd unit
   (`render_unit`);
6. the agent is started: `systemctl enable --now` when systemd is PID 1 there;
   else (a container or a network namespace: detected, and said) the unit's
   ExecStart command line is started detached with setsid and nohup;
7. the agent must answer over mutual TLS with its new certificate;
8. the host joins the hosts file, and every other agent gets the new peer list
   (the SetPeers RPC: kept across restarts, applied live, no restart).

`remove_host` revokes the host's certificates with the local CA, pushes the
revocation list and the peer list without it to the remaining agents, and drops
it from the hosts file.
"""

from __future__ import annotations

import io
import json
import logging
import shlex
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from phaul.agent.config import render_config
from phaul.agent.unit import UNIT_NAME, agent_argv, render_unit
from phaul.bootstrap.ssh import Session, SshTarget
from phaul.channels import pki
from phaul.channels.client import connect
from phaul.channels.revocation import REVOKED_FILE, REVOKED_HEADER, format_serial, read_serials
from phaul.channels.transport import Credentials
from phaul.config import AgentConfig
from phaul.endpoint import parse_endpoint
from phaul.errors import Conflict, InvalidInput, PhaulError, Refused, ToolFailed
from phaul.hosts import ADMIN, HostEntry, HostsFile
from phaul.linux.fsutil import write_atomic
from phaul.rpc import phaul_pb2 as pb
from phaul.validate import check_id

log = logging.getLogger(__name__)

AGENT_PORT = 7473
AGENT_WAIT = 60.0  # s: how long the new agent has to answer over mutual TLS
INSTALL_DIR = "/opt/phaul"  # where --install puts the checkout there (src/, its .venv)
DEFAULT_PHAUL = "/usr/local/bin/phaul"  # phaul there, unless told


def installed_phaul(install_dir: str) -> str:
    """phaul there after --install into `install_dir`."""
    return f"{install_dir}/src/.venv/bin/phaul"


@dataclass(frozen=True)
class RemotePaths:
    """Where things go on the new host (the defaults are a real host's; tests point them
    into a temporary directory, since the lab's hosts share one file system)."""

    phaul: tuple[str, ...] = (DEFAULT_PHAUL,)  # the command that runs phaul there, absolute
    etc: PurePosixPath = PurePosixPath("/etc/phaul")  # agent.toml and pki/
    state_dir: PurePosixPath = PurePosixPath("/var/lib/phaul")
    unit_dir: PurePosixPath = PurePosixPath("/etc/systemd/system")
    socket: PurePosixPath = PurePosixPath("/run/phaul/agent.sock")
    install_dir: PurePosixPath = PurePosixPath(INSTALL_DIR)  # --install: the checkout and its .venv

    @property
    def pki(self) -> PurePosixPath:
        return self.etc / "pki"

    @property
    def config(self) -> PurePosixPath:
        return self.etc / "agent.toml"

    @property
    def unit(self) -> PurePosixPath:
        return self.unit_dir / UNIT_NAME

    @property
    def log(self) -> PurePosixPath:
        return self.state_dir / "agent.log"


class StartMode:
    """How the agent is started there: `auto` detects systemd as PID 1."""

    AUTO, SYSTEMD, COMMAND = "auto", "systemd", "command"
    ALL = (AUTO, SYSTEMD, COMMAND)


@dataclass(frozen=True)
class AddPlan:
    """Everything `phaul host add` needs: one object, passed in."""

    name: str
    ssh: SshTarget
    hosts: HostsFile  # the local hosts file the host joins
    ca_dir: Path  # the local CA (ca.crt, ca.key)
    remote: RemotePaths = field(default_factory=RemotePaths)
    listen: str | None = None  # ADDR:PORT of the new agent (default: the SSH address, port 7473)
    bridge: str | None = None
    install: bool = False
    start: str = StartMode.AUTO
    dns: tuple[str, ...] = ()

    @property
    def agent_address(self) -> str:
        if self.listen:
            return self.listen
        addr = self.ssh.address  # bare: an IPv6 address without brackets (SshTarget.parse)
        return str(parse_endpoint(f"[{addr}]" if ":" in addr else addr, "--ssh address", default_port=AGENT_PORT))

    @property
    def agent_ip(self) -> str:
        return parse_endpoint(self.agent_address, "the agent's address").host


@dataclass
class Pushed:
    """One existing agent told the new peer list: what it answered, or why not."""

    host: str
    ok: bool
    detail: str


@dataclass
class AddResult:
    name: str
    address: str
    serial: str
    started: str  # how the agent was started
    seconds: float
    pushed: list[Pushed]


Say = Callable[[str], None]


def add_host(plan: AddPlan, say: Say = print) -> AddResult:
    """Bootstrap `plan.name` over SSH (the module's docstring lists the steps)."""
    t0 = time.monotonic()
    name = check_id(plan.name, "host name")
    if name in plan.hosts.hosts:
        raise Conflict(f"{name} is already in {plan.hosts.path}", f"run `phaul host remove {name}` first, or choose another name")
    if name == ADMIN:
        raise InvalidInput(f"{name!r} is the CLI's certificate name", "choose another host name")
    if plan.start not in StartMode.ALL:
        raise InvalidInput(f"unknown start mode {plan.start!r}", f"use one of {', '.join(StartMode.ALL)}")
    if not plan.remote.phaul or not plan.remote.phaul[0].startswith("/"):
        raise InvalidInput(f"the remote phaul command {shlex.join(plan.remote.phaul)!r} is not an absolute path",
                           "give --remote-phaul as an absolute command, e.g. /usr/local/bin/phaul")
    r = plan.remote
    with Session(plan.ssh) as ssh:
        say(f"{name}: logged in as {plan.ssh.user}@{plan.ssh.address}:{plan.ssh.port} (host key verified)")
        if plan.install:
            _install(ssh, say, name, plan.remote.install_dir)
        _doctor(ssh, r, say, name)
        for d, mode in ((r.etc, 0o755), (r.pki, 0o700), (r.state_dir, 0o700)):
            ssh.mkdir(str(d), mode)
        ssh.check([*r.phaul, "pki", "csr", name, "--dir", str(r.pki), "--ip", plan.agent_ip,
                   *(a for d in plan.dns for a in ("--dns", d))], "making the key and request")
        csr_path = str(r.pki / f"{name}.csr")  # where we asked for it, not a path the host printed
        say(f"{name}: made its key and a certificate request there ({csr_path}); the key stays there")
        existing = {h.name: [h.ip] for h in plan.hosts.hosts.values()}
        _, cert_pem = pki.sign_csr(plan.ca_dir, ssh.get(csr_path), name=name, hosts=existing, admins=(ADMIN,))
        serial = _serial(cert_pem)
        say(f"{name}: signed its certificate {serial} with the CA in {plan.ca_dir}")
        ssh.put(str(r.pki / f"{name}.crt"), cert_pem, 0o644)
        ssh.put(str(r.pki / "ca.crt"), (plan.ca_dir / "ca.crt").read_bytes(), 0o644)
        ssh.put(str(r.pki / REVOKED_FILE), _revocation_text(plan.ca_dir), 0o644)
        peers = frozenset(plan.hosts.hosts)
        pki_dir = Path(str(r.pki))
        config = AgentConfig(
            name=name, listen=plan.agent_address, state_dir=Path(str(r.state_dir)),
            creds=Credentials(name, pki_dir / f"{name}.crt", pki_dir / f"{name}.key", pki_dir / "ca.crt"),
            socket=Path(str(r.socket)), bridge=plan.bridge, peers=peers, admins=frozenset({ADMIN}),
            revoked=Path(str(r.pki / REVOKED_FILE)),
        )
        ssh.put(str(r.config), render_config(config).encode(), 0o644)
        ssh.mkdir(str(r.unit_dir), 0o755)
        ssh.put(str(r.unit), render_unit(list(r.phaul), Path(str(r.config))).encode(), 0o644)
        say(f"{name}: wrote {r.config} and {r.unit}")
        started = _start(ssh, plan, agent_argv(list(r.phaul), Path(str(r.config))), say)
    _wait_agent(plan, name)
    say(f"{name}: its agent answers on {plan.agent_address} with its new certificate")
    hosts = plan.hosts
    hosts.hosts[name] = HostEntry(name=name, address=plan.agent_address)
    write_atomic(hosts.path, json.dumps(hosts.to_dict(), indent=2) + "\n")
    say(f"{name}: added to {hosts.path}")
    pushed = push_peers(hosts, plan.ca_dir, skip=name, say=say)
    seconds = time.monotonic() - t0
    say(f"{name}: added in {seconds:.1f} s")
    return AddResult(name, plan.agent_address, serial, started, seconds, pushed)


def remove_host(hosts: HostsFile, ca_dir: Path, name: str, say: Say = print) -> list[Pushed]:
    """Revoke `name`'s certificates with the CA in `ca_dir`, drop it from the hosts file and
    push the revocation list and the peer list without it to the remaining agents."""
    check_id(name, "host name")
    if name not in hosts.hosts:
        raise InvalidInput(f"{name} is not in {hosts.path}", f"known hosts: {', '.join(sorted(hosts.hosts)) or 'none'}")
    try:
        added = pki.revoke(ca_dir, name)
    except PhaulError as e:
        raise InvalidInput(f"cannot revoke the certificate of {name}: {e.message}",
                           f"revoke it by serial with `phaul pki revoke SERIAL --dir {ca_dir}`") from e
    say(f"{name}: revoked {', '.join(added) if added else '(already revoked)'} in {ca_dir / REVOKED_FILE}")
    del hosts.hosts[name]
    write_atomic(hosts.path, json.dumps(hosts.to_dict(), indent=2) + "\n")
    say(f"{name}: removed from {hosts.path}")
    pushed = push_peers(hosts, ca_dir, say=say)
    say(f"{name}: its agent may still run there: stop it on {name} (`systemctl disable --now {UNIT_NAME}`)")
    return pushed


def push_peers(hosts: HostsFile, ca_dir: Path, *, skip: str | None = None, say: Say = print) -> list[Pushed]:
    """Tell every agent of `hosts` (but `skip`) its peers (every other host) and the CA's
    revoked serials (SetPeers: kept, applied live, no restart)."""
    serials = [format_serial(s) for s in sorted(read_serials(ca_dir / REVOKED_FILE))]
    creds = _admin(hosts)
    results = []
    for entry in hosts.hosts.values():
        if entry.name == skip:
            continue
        peers = sorted(n for n in hosts.hosts if n != entry.name)
        target = f"unix:{entry.socket}" if entry.socket and entry.socket.exists() else entry.address
        try:
            with connect(target, entry.name, creds) as agent:
                reply = agent.call("SetPeers", pb.SetPeersRequest(peers=peers, revoked_serials=serials), timeout=30)
            detail = f"peers {', '.join(reply.peers) or 'none'}; {reply.revoked_added} serial(s) newly revoked"
            results.append(Pushed(entry.name, True, detail))
        except PhaulError as e:
            results.append(Pushed(entry.name, False, e.message))
        say(f"{entry.name}: {'told: ' if results[-1].ok else 'NOT told: '}{results[-1].detail}")
    return results


# -- steps -------------------------------------------------------------------------------


def _install(ssh: Session, say: Say, name: str, install_dir: PurePosixPath) -> None:
    """Copy this checkout's HEAD there and run its own setup (scripts/setup.sh)."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "scripts" / "setup.sh").is_file():
        raise InvalidInput("--install needs phaul's source checkout here (scripts/setup.sh)",
                           "run `phaul host add` from a checkout, or install phaul there yourself and give --remote-phaul")
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "HEAD"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise ToolFailed(f"`git archive` in {repo} failed: {archive.stderr.decode(errors='replace').strip()}",
                         "run it from a git checkout of phaul")
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).getmembers()  # a readable tar before it is sent
    ssh.mkdir(f"{install_dir}/src", 0o755)
    ssh.put(f"{install_dir}/src.tar", archive.stdout, 0o600)
    ssh.check(["tar", "-x", "-f", f"{install_dir}/src.tar", "-C", f"{install_dir}/src"], "unpacking phaul")
    say(f"{name}: running phaul's setup there (Debian packages, CRIU, .venv); this takes a while")
    ssh.check([f"{install_dir}/src/scripts/setup.sh"], "phaul's setup", timeout=7200)


def _doctor(ssh: Session, r: RemotePaths, say: Say, name: str) -> None:
    result = ssh.run([*r.phaul, "doctor", "--json"], timeout=300)
    try:
        doc = json.loads(result.stdout)
        checks = doc["checks"]
        failed = [f"{c['name']}: {c['detail']}" for c in checks if c.get("status") == "failure"]
    except (ValueError, KeyError, TypeError) as e:
        command = shlex.join([*r.phaul, "doctor", "--json"])
        raise Refused(f"`{command}` on {name} gave no report ({e}): {result.stderr.strip()[-300:]}",
                      "install phaul there (--install, or give its command with --remote-phaul)") from None
    if failed:
        raise Refused(f"{name} cannot run migrations: {'; '.join(failed)}",
                      f"fix these there (`phaul doctor` on {name}), then retry")
    say(f"{name}: doctor passed ({len(checks)} checks, {sum(c.get('status') == 'warning' for c in checks)} warnings)")


def _start(ssh: Session, plan: AddPlan, argv: list[str], say: Say) -> str:
    """Start the agent there; return how."""
    r, name = plan.remote, plan.name
    systemd = ssh.run(["test", "-d", "/run/systemd/system"]).status == 0  # sd_booted(3): systemd is PID 1
    mode = plan.start if plan.start != StartMode.AUTO else (StartMode.SYSTEMD if systemd else StartMode.COMMAND)
    if mode == StartMode.SYSTEMD:
        if r.unit_dir != RemotePaths.unit_dir:
            raise InvalidInput(f"systemd does not read units from {r.unit_dir}",
                               "leave --remote-unit-dir at its default with systemd")
        ssh.check(["systemctl", "daemon-reload"], "systemctl daemon-reload")
        ssh.check(["systemctl", "enable", "--now", UNIT_NAME], f"systemctl enable --now {UNIT_NAME}")
        say(f"{name}: enabled and started {UNIT_NAME} with systemd")
        return "systemd"
    # No systemd as PID 1 there (a container, or a network namespace of this machine): run the
    # unit's ExecStart line detached from the SSH session, as systemd would, logging to a file.
    ssh.check(["mkdir", "-p", str(r.socket.parent)], f"creating {r.socket.parent}")
    tail = f">>{shlex.quote(str(r.log))} 2>&1 </dev/null"
    result = ssh.run(["setsid", "-f", "nohup", *argv], shell_tail=tail, timeout=60)
    if result.status != 0:
        raise ToolFailed(f"starting the agent on {name} failed (exit {result.status}): {result.stderr.strip()}",
                         f"see {r.log} there")
    say(f"{name}: {'no systemd as PID 1 there: ' if not systemd else ''}started the unit's command line detached "
        f"(setsid nohup {shlex.join(argv)}), log in {r.log}")
    return "command"


def _wait_agent(plan: AddPlan, name: str) -> None:
    """Wait until the new agent answers Info over mutual TLS as `name`."""
    creds = _admin(plan.hosts)
    deadline = time.monotonic() + AGENT_WAIT
    last: str = ""
    while time.monotonic() < deadline:
        try:
            with connect(plan.agent_address, name, creds) as agent:
                info = agent.call("Info", pb.Empty(), timeout=5)
        except PhaulError as e:
            last = e.message
            time.sleep(0.5)
            continue
        if info.name != name:
            raise ToolFailed(f"the agent on {plan.agent_address} calls itself {info.name!r}, not {name!r}",
                             f"check {plan.remote.config} there")
        return
    raise ToolFailed(f"the agent on {name} did not answer on {plan.agent_address} within {AGENT_WAIT:.0f} s: {last}",
                     f"see {plan.remote.log} there (or `journalctl -u {UNIT_NAME}`)")


def _admin(hosts: HostsFile) -> Credentials:
    """The CLI's credentials, as the hosts file names them."""
    return Credentials(ADMIN, hosts.pki.cert, hosts.pki.key, hosts.pki.ca)


def _serial(cert_pem: bytes) -> str:
    from cryptography import x509

    return format_serial(x509.load_pem_x509_certificate(cert_pem).serial_number)


def _revocation_text(ca_dir: Path) -> bytes:
    try:
        return (ca_dir / REVOKED_FILE).read_bytes()
    except FileNotFoundError:
        return REVOKED_HEADER.encode()
