"""End-to-end live migration in the lab: real CRIU, runc, rsync, namespaces, TLS."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import COUNTER, Lab, wait_for

from phaul.testing.lab import NETNS

pytestmark = pytest.mark.lab


def _start_counter(lab: Lab, ct: str, host: str = "alpha", *create: str) -> None:
    lab.phaul("--host", host, "ct", "create", ct, *create)
    lab.phaul("--host", host, "ct", "start", ct, "--", *COUNTER)
    wait_for(lambda: lab.counter(host, ct) > 3, what=f"{ct}'s counter to run")


def _leftovers(lab: Lab, host: str) -> list[str]:
    """Everything a finished migration must not leave on a host."""
    state = lab.state_dir(host)
    found = []
    for sub in ("migrations", "incoming", "containers"):
        d = state / sub
        if d.exists():
            found += [str(p) for p in d.iterdir()]
    runc = subprocess.run(["runc", "--root", str(state / "runc"), "list", "-q"], capture_output=True, text=True)
    found += [f"runc:{line}" for line in runc.stdout.split()]
    for cg in Path("/sys/fs/cgroup").glob(f"*/phaul-{host}/*"):
        if cg.is_dir():
            found.append(str(cg))
    return found + _stray_processes(state, Path("/run/netns") / NETNS[host])


def _stray_processes(state: Path, netns: Path) -> list[str]:
    """Stopped tasks and CRIU processes in the host's network namespace, and anything but its agent
    that names its state directory (not the machine's other processes: other work may run CRIU too)."""
    ns = netns.stat().st_ino
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            comm = (proc / "comm").read_text().strip()
            stopped = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tT"
            in_host = (proc / "ns" / "net").stat().st_ino == ns
        except OSError:  # gone meanwhile
            continue
        agent = any(a == "agent" or a.endswith(".agent") for a in argv)
        if in_host and (stopped or comm == "criu") or (not agent and any(str(state) in a for a in argv)):
            found.append(f"{proc.name} {comm}: {' '.join(argv)}")
    return found


def test_counter_keeps_counting_across_migration(clean_lab: Lab) -> None:
    lab = clean_lab
    _start_counter(lab, "count1", "alpha", "--memory", "96M")
    lab.exec("alpha", "count1", "sh", "-c", "echo precious > /data.txt")
    before = lab.counter("alpha", "count1")
    report = lab.migrate("count1", "alpha", "beta")
    after = lab.counter("beta", "count1")
    assert report["result"] == "ok", report
    assert after >= before, f"counter went back from {before} to {after}: restarted, not migrated"
    wait_for(lambda: lab.counter("beta", "count1") > after, what="the counter to keep increasing on beta")
    assert lab.exec("beta", "count1", "cat", "/data.txt").strip() == "precious"
    # the destination rebuilt the bundle from the Prepare configuration: the custom command is kept
    spec = json.loads((lab.state_dir("beta") / "containers" / "count1" / "bundle" / "config.json").read_text())
    assert spec["process"]["args"] == COUNTER and spec["linux"]["resources"]["memory"]["limit"] == 96 << 20
    [info] = lab.ct_list("beta")
    assert info["id"] == "count1" and info["state"] == "running"
    assert info["memory_limit"] == 96 << 20
    assert lab.ct_list("alpha") == []
    assert report["frozen_ms"] > 0 and report["total_ms"] >= report["frozen_ms"]
    assert report["bytes_sent"] > 0 and len(report["rounds"]) >= 1
    for key in ("ct", "source", "destination", "memory_method", "fs_bytes_sent", "criu_ms"):
        assert key in report
    assert (lab.state_dir("alpha") / "reports" / f"{report['migration_id']}.json").exists()


def test_round_trips_leave_nothing_behind(clean_lab: Lab) -> None:
    lab = clean_lab
    _start_counter(lab, "trip")
    hosts = ["alpha", "beta"]
    last = lab.counter("alpha", "trip")
    for i in range(10):  # five round trips
        src, dst = hosts[i % 2], hosts[(i + 1) % 2]
        report = lab.migrate("trip", src, dst)
        assert report["result"] == "ok", report
        now = lab.counter(dst, "trip")
        assert now >= last
        last = now
        assert [c["id"] for c in lab.ct_list(src)] == []
    lab.phaul("--host", "alpha", "ct", "destroy", "trip")
    for host in hosts:
        assert _leftovers(lab, host) == [], host


def _rolls_back(lab: Lab, ct: str, fault: str, error: str) -> None:
    """A migration of counter `ct` with `fault` armed rolls back: the error names
    `error`, the counter goes on on alpha, and beta keeps nothing."""
    _start_counter(lab, ct)
    report = lab.migrate(ct, "alpha", "beta", fault=fault, check=False)
    assert report["result"] == "rolled_back", report
    assert error in report["error"]
    [info] = lab.ct_list("alpha")
    assert info["state"] == "running"
    c = lab.counter("alpha", ct)
    wait_for(lambda: lab.counter("alpha", ct) > c, what=f"the counter of {ct} to go on on alpha")
    assert lab.ct_list("beta") == []
    assert _leftovers(lab, "beta") == []


def test_failed_restore_rolls_back(clean_lab: Lab) -> None:
    _rolls_back(clean_lab, "fragile", "restore:damage-image", "restore")


def test_failed_dump_rolls_back(clean_lab: Lab) -> None:
    """An armed `fail` fault (the test agent's step hook) fails the migration as its dump begins."""
    lab = clean_lab
    _rolls_back(lab, "brittle", "dump:fail", "injected fault at dump")
    assert not (lab.state_dir("alpha") / "faults" / "arm").exists()  # taken by that migration


@pytest.mark.parametrize("args, message", [
    (("beta", "--max-rounds", "0"), "--max-rounds 0 is below 1"),
    (("beta", "--max-downtime", "-5"), "--max-downtime -5 ms is below 1 ms"),
    (("beta", "--bandwidth", "12Q"), "invalid bandwidth '12Q'"),
    (("alpha",), "the destination alpha is the source host"),
    (("gamma",), "no host 'gamma'"),
    (("beta", "--method", "postcopy", "--precopy", "off"), "--method postcopy and --precopy=off disagree"),
])
def test_bad_migrate_arguments_are_refused(clean_lab: Lab, args: tuple[str, ...], message: str) -> None:
    proc = clean_lab.phaul("--host", "alpha", "migrate", "anyct", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "hint:" in proc.stderr, proc.stderr


def test_unknown_container_is_refused(clean_lab: Lab) -> None:
    proc = clean_lab.phaul("--host", "alpha", "migrate", "nosuch", "beta", check=False)
    assert proc.returncode == 2
    assert "no container 'nosuch'" in proc.stderr


def test_invalid_id_is_refused(clean_lab: Lab) -> None:
    proc = clean_lab.phaul("--host", "alpha", "ct", "create", "Bad/ID", check=False)
    assert proc.returncode == 2 and "invalid container ID" in proc.stderr


def test_duplicate_id_on_destination_is_refused(clean_lab: Lab) -> None:
    lab = clean_lab
    _start_counter(lab, "dup")
    lab.phaul("--host", "beta", "ct", "create", "dup")
    proc = lab.phaul("--host", "alpha", "migrate", "dup", "beta", check=False)
    assert proc.returncode == 2
    assert "beta already has a container dup" in proc.stderr
    assert lab.ct_list("alpha")[0]["state"] == "running"
    assert lab.ct_list("beta")[0]["state"] == "created"
    assert not any(list((lab.state_dir(h) / d).glob("*")) for h in ("alpha", "beta") for d in ("migrations", "incoming"))


def test_client_without_valid_certificate_is_refused(lab: Lab, tmp_path: Path) -> None:
    from phaul.channels import pki

    pki.init_ca(tmp_path / "pki", "mallory CA")
    cert, key = pki.issue(tmp_path / "pki", "admin")
    data = json.loads(lab.hosts_file.read_text())
    data["pki"] = {"ca": str(tmp_path / "pki" / "ca.crt"), "cert": str(cert), "key": str(key)}
    bad = tmp_path / "hosts.json"
    bad.write_text(json.dumps(data))
    out = Lab(lab.dir, bad).phaul("--host", "alpha", "ct", "list", check=False, timeout=60)
    assert out.returncode == 2, out
    assert "unreachable" in out.stderr and "same CA" in out.stderr


def _init_seccomp(lab: Lab, host: str, ct: str) -> list[str]:
    """The Seccomp: field of every task of the container (2: a filter), read on the host."""
    [info] = [c for c in lab.ct_list(host) if c["id"] == ct]
    state = json.loads(subprocess.run(
        ["runc", "--root", str(lab.state_dir(host) / "runc"), "ps", "--format", "json", ct],
        capture_output=True, text=True, check=True,
    ).stdout)
    fields = [_seccomp_field(info["pid"])]  # init: it must be there
    for pid in sorted(set(state) - {info["pid"]}):
        try:  # the counter's short-lived children (its sleep) may have ended since runc listed them
            fields.append(_seccomp_field(pid))
        except FileNotFoundError:
            pass
    return fields


def _seccomp_field(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    [field] = [line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:")]
    return field


def _ping(lab: Lab, host: str, ct: str) -> subprocess.CompletedProcess[str]:
    return lab.phaul("--host", host, "ct", "exec", ct, "--", "ping", "-c1", "-W1", "127.0.0.1", check=False)


def test_seccomp_and_added_capabilities_travel_with_the_container(clean_lab: Lab) -> None:
    """CRIU 4.2.1 dumps and restores the default seccomp filter; the capability asked for at
    create (NET_RAW: ping's raw socket) holds on the destination, and the default set still lacks it."""
    lab = clean_lab
    _start_counter(lab, "filt", "alpha", "--cap-add", "NET_RAW")
    _start_counter(lab, "plain", "alpha")
    assert set(_init_seccomp(lab, "alpha", "filt")) == {"2"}
    assert _ping(lab, "alpha", "filt").returncode == 0
    assert "permission denied" in _ping(lab, "alpha", "plain").stderr
    for ct in ("filt", "plain"):
        report = lab.migrate(ct, "alpha", "beta")
        assert report["result"] == "ok", report
    assert set(_init_seccomp(lab, "beta", "filt")) == {"2"}  # every restored task still has its filter
    assert set(_init_seccomp(lab, "beta", "plain")) == {"2"}
    probe = lab.phaul("--host", "beta", "ct", "exec", "filt", "--", "syscall-probe", "vmsplice", check=False)
    assert "errno=1 " in probe.stdout, probe
    # The restore brought the new network namespace's lo up (an unaddressed container too).
    filt = _ping(lab, "beta", "filt")
    assert filt.returncode == 0, filt
    assert "permission denied" in _ping(lab, "beta", "plain").stderr
    now = lab.counter("beta", "filt")
    wait_for(lambda: lab.counter("beta", "filt") > now, what="the restored counter to run")
    spec = json.loads((lab.state_dir("beta") / "containers" / "filt" / "bundle" / "config.json").read_text())
    assert "CAP_NET_RAW" in spec["process"]["capabilities"]["bounding"] and spec["linux"]["seccomp"]["syscalls"]
