"""The step hook (phaul.migration.steps) and the test agent's fault hook
(phaul.testing.faults), without the lab."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
from conftest import REPO

from phaul import cli
from phaul.errors import InvalidInput, ToolFailed
from phaul.migration.steps import NO_HOOK, Step, StepPoint, precopy_round
from phaul.testing import faults
from phaul.testing import agent as test_agent


def _point(state: Path, role: str = "source", mid: str = "m1", image_dir: Path | None = None) -> StepPoint:
    return StepPoint(mid, role, state, image_dir)  # type: ignore[arg-type]


def test_steps_keep_their_names() -> None:
    assert faults.STEPS == (
        "preflight", "fs-presync", "precopy", "precopy-2", "dump", "transfer", "restore", "commit", "resume", "postcopy",
        "cleanup",
    )
    assert faults.MATRIX_STEPS == tuple(s for s in faults.STEPS if s not in ("resume", "postcopy"))
    assert precopy_round(1) == Step.PRECOPY_2 == "precopy-2" and precopy_round(2) == "precopy-3"


def test_production_code_never_imports_the_testing_package() -> None:
    offenders = []
    for path in sorted((REPO / "phaul").rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[:2] in (("phaul", "testing"), ("phaul", "rpc")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{rel}:{node.lineno}: {n}" for n in names if n.startswith("phaul.testing") or "faults" in n]
    assert offenders == []


def test_the_default_hook_does_nothing(tmp_path: Path) -> None:
    faults.arm(tmp_path, "preflight:fail")
    NO_HOOK.at(Step.PREFLIGHT, _point(tmp_path))
    assert (tmp_path / faults.ARM_FILE).exists()  # not taken


def test_an_armed_fault_applies_to_the_next_migration_only(tmp_path: Path) -> None:
    hook = faults.FaultHook()
    faults.arm(tmp_path, "dump:fail")
    hook.at(Step.PREFLIGHT, _point(tmp_path, mid="m1"))
    assert not (tmp_path / faults.ARM_FILE).exists()  # taken by m1
    hook.at(Step.PREFLIGHT, _point(tmp_path, mid="m2"))
    hook.at(Step.DUMP, _point(tmp_path, mid="m2"))  # m2 has no fault
    hook.at(Step.PRECOPY, _point(tmp_path, mid="m1"))  # not its step
    with pytest.raises(ToolFailed, match="injected fault at dump"):
        hook.at(Step.DUMP, _point(tmp_path, mid="m1"))
    hook.at(Step.DUMP, _point(tmp_path, mid="m1"))  # once


def test_damage_image_happens_on_the_destination_before_the_restore(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "pstree.img").write_bytes(b"\0" * 16)
    hook = faults.FaultHook()
    faults.arm(tmp_path, "restore:damage-image")
    hook.at(Step.PREPARE, _point(tmp_path, "destination"))
    hook.at(Step.RESTORE, _point(tmp_path, "destination", image_dir=images))
    assert (images / "pstree.img").read_bytes().startswith(b"\xde\xad\xbe\xef")


def test_a_fault_armed_on_the_wrong_side_is_ignored(tmp_path: Path) -> None:
    hook = faults.FaultHook()
    faults.arm(tmp_path, "restore:damage-image")
    hook.at(Step.PREFLIGHT, _point(tmp_path, "source"))  # the source cannot damage the destination's images
    assert not (tmp_path / faults.ARM_FILE).exists()
    hook.at(Step.RESTORE, _point(tmp_path, "source"))
    faults.arm(tmp_path, "restore:fail")
    hook.at(Step.PREPARE, _point(tmp_path, "destination", mid="m2"))
    hook.at(Step.RESTORE, _point(tmp_path, "destination", mid="m2", image_dir=tmp_path))  # fail acts on the source


def test_pause_waits_for_the_marker_to_go(tmp_path: Path) -> None:
    hook = faults.FaultHook()
    faults.arm(tmp_path, "commit:pause")
    hook.at(Step.PREFLIGHT, _point(tmp_path))
    t = threading.Thread(target=hook.at, args=(Step.COMMIT, _point(tmp_path)))
    t.start()
    marker = tmp_path / faults.PAUSED_FILE
    for _ in range(500):
        if marker.exists():
            break
        t.join(0.01)
    assert marker.read_text() == "m1 commit\n"
    assert t.is_alive()
    marker.unlink()
    t.join(5)
    assert not t.is_alive()


@pytest.mark.parametrize("text", ["resume", "nosuch:fail", "dump:explode", "prepare:damage-image", ""])
def test_what_is_armed_is_validated(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidInput, match="unknown fault"):
        faults.arm(tmp_path, text)
    (tmp_path / faults.ARM_FILE).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / faults.ARM_FILE).write_text(text)  # written by hand: refused when taken, and consumed
    with pytest.raises(InvalidInput, match="unknown fault"):
        faults.FaultHook().at(Step.PREFLIGHT, _point(tmp_path))
    assert not (tmp_path / faults.ARM_FILE).exists()


def test_production_cli_has_no_fault_options(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["agent", "--name", "a", "--listen", "127.0.0.1:1", "--cert", "c", "--key", "k", "--ca", "ca"]
    for argv in ([*base, "--enable-fault-injection"], ["migrate", "ct", "beta", "--fault", "dump:fail"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv)
    capsys.readouterr()


def test_the_test_agent_plugs_in_the_fault_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(cli, "cmd_agent", lambda args, hook: seen.append((args.name, args.state_dir, hook)) or 0)
    base = ["--name", "alpha", "--listen", "127.0.0.1:1", "--state-dir", str(tmp_path), "--cert", "c", "--key", "k", "--ca", "ca"]
    assert test_agent.main([*base, "--enable-fault-injection"]) == 0
    assert test_agent.main(base) == 0
    [(name, state, hook), (_, _, plain)] = seen
    assert (name, state) == ("alpha", tmp_path)
    assert isinstance(hook, faults.FaultHook) and plain is NO_HOOK
