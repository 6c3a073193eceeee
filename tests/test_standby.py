"""Standby copies and failover (phaul.standby) in the lab.

A marked counter on alpha gets a standby on beta refreshed every 2 s: status shows the
recovery point and each refresh's bytes and pause, the counter keeps running on alpha
(its value in memory unchanged: a refresh never restarts it) and nothing runs on beta.
A failover while alpha answers and runs it is refused. Then alpha "dies" (its agent and
the container's processes killed): a failover without --fenced is refused, one with it
runs the container on beta from its last checkpoint (the same value in memory, the
counter no older than a checkpoint taken after a value read before the death). alpha's
agent, restarted, learns that it failed over and keeps its stale copy stopped (`ct
start` refuses it); the standby can then be rebuilt the other way, beta -> alpha.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Lab, wait_for
from faultlib import (  # noqa: F401 (broken_lab is a fixture)
    broken_lab,
    counter_file,
    kill_agent,
    read_memory_mark,
    restart_agents,
    runc_state,
    start_counter,
)

from phaul.containers import ContainerConfig
from phaul.errors import Conflict, NotFound
from phaul.migration.dest import Incoming
from phaul.rpc import phaul_pb2 as pb
from phaul.standby.basis import Bases
from phaul.standby.cli import status_rows
from phaul.standby.store import FAILED_OVER_MARK, StandbyStore
from test_precopy import _start_memload, _verify_memory

from tests.test_json_schemas import check

CT = "sb1"


def _status(lab: Lab) -> list[dict]:
    return check("standby-status", lab.phaul("standby", "status", "--json").stdout)["standbys"]  # type: ignore[no-any-return]


def _row(lab: Lab, standby: str = "beta") -> dict:
    rows = [r for r in _status(lab) if r["ct"] == CT and r["standby"] == standby]
    return rows[0] if rows else {}


@pytest.fixture
def standby_lab(broken_lab: Lab) -> Iterator[Lab]:  # noqa: F811 (the fixture)
    """The lab; afterwards every standby is removed (both sides), by force if need be."""
    yield broken_lab
    for host in ("alpha", "beta"):
        broken_lab.phaul("--host", host, "standby", "stop", CT, check=False)
        for sub in ("standby-out", "standby"):
            shutil.rmtree(broken_lab.state_dir(host) / sub, ignore_errors=True)


@pytest.mark.lab
def test_standby_then_failover_when_alpha_dies(standby_lab: Lab) -> None:
    lab = standby_lab
    mark = start_counter(lab, CT)
    lab.phaul("--host", "alpha", "standby", CT, "beta", "--interval", "2", "--max-lag", "30")
    wait_for(lambda: (_row(lab).get("refreshes") or 0) >= 2, timeout=180, what="two refreshes")
    row = _row(lab)
    print(json.dumps(row, indent=2))
    assert row["reported_by"] == "primary" and row["state"] == "active" and row["error"] == "", row
    assert row["checkpoint_at"] is not None and row["recovery_point_s"] is not None, row
    assert row["refresh_bytes"] > 0 and row["pause_ms"] > 0 and row["interval_s"] == 2, row
    text = lab.phaul("standby", "status").stdout
    print(text)
    assert "RECOVERY POINT" in text and "LAG" in text and CT in text
    # the container runs on alpha, the same process (its value in memory), and never on beta
    assert read_memory_mark(lab, "alpha", CT) == mark
    assert CT not in {c["id"] for c in lab.ct_list("beta")}

    # alpha answers and runs it: refused, with or without --fenced; nothing changes
    for extra in ((), ("--fenced",)):
        refused = lab.phaul("failover", CT, *extra, check=False)
        assert refused.returncode == 2, refused.stderr
        assert "runs on alpha" in refused.stderr and "phaul --host alpha migrate" in refused.stderr, refused.stderr
    assert CT not in {c["id"] for c in lab.ct_list("beta")}
    assert runc_state(lab, "alpha", CT) == "running"
    # a migration would leave the standby stale: refused while it is active
    moved = lab.migrate(CT, "alpha", "beta", check=False)
    assert moved["exit"] == 2 and "standby stop" in moved["stderr"], moved

    # a value read now is in every checkpoint taken from the next refresh on
    before = counter_file(lab, "alpha", CT)
    done = _row(lab)["refreshes"]
    wait_for(lambda: (_row(lab).get("refreshes") or 0) >= done + 1, timeout=60, what="a refresh after the read")
    # alpha "dies": its agent, then the container's processes
    kill_agent(lab, "alpha")
    subprocess.run(["runc", "--root", str(lab.state_dir("alpha") / "runc"), "kill", CT, "KILL"], check=True)
    wait_for(lambda: runc_state(lab, "alpha", CT) != "running", what="alpha's copy to die")
    last = counter_file(lab, "alpha", CT)

    unfenced = lab.phaul("failover", CT, "--to", "beta", check=False)
    assert unfenced.returncode == 2 and "does not answer" in unfenced.stderr and "--fenced" in unfenced.stderr, unfenced.stderr
    done_json = check("failover", lab.phaul("failover", CT, "--fenced", "--json").stdout)
    print(json.dumps(done_json, indent=2))
    assert done_json["primary"] == "alpha" and done_json["fence"] == "admin", done_json
    # beta runs it from the checkpoint: the same process state, the counter from where the checkpoint was
    assert read_memory_mark(lab, "beta", CT) == mark
    resumed = lab.counter("beta", CT)
    assert before <= resumed, (before, resumed, last)
    wait_for(lambda: lab.counter("beta", CT) > resumed, what="the counter to go on on beta")
    rows = [r for r in _status(lab) if r["ct"] == CT]
    assert rows and all(r["state"] == "failed-over" for r in rows), rows

    # alpha comes back: its agent learns it failed over and keeps its stale copy stopped
    restart_agents(lab)
    wait_for(lambda: _row(lab).get("reported_by") == "primary" and _row(lab).get("state") == "failed-over",
             timeout=60, what="alpha's agent to learn of the failover")
    assert runc_state(lab, "alpha", CT) != "running"
    stale = lab.phaul("--host", "alpha", "ct", "start", CT, check=False)
    assert stale.returncode == 2 and "failed over to beta" in stale.stderr, stale.stderr
    assert runc_state(lab, "alpha", CT) != "running" and read_memory_mark(lab, "beta", CT) == mark  # one copy runs

    # protection the other way: beta -> alpha, once alpha's stale copy is gone
    kept = lab.phaul("--host", "alpha", "standby", "stop", CT, check=False)  # the stale copy is still there
    assert kept.returncode == 2 and "ct destroy" in kept.stderr, kept.stderr
    lab.phaul("--host", "alpha", "ct", "destroy", CT)
    lab.phaul("--host", "alpha", "standby", "stop", CT)
    lab.phaul("--host", "beta", "standby", CT, "alpha", "--interval", "2")
    wait_for(lambda: (_row(lab, "alpha").get("refreshes") or 0) >= 1, timeout=120, what="a refresh beta -> alpha")
    assert _row(lab, "alpha")["primary"] == "beta"
    assert CT not in {c["id"] for c in lab.ct_list("alpha")}
    lab.phaul("--host", "beta", "standby", "stop", CT)
    assert _row(lab, "alpha") == {}


@pytest.mark.lab
def test_failover_from_a_live_primary_that_stopped_the_container(standby_lab: Lab) -> None:
    """alpha's agent answers and CT is stopped there: the failover goes on without --fenced,
    alpha marks its copy stale at once, and it cannot be started again: one copy runs."""
    lab = standby_lab
    mark = start_counter(lab, CT)
    lab.phaul("--host", "alpha", "standby", CT, "beta", "--interval", "2")
    wait_for(lambda: (_row(lab).get("refreshes") or 0) >= 1, timeout=120, what="a refresh")
    lab.phaul("--host", "alpha", "ct", "stop", CT)
    done = check("failover", lab.phaul("failover", CT, "--json").stdout)
    assert done["fence"] == "primary-stopped" and done["primary"] == "alpha", done
    assert read_memory_mark(lab, "beta", CT) == mark
    assert _row(lab)["reported_by"] == "primary" and _row(lab)["state"] == "failed-over"
    stale = lab.phaul("--host", "alpha", "ct", "start", CT, check=False)
    assert stale.returncode == 2 and "failed over to beta" in stale.stderr, stale.stderr
    assert runc_state(lab, "alpha", CT) != "running"
    again = lab.phaul("failover", CT, "--to", "beta", check=False)  # nothing left to fail over
    assert again.returncode == 2 and "keeps no standby" in again.stderr, again.stderr


@pytest.mark.lab
def test_refreshes_send_page_deltas_and_the_failover_runs_their_sum(standby_lab: Lab) -> None:
    """From the second refresh on only the pages that changed travel (against the last kept
    checkpoint, which alpha keeps as the basis); beta rebuilds each checkpoint from the last
    one, and a failover from it runs memload with every page right."""
    lab = standby_lab
    ct = "sbmem"
    _start_memload(lab, ct, 64, 1)
    lab.phaul("--host", "alpha", "standby", ct, "beta", "--interval", "2")
    basis = lab.state_dir("alpha") / "standby-out" / "basis" / ct
    report_file = lab.state_dir("alpha") / "standby-out" / "reports" / f"{ct}.json"

    def last_report() -> dict:
        return json.loads(report_file.read_text()) if report_file.exists() else {}

    wait_for(lambda: last_report().get("memory_method") == "standby-page-delta", timeout=120, what="a delta refresh")
    report = last_report()
    print(json.dumps(report, indent=2))
    assert report["result"] == "ok", report
    memory_bytes = report["bytes_sent"] - report["fs_bytes_sent"]
    assert 0 < memory_bytes < (64 << 20) // 4, report  # 64 MiB of memory, about 1 MiB/s rewritten
    assert (basis / "images").is_dir()
    lab.phaul("--host", "alpha", "ct", "stop", ct)
    done = check("failover", lab.phaul("failover", ct, "--json").stdout)
    assert done["fence"] == "primary-stopped", done
    verdict = _verify_memory(lab, "beta", ct)
    assert verdict.startswith("ok pages=16384"), verdict
    assert not basis.exists()  # a failed-over standby's basis goes


def test_status_rows_prefer_the_primary_and_fit_the_schema() -> None:
    primary = pb.StandbyInfo(ct="web", role="primary", primary="alpha", standby="beta", interval_s=5, max_lag_s=15,
                             checkpoint_at=1000.0, refresh_bytes=4096, pause_ms=80, refreshes=3, state="active")
    seen_by_beta = pb.StandbyInfo(ct="web", role="standby", primary="alpha", standby="beta", checkpoint_at=1000.0,
                                  state="active")
    orphan = pb.StandbyInfo(ct="db", role="standby", primary="gamma", standby="beta", state="active")
    rows = status_rows([seen_by_beta, primary, orphan], now=1020.0)
    by_ct = {r["ct"]: r for r in rows}
    assert by_ct["web"]["reported_by"] == "primary" and by_ct["web"]["recovery_point_s"] == 20.0
    assert by_ct["web"]["late"]  # 20 s > --max-lag 15 s
    assert by_ct["db"]["reported_by"] == "standby" and by_ct["db"]["late"] and by_ct["db"]["interval_s"] is None
    from phaul import output

    check("standby-status", output.dumps(output.standby_status(rows)))


def _refresh_dir(tmp: Path, mid: str, content: str) -> Incoming:
    """A refresh as Destination.keep hands it over: recv/ct with a root file system, recv/images."""
    d = tmp / "incoming" / mid
    (d / "recv" / "ct" / "bundle" / "rootfs").mkdir(parents=True)
    (d / "recv" / "ct" / "bundle" / "rootfs" / "data").write_text(content)
    (d / "recv" / "images").mkdir(parents=True)
    (d / "recv" / "images" / "inventory.img").write_text(content)
    return Incoming(mid, "web", "alpha", d, config=ContainerConfig(id="web"), source_address="10.0.0.1:7473")


def test_the_store_keeps_one_complete_checkpoint_and_its_tombstone(tmp_path: Path) -> None:
    store = StandbyStore(tmp_path, "beta")
    assert store.current("web") is None and store.list() == []
    first = store.keep(_refresh_dir(tmp_path, "m1", "one"), 100.0)
    assert store.current("web") == first and first.config.id == "web"
    # the next refresh is seeded with hard links of the kept files; a changed file replaced (as rsync does)
    # leaves the kept checkpoint as it was until the new one is kept whole
    nxt = _refresh_dir(tmp_path, "m2", "")
    for area in (nxt.ct_dir, nxt.images_dir):
        shutil.rmtree(area)
        area.mkdir()
    # the images too, when the source holds the kept checkpoint as its page delta's basis
    assert store.seed("web", nxt.ct_dir, nxt.images_dir, "m0") == ""  # not the kept one: sent whole
    assert list(nxt.images_dir.iterdir()) == []
    for area in (nxt.ct_dir, nxt.images_dir):
        shutil.rmtree(area)
        area.mkdir()
    assert store.seed("web", nxt.ct_dir, nxt.images_dir, "m1") == "m1"
    assert (nxt.images_dir / "inventory.img").read_text() == "one"
    seeded = nxt.ct_dir / "bundle" / "rootfs" / "data"
    assert seeded.read_text() == "one" and seeded.stat().st_nlink == 2
    seeded.unlink()
    seeded.write_text("two")
    assert (store.gen_dir(first) / "recv" / "ct" / "bundle" / "rootfs" / "data").read_text() == "one"
    assert store.current("web") == first  # not kept yet: the recovery point is still the first
    second = store.keep(nxt, 200.0)
    assert store.current("web") == second and not store.gen_dir(first).exists()
    # a refresh from another primary is refused; so is one once the container failed over here
    with pytest.raises(Conflict, match="for alpha, not gamma"):
        store.check_refresh("web", "gamma")
    kept, m = store.take("web")
    assert kept == second and m.ct_dir == store.gen_dir(second) / "recv" / "ct" and m.config == kept.config
    store.mark_failed_over(kept)
    with pytest.raises(Conflict, match=FAILED_OVER_MARK):
        store.check_refresh("web", "alpha")
    late = _refresh_dir(tmp_path, "m3", "three")  # a refresh that was under way: never kept now
    with pytest.raises(Conflict, match=FAILED_OVER_MARK):
        store.keep(late, 300.0)
    assert store.current("web") == second and not late.dir.exists()
    store.failed_over_done("web")
    assert store.current("web") is None and [t for _, t in store.list()][0]["from"] == "alpha"
    with pytest.raises(NotFound):
        store.take("web")
    store.drop("web", "alpha")  # the old primary's `standby stop`: the tombstone goes too
    assert store.list() == []


def test_the_basis_names_its_host_and_refresh(tmp_path: Path) -> None:
    bases = Bases(tmp_path)
    assert bases.get("web", "beta") is None
    images = tmp_path / "checkpoint"
    images.mkdir()
    (images / "pages-1.img").write_bytes(b"p" * 4096)
    bases.replace("web", "beta", images, "m1")
    b = bases.get("web", "beta")
    assert b is not None and b.gen == "m1" and (b.images / "pages-1.img").read_bytes() == b"p" * 4096
    assert not images.exists()
    assert bases.get("web", "gamma") is None  # another standby host: no basis, the images go whole
    (b.images.parent / "basis.json").write_text('{"host": "beta", "gen": "../x"}')
    assert bases.get("web", "beta") is None
    bases.drop("web")
    assert not (tmp_path / "standby-out" / "basis" / "web").exists()
