"""`phaul check` and the preflight of `phaul migrate`, in the lab."""

from __future__ import annotations

import json
import re

import pytest

from conftest import COUNTER, Lab, wait_for
from phaul.checks import CheckResult, CheckState
from phaul.migration import preflight

pytestmark = pytest.mark.lab


def _start(lab: Lab, ct: str, host: str = "alpha") -> None:
    lab.phaul("--host", host, "ct", "create", ct, "--memory", "64M")
    lab.phaul("--host", host, "ct", "start", ct, "--", *COUNTER)
    wait_for(lambda: lab.counter(host, ct) > 1, what=f"{ct} to run")


def test_check_reports_every_check_on_both_hosts(clean_lab: Lab) -> None:
    lab = clean_lab
    _start(lab, "pf1")
    proc = lab.phaul("--host", "alpha", "check", "pf1", "beta", "--json")
    rows = json.loads(proc.stdout)["checks"]
    by = {(r["name"], r["host"]): r for r in rows}
    for name in ("container", "objects", "criu", "runc", "agent"):
        assert by[(name, "alpha")]["status"] == "pass", by[(name, "alpha")]
    for name in ("criu", "cpu", "memory", "disk", "ct-id", "address", "bridge", "runc"):
        assert by[(name, "beta")]["status"] == "pass", by[(name, "beta")]
    assert "criu cpuinfo check" in by[("cpu", "beta")]["message"]
    assert {r["status"] for r in rows} <= {"pass", "warning", "failure"}
    text = lab.phaul("--host", "alpha", "check", "pf1", "beta").stdout
    assert "pf1 can move to beta" in text and re.search(r"^criu +alpha +pass ", text, re.M), text  # doctor's words


def test_failures_stop_migrate_unless_forced(clean_lab: Lab) -> None:
    lab = clean_lab
    _start(lab, "pf2")
    lab.phaul("--host", "beta", "ct", "create", "pf2")
    proc = lab.phaul("--host", "alpha", "check", "pf2", "beta", "--json", check=False)
    assert proc.returncode == 1
    [failed] = [r for r in json.loads(proc.stdout)["checks"] if r["status"] == "failure"]
    assert (failed["name"], failed["host"]) == ("ct-id", "beta") and "already has a container pf2" in failed["message"]
    proc = lab.phaul("--host", "alpha", "migrate", "pf2", "beta", check=False)
    assert proc.returncode == 2 and "preflight failed: ct-id on beta" in proc.stderr and "--force ct-id" in proc.stderr
    proc = lab.phaul("--host", "alpha", "migrate", "pf2", "beta", "--force", "memory", check=False)
    assert proc.returncode == 2 and "preflight failed" in proc.stderr  # forcing another check does not help
    # forced past the preflight, the destination still protects what it has
    proc = lab.phaul("--host", "alpha", "migrate", "pf2", "beta", "--force", "ct-id", check=False)
    assert proc.returncode == 2 and "preflight failed" not in proc.stderr and "beta already has a container pf2" in proc.stderr
    proc = lab.phaul("--host", "alpha", "migrate", "pf2", "beta", "--force", "nosuch", check=False)
    assert proc.returncode == 2 and "unknown check" in proc.stderr
    assert lab.ct_list("alpha")[0]["state"] == "running"
    assert not list((lab.state_dir("beta") / "incoming").glob("*"))


def test_refusal_names_each_unforced_failure() -> None:
    results = [
        CheckResult("cpu", CheckState.FAILURE, "lacks avx512", "beta"),
        CheckResult("disk", CheckState.FAILURE, "full", "beta"),
        CheckResult("memory", CheckState.WARNING, "tight", "beta"),
    ]
    err = preflight.refusal(results, ())
    assert err is not None and "cpu on beta: lacks avx512" in err.message and "--force cpu --force disk" in err.hint
    err = preflight.refusal(results, ("cpu",))
    assert err is not None and "cpu" not in err.message and "disk" in err.message
    assert preflight.refusal(results, ("cpu", "disk")) is None
