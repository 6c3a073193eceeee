"""Offline moves and cold copies (issue 13, phaul.migration.offline), for real in the lab:
`phaul migrate --offline` of a running counter, a plain `phaul migrate` of a stopped
container, a failure before the destination's start rolled back, `phaul abort` of a
move held at each step before its commit (running and stopped containers), `phaul
migrations --follow` of one to its end, and `phaul copy` with its own ID and address,
refused where it would clash. The few tests without
the lab check a copy's configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import COUNT_STEP, REPO, TEST_SUBNET, Lab, wait_for
from faultlib import (
    counter_file,
    ensure_agents,
    finish,
    leftovers,
    migrate_async,
    migrations,
    recover,
    release,
    wait_paused,
    where,
)

from phaul.containers import ContainerConfig
from phaul.containers.runc import _check_config
from phaul.errors import InvalidInput
from phaul.migration.offline import copy_config
from phaul.testing import lab as lab_mod
from phaul.testing import probe as probes

lab = pytest.mark.lab
PORT = 7007
# A counter that goes on from the value in /counter when it starts, and logs each start
# in /starts ("start N"): a restarted copy adds a line, a restored one does not.
COUNTER = [
    "/bin/sh", "-c",
    "trap 'exit 0' TERM; i=$(cat /counter 2>/dev/null || echo 0); echo \"start $i\" >> /starts; "
    f"while :; do {COUNT_STEP}; sleep 0.05; done",
]


def _ip(n: int) -> str:
    return lab_mod.container_address(TEST_SUBNET, n)


def _starts(root: Path) -> list[int]:
    return [int(line.split()[1]) for line in (root / "starts").read_text().splitlines()]


def _states(lab_: Lab, host: str) -> dict[str, str]:
    return {c["id"]: c["state"] for c in lab_.ct_list(host)}


def _start_counter(lab_: Lab, ct: str, past: int) -> None:
    lab_.phaul("--host", "alpha", "ct", "create", ct, "--memory", "64M")
    lab_.phaul("--host", "alpha", "ct", "start", ct, "--", *COUNTER)
    wait_for(lambda: counter_file(lab_, "alpha", ct) > past, timeout=30, what=f"{ct}'s counter")


# -- without the lab -------------------------------------------------------------------


def test_a_copy_has_its_own_id_mac_and_address() -> None:
    source = ContainerConfig(id="web", ip="10.1.2.3/24", gateway="10.1.2.1", args=["/bin/echo-server"])
    _check_config(source)
    copy, note = copy_config(source, "web2", "10.1.2.4/24")
    _check_config(copy)
    assert (copy.id, copy.ip, copy.gateway, copy.args) == ("web2", "10.1.2.4/24", "10.1.2.1", ["/bin/echo-server"])
    assert copy.mac and copy.mac != source.mac and "10.1.2.4/24" in note
    bare, note = copy_config(source, "web3", "")
    _check_config(bare)
    assert bare.ip is None and bare.gateway is None and "no address" in note and "--ip" in note


@pytest.mark.parametrize("copy_as,ip,why", [
    ("web", "", "own"),  # the source's ID
    ("web2", "10.1.2.3/24", "own address"),
    ("web2", "10.1.2.300/24", "invalid"),
    ("web2", "10.1.2.4", "prefix"),
    ("../x", "", "invalid copy ID"),
])  # fmt: skip
def test_a_copy_refuses_the_sources_identity_and_bad_input(copy_as: str, ip: str, why: str) -> None:
    source = ContainerConfig(id="web", ip="10.1.2.3/24")
    _check_config(source)
    with pytest.raises(InvalidInput, match=why):
        copy_config(source, copy_as, ip)


# -- in the lab ------------------------------------------------------------------------


@lab
def test_offline_move_of_a_running_container(clean_lab: Lab) -> None:
    """The command starts afresh on beta from the file system's counter; the source is gone."""
    lab_ = clean_lab
    _start_counter(lab_, "off-run", 20)
    proc = lab_.phaul("--host", "alpha", "migrate", "off-run", "beta", "--offline", "--json")
    report = json.loads(proc.stdout)
    assert report["result"] == "ok" and report["memory_method"] == "offline", report
    assert report["frozen_ms"] > 0 and report["pauses_ms"] == [report["frozen_ms"]], report
    assert where(lab_, "off-run").states == {"alpha": None, "beta": "running"}
    root = lab_.rootfs("beta", "off-run")
    starts = _starts(root)
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 20, starts  # a new process, from the synced file
    wait_for(lambda: counter_file(lab_, "beta", "off-run") > starts[1] + 3, what="the counter to go on on beta")
    assert leftovers(lab_, "alpha") == []
    assert leftovers(lab_, "beta", keep_ct="off-run") == []


