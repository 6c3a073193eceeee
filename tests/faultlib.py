"""Helpers for the tests that break migrations on purpose (test_recovery.py,
test_faults.py): pausing a migration at a step, killing agents and CRIU,
cutting the lab link, and checking what is left on each host."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import COUNT_STEP, REPO, Lab, wait_for

from phaul.linux import procfs
from phaul.testing.faults import PAUSED_FILE

HOSTS = ("alpha", "beta")
# The fault matrix's results, one case a line (JSON); scripts/fault_table.py prints them as the table.
RESULTS = Path(os.environ.get("PHAUL_FAULT_RESULTS", REPO / ".pytest_cache" / "fault-matrix.jsonl"))


def record_case(row: dict) -> None:
    """Add one case of the fault matrix (step, fault, outcome, ...) to RESULTS."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


@contextmanager
def fault_case(step: str, fault: str, ct: str) -> Iterator[dict]:
    """One case of the fault matrix run outside tests/test_faults.py (the post-copy row):
    yields the case's row to fill in (report, journal, runs_on, restarted, recovered);
    records it with its outcome, "pass" or the failure, and its duration."""
    t0 = time.monotonic()
    row: dict = {"step": step, "fault": fault, "ct": ct}
    try:
        yield row
        row["outcome"] = "pass"
    except BaseException as e:
        row["outcome"] = f"FAIL: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
        raise
    finally:
        row["seconds"] = round(time.monotonic() - t0, 1)
        record_case(row)


@pytest.fixture
def broken_lab(lab: Lab):  # type: ignore[no-untyped-def]
    """The lab for tests that break it: afterwards links are healed, dead agents
    restarted, what is in doubt settled, and every container removed."""
    yield lab
    lab.disarm_faults()
    for host in HOSTS:
        link(host, up=True)
        pause_marker(lab, host).unlink(missing_ok=True)
    restart_agents(lab)
    for host in HOSTS:
        lab.phaul("--host", host, "recover", check=False, timeout=600)
    lab.destroy_all()


def runc_state(lab: Lab, host: str, ct: str) -> str | None:
    """runc's view of a container, without asking the (maybe dead) agent."""
    state = _runc_state(lab, host, ct)
    return state["status"] if state else None


def _runc_state(lab: Lab, host: str, ct: str) -> dict | None:
    proc = subprocess.run(["runc", "--root", str(lab.state_dir(host) / "runc"), "state", ct], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def counter_file(lab: Lab, host: str, ct: str) -> int:
    """The counter as written into the container's root file system (no agent needed)."""
    try:
        return int((lab.rootfs(host, ct) / "counter").read_text())
    except (OSError, ValueError):
        return -1


def frozen(lab: Lab, host: str, ct: str, seconds: float = 0.5) -> bool:
    """True if the container's counter does not move for `seconds`."""
    before = counter_file(lab, host, ct)
    time.sleep(seconds)
    return before == counter_file(lab, host, ct) != -1


# A counter that also keeps a random value drawn at start-up in its memory only
# (a restarted copy would draw another); it writes the value to /mark when /ask appears.
MARKED_COUNTER = [
    "/bin/sh", "-c",
    "v=$(head -c8 /dev/urandom | od -An -tx1 | tr -d ' \\n'); i=0; "
    f"while :; do {COUNT_STEP}; "
    "if [ -e /ask ]; then rm -f /ask; echo $v > /mark; fi; sleep 0.05; done",
]


def start_counter(lab: Lab, ct: str, host: str = "alpha") -> str:
    """Create and start a marked counter; returns the value it keeps in memory."""
    lab.phaul("--host", host, "ct", "create", ct, "--memory", "64M")
    lab.phaul("--host", host, "ct", "start", ct, "--", *MARKED_COUNTER)
    wait_for(lambda: lab.counter(host, ct) > 2, what=f"{ct}'s counter to run")
    return read_memory_mark(lab, host, ct)


def read_memory_mark(lab: Lab, host: str, ct: str, timeout: float = 10) -> str:
    """The value the counter keeps in memory, asked through /ask and /mark in its
    root file system (no agent needed); "" if it does not answer."""
    root = lab.rootfs(host, ct)
    (root / "mark").unlink(missing_ok=True)
    (root / "ask").touch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = (root / "mark").read_text().strip()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.02)
    return ""


