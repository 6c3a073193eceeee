"""Offline moves and cold copies (issue 13, phaul.migration.offline), for real in the lab:
`phaul migrate --offline` of a running counter, a plain `phaul migrate` of a stopped
container, a failure before the destination's start rolled back, and `phaul copy`
with its own ID and address, refused where it would clash. The few tests without
the lab check a copy's configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import COUNT_STEP, TEST_SUBNET, Lab, wait_for
from faultlib import counter_file, ensure_agents, leftovers, migrations, recover, where

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