@lab
def test_migrating_a_stopped_container_moves_it_offline(clean_lab: Lab) -> None:
    """A plain `migrate` of a container that is not running: its files move, it stays stopped."""
    lab_ = clean_lab
    lab_.phaul("--host", "alpha", "ct", "create", "off-stopped")
    lab_.phaul("--host", "alpha", "ct", "start", "off-stopped", "--", "/bin/sh", "-c", "echo kept > /data")
    wait_for(lambda: _states(lab_, "alpha")["off-stopped"] == "stopped", what="its command to end")
    report = lab_.migrate("off-stopped", "alpha", "beta")
    assert report["result"] == "ok" and report["memory_method"] == "offline", report
    assert "is stopped" in report["method_reason"] and report["frozen_ms"] == 0, report
    assert _states(lab_, "beta") == {"off-stopped": "created"} and "off-stopped" not in _states(lab_, "alpha")
    assert (lab_.rootfs("beta", "off-stopped") / "data").read_text() == "kept\n"
    left = leftovers(lab_, "alpha")
    assert left == [], "\n".join(left)


@lab
def test_a_failure_before_the_start_rolls_back(clean_lab: Lab) -> None:
    """The source's `resume` step fails (injected) after the container was stopped and
    created on beta: beta is cleaned and the container runs on alpha again."""
    lab_ = clean_lab
    _start_counter(lab_, "off-fail", 5)
    lab_.arm_fault("alpha", "beta", "resume:fail")
    proc = lab_.phaul("--host", "alpha", "migrate", "off-fail", "beta", "--offline", "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["result"] == "rolled_back", (proc.returncode, report)
    assert where(lab_, "off-fail").states == {"alpha": "running", "beta": None}
    starts = _starts(lab_.rootfs("alpha", "off-fail"))
    assert len(starts) == 2 and starts[1] >= 5, starts  # stopped, then started again
    wait_for(lambda: counter_file(lab_, "alpha", "off-fail") > starts[1] + 3, what="the counter to go on on alpha")
    assert leftovers(lab_, "beta") == []


@lab
def test_a_source_agent_killed_after_the_stop_is_settled_by_recover(clean_lab: Lab) -> None:
    """The source agent dies (injected) with the container stopped and its files on beta:
    restarted, `phaul recover` removes beta's copy and starts the container on alpha again."""
    lab_ = clean_lab
    _start_counter(lab_, "off-kill", 5)
    lab_.arm_fault("alpha", "beta", "restore:kill-agent")
    proc = lab_.phaul("--host", "alpha", "migrate", "off-kill", "beta", "--offline", "--json", check=False)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)  # the stream broke: in doubt
    assert where(lab_, "off-kill").running == []  # stopped, and never started on beta
    assert ensure_agents(lab_) == ["alpha"]
    (mid,) = [m for m, row in migrations(lab_, "alpha").items() if row["ct"] == "off-kill"]
    outcomes = recover(lab_, "alpha", mid)
    assert [o["result"] for o in outcomes if o["role"] == "source"] == ["rolled_back"], outcomes
    assert where(lab_, "off-kill").states == {"alpha": "running", "beta": None}
    assert len(_starts(lab_.rootfs("alpha", "off-kill"))) == 2
    wait_for(lambda: not leftovers(lab_, "beta"), what="beta to drop what it was sent")