def migrate_async(lab: Lab, ct: str, src: str, dst: str, *extra: str, fault: str = "") -> subprocess.Popen[str]:
    """Start `phaul migrate` (`fault`, "STEP:KIND", armed first); `finish` waits for its report."""
    if fault:
        lab.arm_fault(src, dst, fault)
    cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(lab.hosts_file), "--host", src, "migrate", ct, dst, "--json", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if out.strip().startswith("{"):
        return json.loads(out)
    return {"result": "no report", "exit": proc.returncode, "stderr": err.strip()[-600:]}


def pause_marker(lab: Lab, host: str) -> Path:
    return lab.state_dir(host) / PAUSED_FILE


def wait_paused(lab: Lab, host: str, proc: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    """Wait until the migration pauses at its fault step; (migration ID, step)."""
    marker = pause_marker(lab, host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            mid, step = marker.read_text().split()
            return mid, step
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the migration ended before pausing: {finish(proc)}")
        time.sleep(0.02)
    raise AssertionError("the migration never paused")


def release(lab: Lab, host: str) -> None:
    pause_marker(lab, host).unlink(missing_ok=True)


def agent_pid(lab: Lab, host: str) -> int:
    return int((lab.state_dir(host) / "agent.pid").read_text())


def kill_agent(lab: Lab, host: str) -> None:
    os.kill(agent_pid(lab, host), signal.SIGKILL)
    wait_for(lambda: not procfs.alive(agent_pid(lab, host)), what=f"{host}'s agent to die")


def restart_agents(lab: Lab) -> None:
    """What an admin does after an agent died: `phaul lab up` restarts dead agents."""
    lab.phaul("lab", "up", timeout=120)



def link(host: str, up: bool) -> None:
    """Take host's leg of the lab switch down (cut) or up (heal)."""
    subprocess.run(["ip", "-n", "phaul-sw", "link", "set", f"phl-{host}-sw", "up" if up else "down"], check=True)


def criu_pids(lab: Lab, host: str) -> list[int]:
    """CRIU processes working for host's runc."""
    root = str(lab.state_dir(host) / "runc").encode()
    runcs = set()
    procs = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(d.name)] = (cmd, ppid)
        if root in cmd and b"runc" in cmd.split(b"\0")[0]:
            runcs.add(int(d.name))
    return [pid for pid, (_cmd, ppid) in procs.items() if ppid in runcs and _comm(pid) == "criu"]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def kill_criu(lab: Lab, host: str, timeout: float = 30, dumping: str = "") -> bool:
    """SIGKILL the first CRIU working for host's runc within `timeout` s, once it is
    at work: dumping container `dumping`, once it has seized its first process;
    otherwise once it has a child (the restored tree, or an action script). Either
    way before it can have told runc that it succeeded. True if one was killed."""
    deadline = time.monotonic() + timeout
    init = int((_runc_state(lab, host, dumping) or {})["pid"]) if dumping else 0

    def at_work(criu: list[int]) -> bool:
        return _tracer(init) in criu if init else any(_has_children(p) for p in criu)

    while time.monotonic() < deadline:
        pids = criu_pids(lab, host)
        while pids and any(procfs.alive(p) for p in pids):  # watch this CRIU closely until it ends
            if at_work(pids):
                for p in pids:
                    os.kill(p, signal.SIGKILL)
                return True
            time.sleep(0.0005)
        time.sleep(0.002)
    return False


def _has_children(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return False


def _tracer(pid: int) -> int:
    """The process tracing `pid` (0: none)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def migrations(lab: Lab, host: str) -> dict[str, dict]:
    rows = json.loads(lab.phaul("--host", host, "migrations", "--json").stdout)["migrations"]
    return {r["migration_id"]: r for r in rows}


def recover(lab: Lab, host: str, mid: str = "") -> list[dict]:
    proc = lab.phaul("--host", host, "recover", *([mid] if mid else []), "--json", check=False, timeout=600)
    assert proc.returncode in (0, 1, 3), proc
    return json.loads(proc.stdout)["outcomes"]  # type: ignore[no-any-return]


@dataclass
class Where:
    """Where a container is, host by host: runc state or None."""

    states: dict[str, str | None]

    @property
    def running(self) -> list[str]:
        return [h for h, s in self.states.items() if s == "running"]


def where(lab: Lab, ct: str) -> Where:
    """Asks runc and the state directories, not the agents (which may be dead)."""
    states: dict[str, str | None] = {}
    for host in HOSTS:
        state = runc_state(lab, host, ct)
        if state is None and (lab.state_dir(host) / "containers" / ct / "phaul.json").exists():
            state = "created"
        states[host] = state
    return Where(states)


def stopped_processes(lab: Lab, host: str, ct: str) -> list[str]:
    """Processes of the container on `host` that are stopped (T) or frozen."""
    out = []
    for cg in Path("/sys/fs/cgroup").glob(f"*/phaul-{host}/{ct}"):
        state = cg / "freezer.state"
        if state.exists() and state.read_text().strip() != "THAWED":
            out.append(f"{cg} is {state.read_text().strip()}")
        procs = cg / "cgroup.procs"
        if not procs.exists():
            continue
        for pid in procs.read_text().split():
            if procfs.state(pid) in ("T", "t"):
                out.append(f"pid {pid} of {ct} on {host} is stopped")
    return out


def leftovers(lab: Lab, host: str, keep_ct: str | None = None) -> list[str]:
    """Everything a settled migration must not leave on a host (the container
    `keep_ct`, if it lives there, excepted)."""
    state = lab.state_dir(host)
    found = []
    for sub in ("migrations", "incoming", "containers"):
        d = state / sub
        if d.exists():
            found += [str(p) for p in d.iterdir() if p.name != keep_ct]
    runc = subprocess.run(["runc", "--root", str(state / "runc"), "list", "-q"], capture_output=True, text=True)
    found += [f"runc:{line}" for line in runc.stdout.split() if line != keep_ct]
    for cg in Path("/sys/fs/cgroup").glob(f"*/phaul-{host}/*"):
        if cg.is_dir() and cg.name != keep_ct:
            found.append(str(cg))
    if keep_ct:
        found += stopped_processes(lab, host, keep_ct)
    keeper = f"phaul.containers.console --dir {state / 'containers' / str(keep_ct)}/"  # the kept container's console keeper
    found += [f"process {p}: {args}" for p, args in netns_processes(host)
              if p != agent_pid(lab, host) and not (keep_ct and keeper in args)]  # fmt: skip
    links = subprocess.run(["ip", "-n", f"phaul-{host}", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name not in ("lo", "br0", f"phl-{host}-up") and not (keep_ct and keep_ct in name):
            found.append(f"link {name}")
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {mp}" for mp in (line.split()[4] for line in mounts.splitlines()) if mp.startswith(f"{state}/")]
    return found


def netns_processes(host: str) -> list[tuple[int, str]]:
    """(PID, command line) of every process in lab host `host`'s network namespace:
    its agent and whatever the agent started and left (CRIU, runc, rsync, socat,
    gate scripts). Containers have namespaces of their own."""
    try:
        want = os.stat(f"/run/netns/phaul-{host}").st_ino
    except OSError:
        return []
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.stat(d / "ns" / "net").st_ino != want:
                continue
            args = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if stat not in ("Z", "X") and args:
            out.append((int(d.name), args))
    return out


class Admin:
    """In-process calls to the lab's agents as the admin (no CLI start-up per call)."""

    def __init__(self, lab: Lab) -> None:
        from phaul.hosts import read_hosts
        from phaul.channels.transport import Credentials

        self.lab = lab
        self.hosts = read_hosts(lab.hosts_file)
        self.creds = Credentials("admin", self.hosts.pki.cert, self.hosts.pki.key, self.hosts.pki.ca)

    def call(self, host: str, method: str, request: object, timeout: float = 60) -> object:
        from phaul.channels.client import connect

        entry = self.hosts.host(host)
        with connect(f"unix:{entry.socket}", host, self.creds) as agent:
            return agent.call(method, request, timeout=timeout)

    def migrate(self, ct: str, src: str, dst: str, fault: str = "", method: str = "precopy") -> "Migration":
        from phaul.rpc import phaul_pb2 as pb

        dest = self.hosts.host(dst)
        if fault:
            self.lab.arm_fault(src, dst, fault)
        req = pb.MigrateRequest(ct_id=ct, dest_name=dst, dest_address=dest.address, method=method)
        m = Migration()

        def run() -> None:
            from phaul.channels.client import connect
            from phaul.errors import PhaulError
            from phaul.channels import messages

            try:
                with connect(f"unix:{self.hosts.host(src).socket}", src, self.creds) as agent:
                    for event in agent.stream("Migrate", req, timeout=600):
                        if event.HasField("report"):
                            m.report = dataclasses.asdict(messages.report_from_proto(event.report))
            except PhaulError as e:
                m.error = str(e)

        m.thread = threading.Thread(target=run, daemon=True)
        m.thread.start()
        return m

    def migrations(self, host: str) -> dict[str, dict]:
        from phaul.rpc import phaul_pb2 as pb

        rows = self.call(host, "ListMigrations", pb.Empty()).migrations  # type: ignore[attr-defined]
        return {r.migration_id: {"state": r.state, "step": r.step, "ct": r.ct, "error": r.error} for r in rows}

    def recover(self, host: str, mid: str) -> list[dict]:
        from phaul.rpc import phaul_pb2 as pb

        reply = self.call(host, "Recover", pb.RecoverRequest(migration_id=mid), timeout=600)
        return [{"result": o.result, "message": o.message} for o in reply.outcomes]  # type: ignore[attr-defined]

    def destroy(self, host: str, ct: str) -> None:
        from phaul.errors import PhaulError
        from phaul.rpc import phaul_pb2 as pb

        try:
            self.call(host, "DestroyContainer", pb.ContainerRef(id=ct))
        except PhaulError:
            pass


@dataclass
class Migration:
    """A migration running in a thread: its report, or the error that ended the call."""

    report: dict | None = None
    error: str = ""
    thread: threading.Thread | None = None

    def wait(self, timeout: float = 300) -> "Migration":
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the migration call did not end"
        return self


def ensure_agents(lab: Lab) -> list[str]:
    """Restart the lab's dead agents (as `phaul lab up` does), in-process; the hosts restarted."""
    from phaul.testing import lab as lab_mod

    def alive(h: str) -> bool:
        try:
            return procfs.alive(agent_pid(lab, h)) and (lab.state_dir(h) / "agent.sock").exists()
        except (OSError, ValueError):
            return False

    dead = [h for h in HOSTS if not alive(h)]
    if dead:
        lab_mod.up(lab_dir=lab.dir)
    return dead


def scrub(lab: Lab) -> None:
    """After a failed case: remove by force what it left, so that the next case
    starts clean (the failure itself is already recorded)."""
    import shutil

    for host in HOSTS:
        state = lab.state_dir(host)
        try:
            agent = agent_pid(lab, host)
        except (OSError, ValueError):
            agent = 0
        for pid, _args in netns_processes(host):
            if pid != agent:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        root = state / "runc"
        ids = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True).stdout.split()
        for ct in ids:
            subprocess.run(["runc", "--root", str(root), "delete", "--force", ct], capture_output=True)
        for sub in ("migrations", "incoming", "containers"):
            for p in (state / sub).glob("*") if (state / sub).is_dir() else []:
                shutil.rmtree(p, ignore_errors=True)
        for cg in sorted(Path("/sys/fs/cgroup").glob(f"*/phaul-{host}/*"), reverse=True):
            for freezer in cg.rglob("freezer.state"):
                try:
                    freezer.write_text("THAWED")
                except OSError:
                    pass
            try:
                cg.rmdir()
            except OSError:
                pass
