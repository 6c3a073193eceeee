"""Evacuation's logic without agents: placement, its order and reasons, the outcome's exit
code and JSON, and the lease store of the inventory seam. The evacuation itself runs in
the lab (tests/test_evacuate.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from phaul import output
from phaul.errors import Conflict, ExitCode, InvalidInput
from phaul.fleet.evacuate import Evacuation, Outcome, Row
from phaul.fleet.inventory import FileLeases, HostsFileInventory
from phaul.fleet.placement import Capacity, Movable, Verdict, ordered, parallel, plan
from phaul.hosts import HostEntry, HostsFile, PkiFiles
from tests.test_json_schemas import check

MiB = 1 << 20
OK = Verdict(True)


def _cts(*sizes: int) -> list[Movable]:
    return [Movable(f"c{i}", s * MiB, s * MiB) for i, s in enumerate(sizes)]


def test_smallest_first_and_spread_by_memory_left() -> None:
    cts = _cts(300, 100, 200, 50)
    dests = [Capacity("beta", 1000 * MiB, 0), Capacity("gamma", 1000 * MiB, 400 * MiB)]
    verdicts = {(c.ct, d.name): OK for c in cts for d in dests}
    placements = plan(cts, dests, verdicts)
    assert [p.ct for p in placements] == [c.ct for c in ordered(cts)] == ["c3", "c1", "c2", "c0"]
    # beta has 1000 MiB left, gamma 600: beta keeps the most left after 50, 100 and 200 (650 > 600)
    assert [p.dest for p in placements] == ["beta", "beta", "beta", "beta"]
    dests = [Capacity("beta", 1000 * MiB, 0), Capacity("gamma", 1000 * MiB, 0)]
    placements = plan(cts, dests, verdicts)
    assert [p.dest for p in placements] == ["beta", "gamma", "beta", "gamma"]
    assert "most memory left" in placements[0].reason and "also fit: gamma" in placements[0].reason


def test_a_refused_or_full_destination_is_skipped_and_named() -> None:
    cts = _cts(100, 800)
    dests = [Capacity("beta", 1000 * MiB, 0), Capacity("gamma", 500 * MiB, 0)]
    verdicts = {("c0", "beta"): Verdict(False, "ct-id: beta already has a container c0"), ("c0", "gamma"): OK,
                ("c1", "beta"): OK, ("c1", "gamma"): OK}  # fmt: skip
    by_ct = {p.ct: p for p in plan(cts, dests, verdicts)}
    assert by_ct["c0"].dest == "gamma"
    assert by_ct["c1"].dest == "beta"  # gamma has 400 MiB left, c1 needs 800
    verdicts[("c1", "beta")] = Verdict(False, "cpu: beta lacks avx2")
    stuck = {p.ct: p for p in plan(cts, dests, verdicts)}["c1"]
    assert stuck.dest is None
    assert "beta: cpu: beta lacks avx2" in stuck.reason and "gamma: 400 MiB left there, it needs 800 MiB" in stuck.reason
    assert plan(cts, dests, {})[0].reason.startswith("beta: not checked")


def _evacuation(*outcomes: Outcome, dry_run: bool = False) -> Evacuation:
    rows = [Row(f"c{i}", "beta" if o != Outcome.STAYED else None, o, "why") for i, o in enumerate(outcomes)]
    return Evacuation("alpha", rows, 1, dry_run)


@pytest.mark.parametrize(("outcomes", "dry_run", "code"), [
    ((Outcome.MOVED, Outcome.MOVED), False, ExitCode.OK),
    ((), False, ExitCode.OK),
    ((Outcome.MOVED, Outcome.STAYED), False, ExitCode.FAILED),
    ((Outcome.MOVED, Outcome.ROLLED_BACK), False, ExitCode.FAILED),
    ((Outcome.MOVED, Outcome.NOT_STARTED), False, ExitCode.FAILED),
    ((Outcome.STAYED, Outcome.IN_DOUBT), False, ExitCode.IN_DOUBT),
    ((Outcome.PLANNED, Outcome.PLANNED), True, ExitCode.OK),
    ((Outcome.PLANNED, Outcome.STAYED), True, ExitCode.FAILED),
])  # fmt: skip
def test_exit_code(outcomes: tuple[Outcome, ...], dry_run: bool, code: ExitCode) -> None:
    assert _evacuation(*outcomes, dry_run=dry_run).exit_code() == code


def test_json_and_table() -> None:
    e = _evacuation(Outcome.MOVED, Outcome.STAYED, Outcome.IN_DOUBT)
    e.rows[0].pause_longest_ms, e.rows[0].pause_total_ms, e.rows[0].bytes_sent = 612.0, 900.5, 7 * MiB
    doc = check("evacuation", output.dumps(output.evacuation(e)))
    assert [c["outcome"] for c in doc["containers"]] == ["ok", "stayed", "in_doubt"] and doc["exit_code"] == 3
    table = e.to_table()
    assert "612 ms" in table and "7.0 MiB" in table and "1 in_doubt, 1 ok, 1 stayed" in table


def test_leases_one_holder_at_a_time(tmp_path: Path) -> None:
    leases = FileLeases(tmp_path / "leases")
    lease = leases.acquire("web", "beta", 60)
    assert leases.current("web") == lease and lease.live()
    with pytest.raises(Conflict, match="held by beta"):
        leases.acquire("web", "gamma", 60)
    assert leases.acquire("web", "beta", 120).expires > lease.expires  # renewal
    leases.release("web", "gamma")  # not its holder: nothing happens
    assert leases.current("web") is not None
    leases.release("web", "beta")
    assert leases.current("web") is None
    leases.acquire("web", "gamma", 0.05)
    time.sleep(0.1)
    assert leases.current("web") is None
    assert leases.acquire("web", "beta", 60).holder == "beta"  # an expired lease is taken over
    with pytest.raises(InvalidInput):
        leases.acquire("web", "beta", 0)
    with pytest.raises(InvalidInput):
        leases.acquire("../etc", "beta", 10)


def test_hosts_file_inventory() -> None:
    pki = PkiFiles(Path("ca"), Path("c"), Path("k"))
    hf = HostsFile(Path("/x/hosts.json"), None, pki, {n: HostEntry(n, f"10.0.0.{i}:7473") for i, n in
                                                     enumerate(("gamma", "alpha", "beta"))})
    inv = HostsFileInventory(hf)
    assert [h.name for h in inv.hosts()] == ["alpha", "beta", "gamma"] and inv.host("beta").port == 7473


def test_parallel_from_measured_costs() -> None:
    """At most one per destination; as many as the link carries within one restore's time."""
    cts = _cts(10, 10, 10, 10)
    dests = [Capacity("beta", 1000 * MiB, 0), Capacity("gamma", 1000 * MiB, 0), Capacity("delta", 1000 * MiB, 0)]

    def with_costs(send_ms: float, restore_ms: float) -> int:
        verdicts = {(c.ct, d.name): Verdict(True, "", send_ms, restore_ms) for c in cts for d in dests}
        return parallel(plan(cts, dests, verdicts), verdicts)

    assert with_costs(40, 400) == 3  # small containers: the link carries ten in a restore's time; 3 destinations
    assert with_costs(200, 400) == 2
    assert with_costs(900, 400) == 1  # large ones: one at a time, never below 1
    assert with_costs(0, 400) == 3
    one_dest = {(c.ct, "beta"): Verdict(True, "", 10, 400) for c in cts}
    assert parallel(plan(cts, dests[:1], one_dest), one_dest) == 1
    assert parallel([], {}) == 1
