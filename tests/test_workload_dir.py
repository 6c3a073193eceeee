"""Where the workload programs and pycriu are found, and what is said when they are not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import REPO

from phaul.checks import CheckState
from phaul.containers import workloads
from phaul.containers.debian import RootfsCache
from phaul.containers.template import add_workloads
from phaul.errors import InvalidInput, ToolFailed
from phaul.linux import doctor, pycriu_module


def _programs(d: Path, names: tuple[str, ...]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"\x7fELF fake " + n.encode())
    return d


def test_the_option_wins_over_the_environment_and_the_checkout(tmp_path: Path) -> None:
    opt, env = _programs(tmp_path / "opt", ("memload",)), _programs(tmp_path / "env", ("asuser",))
    found = workloads.find(opt, {workloads.ENV: str(env)})
    assert (found.path, found.origin, found.present()) == (opt, workloads.Origin.OPTION, ["memload"])
    found = workloads.find(None, {workloads.ENV: str(env)})
    assert (found.path, found.origin, found.present()) == (env, workloads.Origin.ENVIRONMENT, ["asuser"])


def test_from_a_checkout_the_default_is_its_workloads_bin() -> None:
    found = workloads.find(None, {})
    assert (found.path, found.origin) == (REPO / "workloads" / "bin", workloads.Origin.CHECKOUT)


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_named_directory_that_does_not_exist_is_refused_with_the_fix(tmp_path: Path, how: str) -> None:
    gone = tmp_path / "gone"
    with pytest.raises(InvalidInput) as e:
        workloads.find(gone, {}) if how == "option" else workloads.find(None, {workloads.ENV: str(gone)})
    assert str(gone) in e.value.message and "make -C workloads" in e.value.hint and "--workload-dir" in e.value.hint


def test_a_missing_program_names_the_fix(tmp_path: Path) -> None:
    found = workloads.find(_programs(tmp_path / "w", ("memload",)), {})
    assert found.program("memload") == tmp_path / "w" / "memload"
    with pytest.raises(ToolFailed) as e:
        found.program("tcp-probe")
    assert "tcp-probe" in e.value.message and "--workload-dir" in e.value.hint
    with pytest.raises(InvalidInput):
        found.program("../etc/passwd")


def test_templates_copy_the_programs_of_the_configured_directory(tmp_path: Path) -> None:
    found = workloads.find(_programs(tmp_path / "w", ("memload", "objects")), {})
    add_workloads(found, tmp_path / "root" / "bin")
    assert sorted(p.name for p in (tmp_path / "root" / "bin").iterdir()) == ["memload", "objects"]
    assert ((tmp_path / "root" / "bin" / "memload").stat().st_mode & 0o777) == 0o755
    assert RootfsCache  # the template module imports without the checkout's workloads


def test_doctor_reports_the_workload_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(workloads.ENV, str(tmp_path / "none"))
    check = doctor._check_workloads()
    assert check.status is CheckState.WARNING and "does not exist" in check.detail and "make -C workloads" in check.fix
    monkeypatch.setenv(workloads.ENV, str(_programs(tmp_path / "some", ("memload",))))
    check = doctor._check_workloads()
    assert check.status is CheckState.WARNING and "lacks" in check.detail
    monkeypatch.setenv(workloads.ENV, str(_programs(tmp_path / "all", workloads.NAMES)))
    assert doctor._check_workloads().status is CheckState.PASS


def test_pycriu_present_here_and_its_absence_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pycriu_module.missing() == "" and doctor._check_pycriu().status is CheckState.PASS
    for name in [m for m in sys.modules if m == "pycriu" or m.startswith("pycriu.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pycriu", None)  # import pycriu now raises ImportError
    assert "pycriu" in pycriu_module.missing()
    check = doctor._check_pycriu()
    assert check.status is CheckState.FAILURE and "make setup" in check.fix and "pip install" in check.fix
    with pytest.raises(ToolFailed) as e:
        pycriu_module.load("read CRIU's page maps")
    assert "pycriu is missing" in e.value.message and "read CRIU's page maps" in e.value.message
