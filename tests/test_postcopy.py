"""Post-copy in the lab (issue 12): CRIU's lazy pages through phaul's page link and uffd guard.

A container holding memload's self-verifying memory and an echo server with a client
connected moves with `--method postcopy`: one pause, the pages after the resume, every
page verified on the destination, the connection intact. Then the failure rules: a
restore that fails rolls back (the source, frozen by phaul while CRIU served pages,
runs again with its memory intact), and a destination page handler killed after the
resume kills the destination's copy instead of letting it read zeros; the result is
`failed`, said plainly.

The faults after the resume (link cut 5 s or for good, either agent killed, the source's
page server or the destination's page handler killed) are the fault matrix's `postcopy`
row: each records its outcome in the matrix's results (faultlib.fault_case), which
scripts/fault_table.py prints with tests/test_faults.py's cases.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

import faultlib
import pytest
from conftest import TEST_SUBNET, Lab, wait_for
from faultlib import (
    criu_pids,
    fault_case,
    finish,
    kill_agent,
    leftovers,
    link,
    migrate_async,
    migrations,
    recover,
    release,
    restart_agents,
    runc_state,
    wait_paused,
    where,
)
from test_precopy import _start_memload, _verify_memory

from phaul.linux import network
from phaul.testing import lab as lab_mod
from phaul.testing import probe as probes

pytestmark = pytest.mark.lab
broken_lab = faultlib.broken_lab  # the fixture: links healed, agents restarted, migrations recovered, containers removed
ECHO_PORT = 7007


def _procs(lab: Lab, host: str, what: Callable[[list[bytes]], bool]) -> dict[int, str]:
    """Processes working in `host`'s state directory whose arguments match `what`: PID -> command line."""
    state = str(lab.state_dir(host)).encode()
    found = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmdline = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            if state in cmdline and what(cmdline.split(b"\0")):
                found[int(d)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
    return found


def _lazy_daemons(lab: Lab, host: str) -> list[int]:
    """CRIU's lazy-pages daemons."""
    return list(_procs(lab, host, lambda args: args[1:2] == [b"lazy-pages"]))


def _keepers(lab: Lab, host: str) -> list[int]:
    """Post-copy keepers (phaul.memory.lazy_link keep)."""
    return list(_procs(lab, host, lambda args: args[2:4] == [b"phaul.memory.lazy_link", b"keep"]))


def _page_link_processes(lab: Lab, host: str) -> list[str]:
    """Post-copy's processes: the page link's endpoint and connections, the page hub, the
    keeper, CRIU's lazy-pages daemon."""
    return list(_procs(lab, host, lambda args: (
        b"phaul.memory.lazy_link" in args or args[1:2] == [b"lazy-pages"]
        or (os.path.basename(args[0]) == b"socat" and any(b"page-link" in a for a in args))
    )).values())


def _nothing_of_the_page_link_left(lab: Lab, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while left := _page_link_processes(lab, "alpha") + _page_link_processes(lab, "beta"):
        assert time.monotonic() < deadline, f"post-copy's processes left behind: {left}"
        time.sleep(0.2)


# Where the one copy runs once a post-copy case settled, by alpha's journal: none when the
# container was lost (the failure rules in README's "Post-copy").
RUNS_ON = {"ok": ["beta"], "failed": []}


def _settled(lab: Lab, row: dict, ct: str, mid: str, report: dict) -> None:
    """Fill in the fault matrix's row of a post-copy case (what the report said, how alpha's
    journal settled, where a copy runs) and check that the journal says where it runs."""
    result = report.get("result", "no report")
    if result == "no report" and row["fault"] == "source agent killed":
        result = "no report: agent killed"
    row.update(migration_id=mid, report=result, error=str(report.get("error") or report.get("stderr") or "")[:300])
    row["journal"] = migrations(lab, "alpha").get(mid, {}).get("state", "")
    row["runs_on"] = where(lab, ct).running
    assert row["journal"] in RUNS_ON, f"alpha's journal says {row['journal']}"
    assert row["runs_on"] == RUNS_ON[row["journal"]], f"alpha's journal says {row['journal']}, copies run on {row['runs_on']}"


def _recover(lab: Lab, row: dict, host: str, mid: str) -> list[dict]:
    """`phaul recover` as an admin runs it; the row notes when it settled something."""
    before = migrations(lab, host).get(mid, {}).get("state")
    outcomes = recover(lab, host, mid)
    if before in ("in_doubt", "in_progress") and any(not o["message"].startswith("already") for o in outcomes):
        row["recovered"] = True
    return outcomes


def _served_memload(lab: Lab, ct: str, n: int, size_mib: int, rate: float) -> probes.LongProbe:
    """`ct` on alpha at the lab's address `n`: memload (`size_mib`, rewriting `rate` MiB/s) beside
    the echo server; returns a probe holding one connection to it from the client namespace."""
    ip = lab_mod.container_address(TEST_SUBNET, n)
    lab.phaul("--host", "alpha", "ct", "create", ct, "--memory", f"{size_mib + 96}M", "--ip", f"{ip}/24")
    lab.phaul("--host", "alpha", "ct", "start", ct, "--", "/bin/sh", "-c",
              f"echo-server --port {ECHO_PORT} >/dev/null 2>&1 & exec memload --size {size_mib} --rate {rate:g}")
    wait_for(lambda: lab.exec("alpha", ct, "sh", "-c", "test -s /memload.pid && echo yes || true").strip() == "yes",
             timeout=60, what=f"memload in {ct}")
    wait_for(lambda: probes.short_probe(lab_mod.NETNS["client"], f"{ip}:{ECHO_PORT}", seconds=0.05)[0] == 0,
             timeout=30, what=f"the echo server in {ct}")
    return probes.LongProbe(lab_mod.NETNS["client"], f"{ip}:{ECHO_PORT}", "--interval-ms", "10")


def test_postcopy_moves_memory_and_a_connection(clean_lab: Lab) -> None:
    lab = clean_lab
    probe = _served_memload(lab, "pc1", 7, 256, 8)
    try:
        time.sleep(0.5)
        report = lab.migrate("pc1", "alpha", "beta", "--method", "postcopy")
        assert report["result"] == "ok", report
        assert report["memory_method"] == "postcopy", report
        assert report["postcopy_ms"] > 0, report
        assert report["postcopy_bytes"] >= 250 << 20, report  # the memory crossed after the resume
        [final] = report["rounds"]
        assert final["pages_dumped"] < 256 * 256 // 4, final  # the memory stayed behind
        assert len(report["pauses_ms"]) == 1, report
        assert probe.proc.poll() is None, probe.stop()
        time.sleep(0.5)
        rc, result = probe.stop()
        print(f"\npost-copy 256 MiB: frozen {report['frozen_ms']:.0f} ms, post-copy window {report['postcopy_ms']:.0f} ms, "
              f"client pauses {result.get('pauses_ms')}, longest gap {result.get('max_gap_ms')} ms")
        assert rc == 0, result
        assert not result["reset"] and not result["eof"] and result["wrong"] == 0 and result["missing"] == 0, result
    finally:
        probe.kill()
    assert _verify_memory(lab, "beta", "pc1").startswith("ok pages=65536")
    assert [c["id"] for c in lab.ct_list("alpha")] == []
    assert _lazy_daemons(lab, "beta") == []
    assert leftovers(lab, "alpha") == []
    veth = "link " + network.host_veth("pc1")  # the moved container's own port
    assert [x for x in leftovers(lab, "beta", keep_ct="pc1") if x != veth] == []
    _nothing_of_the_page_link_left(lab)


# A shell that forks every 50 ms (a command substitution, `mv`, `sleep`: fork, exec, exit)
# next to memload: its tasks fork throughout the post-copy window.
COUNTER = ("(i=0; while :; do i=$(( $(cat /counter 2>/dev/null || echo 0) + 1 )); echo $i > /counter.new; "
           "mv /counter.new /counter; sleep 0.05; done) & exec memload --size 64 --rate 4")


def _counter(lab: Lab, host: str, ct: str) -> int:
    return int(lab.exec(host, ct, "sh", "-c", "cat /counter 2>/dev/null || echo 0").strip() or 0)


def test_postcopy_of_a_container_that_forks(clean_lab: Lab) -> None:
    """The lazy-pages daemon closes a task's userfaultfd once its pages are all in place;
    the uffd guard once held its duplicate on, so the task's next fork waited for ever
    for a reader of its UFFD_EVENT_FORK and the post-copy never ended (issue 12)."""
    lab = clean_lab
    lab.phaul("--host", "alpha", "ct", "create", "pcf", "--memory", "160M")
    lab.phaul("--host", "alpha", "ct", "start", "pcf", "--", "/bin/sh", "-c", COUNTER)
    wait_for(lambda: lab.exec("alpha", "pcf", "sh", "-c", "test -s /memload.pid && echo yes || true").strip() == "yes",
             timeout=60, what="memload in pcf")
    wait_for(lambda: _counter(lab, "alpha", "pcf") > 5, timeout=30, what="the counter in pcf")
    report = lab.migrate("pcf", "alpha", "beta", "--method", "postcopy")
    assert report["result"] == "ok", report
    assert report["memory_method"] == "postcopy", report
    assert report["postcopy_ms"] > 0, report
    [final] = report["rounds"]
    assert final["pages_dumped"] < 64 * 256, final  # memload's memory stayed behind for the window
    assert _verify_memory(lab, "beta", "pcf").startswith("ok pages=16384")
    after = _counter(lab, "beta", "pcf")
    wait_for(lambda: _counter(lab, "beta", "pcf") > after + 5, timeout=30, what="the counter to go on on beta")
    assert [c["id"] for c in lab.ct_list("alpha")] == []
    assert _lazy_daemons(lab, "beta") == [] and _keepers(lab, "beta") == []
    assert leftovers(lab, "alpha") == []
    _nothing_of_the_page_link_left(lab)


def test_postcopy_restore_failure_rolls_back(clean_lab: Lab) -> None:
    """CRIU already serves the pages when the restore fails: the source gives up its page
    server, its frozen tree runs again, and its memory is intact."""
    lab = clean_lab
    _start_memload(lab, "pcrb", 64, 4)
    report = lab.migrate("pcrb", "alpha", "beta", "--method", "postcopy", fault="restore:damage-image", check=False)
    assert report["result"] == "rolled_back", report
    [info] = lab.ct_list("alpha")
    assert info["state"] == "running", info
    assert _verify_memory(lab, "alpha", "pcrb").startswith("ok pages=16384")
    assert lab.ct_list("beta") == []
    assert _lazy_daemons(lab, "beta") == []
    assert leftovers(lab, "alpha", keep_ct="pcrb") == [] and leftovers(lab, "beta") == []
    _nothing_of_the_page_link_left(lab)


@pytest.mark.parametrize("killed", ["destination page handler", "source page server"])
def test_postcopy_page_source_killed_after_the_resume(broken_lab: Lab, killed: str) -> None:
    """The destination runs, pages still arriving; its lazy-pages daemon, or the source's
    CRIU serving the pages, is killed. The keeper, holding every userfaultfd, kills the
    copy before any task can fault on a page that never came; the migration is `failed`,
    the container lost, and the report says so."""
    lab = broken_lab
    ct = "pclost" if killed.startswith("destination") else "pcsrc"
    fault = "destination page handler killed" if killed.startswith("destination") else "source page source killed"
    with fault_case("postcopy", fault, ct) as row:
        _start_memload(lab, ct, 512, 4)
        proc = migrate_async(lab, ct, "alpha", "beta", "--method", "postcopy", fault="postcopy:pause")
        try:
            mid, _ = wait_paused(lab, "alpha", proc)
            victims = _lazy_daemons(lab, "beta") if killed.startswith("destination") else criu_pids(lab, "alpha")
            assert victims, f"no {killed} while pages are due"
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
        finally:
            release(lab, "alpha")
        report = finish(proc)
        assert report["result"] == "failed", report
        assert "lost" in report["error"] and "killed" in report["error"], report["error"]
        print(f"\npost-copy, {killed} killed: {report['result']}: {report['error'][:300]}")
        assert not any(c["state"] == "running" for c in lab.ct_list("beta")), lab.ct_list("beta")
        assert [c["id"] for c in lab.ct_list("alpha")] == []
        assert _lazy_daemons(lab, "beta") == []
        _settled(lab, row, ct, mid, report)  # no copy runs: no memory to check
        # the file system stays on beta, the copy stopped: `ct start` would boot it afresh
        assert leftovers(lab, "alpha") == [] and leftovers(lab, "beta", keep_ct=ct) == []
        _nothing_of_the_page_link_left(lab)


def test_hybrid_sends_only_what_changed_after_the_resume(clean_lab: Lab) -> None:
    """Pre-copy rounds, then post-copy: after the resume only the pages that differ from
    the last round cross the link (the rest the destination rebuilds from that round's
    images), every page right on the destination, the client's connection intact."""
    lab = clean_lab
    probe = _served_memload(lab, "pchy", 8, 128, 2)
    try:
        time.sleep(0.5)
        report = lab.migrate("pchy", "alpha", "beta", "--method", "hybrid")
        assert report["result"] == "ok", report
        assert report["memory_method"] == "hybrid", report
        rounds = report["rounds"]
        assert len(rounds) >= 2 and rounds[0]["pages_sent"] > 128 * 256, rounds  # a round sent the memory
        assert rounds[-1]["pages_dumped"] < 128 * 256 // 4, rounds[-1]  # the final dump left it behind
        assert 0 < report["postcopy_bytes"] < (128 << 20) // 4, report  # what changed since the round only
        time.sleep(0.5)
        rc, result = probe.stop()
        print(f"\nhybrid 128 MiB rewriting 2 MiB/s: {len(rounds) - 1} rounds, pauses {report['pauses_ms']} ms, "
              f"after the resume {report['postcopy_bytes']} bytes in {report['postcopy_ms']:.0f} ms; "
              f"client pauses {result.get('pauses_ms')}")
        assert rc == 0, result
        assert not result["reset"] and not result["eof"] and result["wrong"] == 0 and result["missing"] == 0, result
    finally:
        probe.kill()
    assert _verify_memory(lab, "beta", "pchy").startswith("ok pages=32768")
    assert [c["id"] for c in lab.ct_list("alpha")] == []
    assert leftovers(lab, "alpha") == []
    veth = "link " + network.host_veth("pchy")
    assert [x for x in leftovers(lab, "beta", keep_ct="pchy") if x != veth] == []
    _nothing_of_the_page_link_left(lab)


@pytest.mark.parametrize("cut_s", [5, 15])
def test_postcopy_link_cut_finishes(broken_lab: Lab, cut_s: int) -> None:
    """The link between the hosts cut while pages are due: the faulting tasks wait (nothing
    is filled in) and the transfer finishes with every page right. 5 s: the page link's TCP
    connection outlives the cut (it gives up only after twice --link-timeout, 10 s in the
    lab). 15 s: it does not; the destination dials the link again and sends its unanswered
    requests again (post-copy recovery), and the source's page hub takes the new connection.
    The 5 s cut is the fault matrix's `postcopy` x `link cut 5 s`."""
    lab = broken_lab
    ct = f"pccut{cut_s}"
    case = fault_case("postcopy", "link cut 5 s", ct) if cut_s == 5 else contextlib.nullcontext({"fault": ""})
    with case as row:
        _start_memload(lab, ct, 512, 4)
        proc = migrate_async(lab, ct, "alpha", "beta", "--method", "postcopy", fault="postcopy:pause")
        try:
            mid, _ = wait_paused(lab, "alpha", proc)
            link("alpha", up=False)
            release(lab, "alpha")
            time.sleep(cut_s)
        finally:
            link("alpha", up=True)
            release(lab, "alpha")
        report = finish(proc)
        assert report["result"] == "ok", report
        print(f"\npost-copy through a {cut_s} s cut: window {report['postcopy_ms']:.0f} ms, "
              f"{report['postcopy_bytes']} bytes after the resume")
        assert report["postcopy_ms"] > (cut_s - 1) * 1000, report
        _settled(lab, row, ct, mid, report)
        assert _verify_memory(lab, "beta", ct).startswith("ok pages=131072")
        assert [c["id"] for c in lab.ct_list("alpha")] == []
        assert leftovers(lab, "alpha") == [] and leftovers(lab, "beta", keep_ct=ct) == []
        _nothing_of_the_page_link_left(lab)


def test_postcopy_source_agent_killed(broken_lab: Lab) -> None:
    """The source agent dies while pages are due. CRIU and the page link outlive it, so the
    transfer goes on; the restarted agent never resumes the frozen source tree (it was
    committed): it destroys it, and the container runs on beta with every page right."""
    lab = broken_lab
    with fault_case("postcopy", "source agent killed", "pcagent") as row:
        _start_memload(lab, "pcagent", 256, 4)
        proc = migrate_async(lab, "pcagent", "alpha", "beta", "--method", "postcopy", fault="postcopy:pause")
        try:
            mid, _ = wait_paused(lab, "alpha", proc)
            kill_agent(lab, "alpha")
        finally:
            release(lab, "alpha")
        report = finish(proc)
        restart_agents(lab)
        row["restarted"] = ["alpha"]
        wait_for(lambda: where(lab, "pcagent").running == ["beta"] and runc_state(lab, "alpha", "pcagent") is None,
                 timeout=120, what="the source settled by its restarted agent")
        outcomes = _recover(lab, row, "alpha", mid)
        assert all(o["result"] in ("ok", "in_progress") for o in outcomes), outcomes
        wait_for(lambda: migrations(lab, "alpha").get(mid, {}).get("state") == "ok", timeout=120,
                 what="alpha's journal to settle the migration")
        _settled(lab, row, "pcagent", mid, report)
        assert _verify_memory(lab, "beta", "pcagent").startswith("ok pages=65536")
        assert where(lab, "pcagent").running == ["beta"]
        wait_for(lambda: leftovers(lab, "alpha") == [] and leftovers(lab, "beta", keep_ct="pcagent") == [],
                 timeout=60, what="nothing left of the migration")
        _nothing_of_the_page_link_left(lab)


def test_postcopy_destination_agent_killed(broken_lab: Lab) -> None:
    """The destination agent dies while pages are due. Its keeper (lazy-pages daemon, uffd
    guard, page link) outlives it, so the transfer goes on; the restarted agent takes the
    migration up from its journal and settles it once the keeper is done: the container
    runs on beta with every page right, and nothing is left on either host."""
    lab = broken_lab
    with fault_case("postcopy", "dest agent killed", "pcdest") as row:
        _start_memload(lab, "pcdest", 256, 4)
        proc = migrate_async(lab, "pcdest", "alpha", "beta", "--method", "postcopy", fault="postcopy:pause")
        try:
            mid, _ = wait_paused(lab, "alpha", proc)
            assert _keepers(lab, "beta"), "no keeper on beta while pages are due"
            kill_agent(lab, "beta")
        finally:
            release(lab, "alpha")
        report = finish(proc)
        assert report["result"] in ("ok", "in_doubt"), report
        restart_agents(lab)
        row["restarted"] = ["beta"]
        wait_for(lambda: not _keepers(lab, "beta"), timeout=120, what="beta's keeper to finish the transfer")
        for host in ("beta", "alpha"):
            outcomes = _recover(lab, row, host, mid)
            assert all(o["result"] in ("ok", "in_progress") for o in outcomes), (host, outcomes)
        wait_for(lambda: where(lab, "pcdest").running == ["beta"] and runc_state(lab, "alpha", "pcdest") is None,
                 timeout=120, what="the migration settled")
        wait_for(lambda: migrations(lab, "alpha").get(mid, {}).get("state") == "ok", timeout=120,
                 what="alpha's journal to settle the migration")
        _settled(lab, row, "pcdest", mid, report)
        assert _verify_memory(lab, "beta", "pcdest").startswith("ok pages=65536")
        wait_for(lambda: leftovers(lab, "alpha") == [] and leftovers(lab, "beta", keep_ct="pcdest") == [],
                 timeout=60, what="nothing left of the migration")
        _nothing_of_the_page_link_left(lab)


def test_postcopy_link_cut_for_good_loses_the_container_plainly(broken_lab: Lab) -> None:
    """The link cut for longer than the page link survives (twice --link-timeout): the
    keeper, still holding every userfaultfd, kills beta's copy before any task reads a
    page that never came; the source kills its frozen tree. No copy runs anywhere, none
    ever ran on zeros, and once the link is back the migration settles as `failed`."""
    lab = broken_lab
    with fault_case("postcopy", "link cut for good", "pcgone") as row:
        _start_memload(lab, "pcgone", 512, 4)
        proc = migrate_async(lab, "pcgone", "alpha", "beta", "--method", "postcopy", fault="postcopy:pause")
        try:
            mid, _ = wait_paused(lab, "alpha", proc)
            link("alpha", up=False)
            release(lab, "alpha")
            wait_for(lambda: not _keepers(lab, "beta"), timeout=120, what="beta's keeper to give up")
            assert not any(c["state"] == "running" for c in lab.ct_list("beta")), lab.ct_list("beta")
        finally:
            link("alpha", up=True)
            release(lab, "alpha")
        report = finish(proc)
        print(f"\npost-copy, link cut for good: {report['result']}: {str(report.get('error'))[:300]}")
        assert report["result"] in ("failed", "in_doubt", "no report"), report
        if report["result"] == "failed":
            assert "lost" in report["error"], report["error"]
        for host in ("alpha", "beta"):
            outcomes = _recover(lab, row, host, mid)
            assert all(o["result"] in ("failed", "ok") for o in outcomes), (host, outcomes)
            assert any(o["result"] == "failed" for o in outcomes) or host == "alpha", (host, outcomes)
        _settled(lab, row, "pcgone", mid, report)  # no copy runs: no memory to check
        assert row["journal"] == "failed", row
        assert [c["id"] for c in lab.ct_list("alpha")] == []
        assert _lazy_daemons(lab, "beta") == []
        assert leftovers(lab, "alpha") == [] and leftovers(lab, "beta", keep_ct="pcgone") == []
        _nothing_of_the_page_link_left(lab)