@lab
def test_copy_of_a_running_container_with_its_own_identity(clean_lab: Lab) -> None:
    lab_ = clean_lab
    a, b = _ip(20), _ip(21)
    lab_.phaul("--host", "alpha", "ct", "create", "web", "--ip", f"{a}/24")
    lab_.phaul("--host", "alpha", "ct", "start", "web", "--", "/bin/echo-server", "--port", str(PORT))
    wait_for(lambda: probes.short_probe("phaul-client", f"{a}:{PORT}", seconds=0.05)[0] == 0, what="web's echo server")
    report = json.loads(lab_.phaul("--host", "alpha", "copy", "web", "beta", "--as", "web-copy", "--ip", f"{b}/24",
                                   "--json").stdout)
    assert report["result"] == "ok" and report["memory_method"] == "offline" and "web-copy" in report["method_reason"]
    alpha, beta = lab_.ct_list("alpha"), lab_.ct_list("beta")
    assert [(c["id"], c["state"], c["ip"]) for c in alpha] == [("web", "running", f"{a}/24")]
    assert [(c["id"], c["state"], c["ip"]) for c in beta] == [("web-copy", "running", f"{b}/24")]
    for ip in (a, b):  # both answer, each on its own address
        wait_for(lambda ip=ip: probes.short_probe("phaul-client", f"{ip}:{PORT}", seconds=0.05)[0] == 0,
                 what=f"the echo server on {ip}")

    refusals = {
        "NEWID exists on HOST": ("--as", "web-copy"),
        "the address is in use there": ("--as", "web-3", "--ip", f"{b}/24"),
        "the source's own address": ("--as", "web-3", "--ip", f"{a}/24"),
    }
    for why, extra in refusals.items():
        proc = lab_.phaul("--host", "alpha", "copy", "web", "beta", *extra, "--json", check=False)
        assert proc.returncode == 2, (why, proc.returncode, proc.stdout, proc.stderr)
        assert json.loads(proc.stderr.strip().splitlines()[-1])["exit_code"] == 2, (why, proc.stderr)
    assert [c["id"] for c in lab_.ct_list("beta")] == ["web-copy"]
    assert not list((lab_.state_dir("beta") / "incoming").glob("*"))


# -- abort and follow of an offline move (held at a step by the fault hook's `pause`) -----

# The steps of an offline move before its commit (the destination's start, in "resume"):
# a running container's, and a stopped one's (it is neither synced while it runs nor stopped).
BEFORE_START = {"running": ("fs-presync", "dump", "transfer", "restore", "resume"), "stopped": ("transfer", "restore", "resume")}
STOPPED_AFTER = ("transfer", "restore", "resume")  # a running container was stopped before these


class Held:
    """The lab, and the CLI processes a test starts against a held migration."""

    def __init__(self, lab_: Lab) -> None:
        self.lab = lab_
        self.procs: list[subprocess.Popen[str]] = []

    def cli(self, *args: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(self.lab.hosts_file), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.procs.append(proc)
        return proc

    def migrate(self, ct: str, fault: str) -> subprocess.Popen[str]:
        proc = migrate_async(self.lab, ct, "alpha", "beta", "--offline", fault=fault)
        self.procs.append(proc)
        return proc


@pytest.fixture
def held(clean_lab: Lab) -> Iterator[Held]:
    """Afterwards, whatever happened: the held migration goes on and ends, the CLI processes
    are gone, what is unsettled is settled (then clean_lab removes the containers)."""
    h = Held(clean_lab)
    try:
        yield h
    finally:
        release(clean_lab, "alpha")
        for proc in h.procs:
            try:
                proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        wait_for(lambda: all(r["state"] != "in_progress" for r in migrations(clean_lab, "alpha").values()), timeout=240,
                 what="alpha's migrations to end")
        for host in ("alpha", "beta"):
            clean_lab.phaul("--host", host, "recover", check=False, timeout=600)


def _journal_steps(lab_: Lab, mid: str) -> list[str]:
    path = lab_.state_dir("alpha") / "journal" / f"source-{mid}.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _stopped_container(lab_: Lab, ct: str) -> None:
    lab_.phaul("--host", "alpha", "ct", "create", ct)
    lab_.phaul("--host", "alpha", "ct", "start", ct, "--", "/bin/sh", "-c", "echo kept > /data")
    wait_for(lambda: _states(lab_, "alpha")[ct] == "stopped", what=f"{ct}'s command to end")


@lab
@pytest.mark.parametrize("state,step", [(st, step) for st, steps in BEFORE_START.items() for step in steps])
def test_abort_of_an_offline_move_before_the_start_rolls_back(held: Held, state: str, step: str) -> None:
    """`phaul abort` of an offline move held at `step`: rolled back, the container is on alpha
    as it was (a running one running again, a stopped one stopped with its files), and beta
    holds nothing of it."""
    lab_, ct = held.lab, f"offab-{state}"
    if state == "running":
        _start_counter(lab_, ct, 5)
    else:
        _stopped_container(lab_, ct)
    migrate = held.migrate(ct, fault=f"{step}:pause")
    mid, at = wait_paused(lab_, "alpha", migrate)
    assert at == step
    abort = held.cli("abort", mid, "--json")  # finds alpha from the ID; waits for the rollback
    wait_for(lambda: "abort-requested" in _journal_steps(lab_, mid), timeout=60, what=f"alpha to take the abort of {mid}")
    release(lab_, "alpha")
    out, err = abort.communicate(timeout=240)
    assert abort.returncode == 0, (out, err)
    shown = json.loads(out)
    assert (shown["migration_id"], shown["step"], shown["result"]) == (mid, step, "rolled_back"), shown
    report = finish(migrate)
    assert migrate.returncode == 1, report
    assert (report["result"], report["memory_method"]) == ("rolled_back", "offline"), report
    assert report["aborted_by"].startswith("admin (") and "aborted by admin" in report["error"], report

    assert where(lab_, ct).states == {"alpha": state, "beta": None}
    root = lab_.rootfs("alpha", ct)
    if state == "running":
        starts = _starts(root)  # stopped by the move at "dump": started again by the rollback
        assert len(starts) == (2 if step in STOPPED_AFTER else 1), starts
        wait_for(lambda: counter_file(lab_, "alpha", ct) > starts[-1] + 3, what="the counter to go on on alpha")
    else:
        assert (root / "data").read_text() == "kept\n"
    wait_for(lambda: not leftovers(lab_, "beta") and not leftovers(lab_, "alpha", keep_ct=ct), timeout=30,
             what=f"nothing left: beta {leftovers(lab_, 'beta')}, alpha {leftovers(lab_, 'alpha', keep_ct=ct)}")
    assert migrations(lab_, "alpha")[mid]["state"] == "rolled_back"
    assert "resume" not in _journal_steps(lab_, mid) or step == "resume"  # never told beta to start


@lab
def test_follow_an_offline_move_to_its_report(held: Held) -> None:
    """`migrations --follow` of an offline move held after the stop: the step it is at first,
    then each later step, then its end; the ended migration then shows how it ended."""
    lab_, ct = held.lab, "offfollow"
    _start_counter(lab_, ct, 5)
    migrate = held.migrate(ct, fault="transfer:pause")
    mid, _ = wait_paused(lab_, "alpha", migrate)
    follow = held.cli("--host", "alpha", "migrations", "--follow", mid, "--json")
    assert follow.stdout is not None
    first = json.loads(follow.stdout.readline())  # the last progress: the stop
    assert (first["migration_id"], first["ct"], first["event"], first["phase"]) == (mid, ct, "progress", "dump"), first
    assert (first["source"], first["destination"]) == ("alpha", "beta") and "stopping" in first["message"], first
    release(lab_, "alpha")
    out, err = follow.communicate(timeout=240)
    assert follow.returncode == 0, err
    events = [first, *(json.loads(line) for line in out.splitlines())]
    assert all(e["schema_version"] == 1 and e["migration_id"] == mid for e in events), events
    progress, end = events[:-1], events[-1]
    phases = [e["phase"] for e in progress]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == [
        "dump", "transfer", "restore", "resume", "cleanup"], phases
    assert all(e["event"] == "progress" for e in progress), progress
    assert (end["event"], end["result"], end["error"], end["aborted_by"]) == ("end", "ok", "", ""), end
    report = finish(migrate)
    assert migrate.returncode == 0 and report["result"] == "ok" and report["memory_method"] == "offline", report
    ended = json.loads(lab_.phaul("--host", "alpha", "migrations", "--follow", mid, "--json").stdout)
    assert (ended["event"], ended["result"], ended["ct"]) == ("end", "ok", ct), ended
    assert where(lab_, ct).states == {"alpha": None, "beta": "running"}
    text = lab_.phaul("--host", "alpha", "migrations", "--follow", mid).stdout
    assert f"{mid} {ct} alpha->beta: OK" in text, text
