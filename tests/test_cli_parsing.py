"""The command line itself: help for every option, --host anywhere, what follows `--`,
the default host, missing credentials, shell completion (no agent needed)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from phaul import cli
from phaul.errors import InvalidInput


def _parsers(parser: argparse.ArgumentParser, path: str = "phaul") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_and_argument_has_help() -> None:
    parsers = list(_parsers(cli.build_parser()))
    assert len(parsers) > 20 and any(p == "phaul lab exec" for p, _ in parsers)  # the plugin's commands too
    blank = [
        f"{path}: {'/'.join(a.option_strings) or a.dest}"
        for path, parser in parsers
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()
    ]
    assert blank == []


def test_the_checker_sees_a_blank_help() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quiet", action="store_true")
    assert [a.dest for _, q in _parsers(p) for a in q._actions if not (a.help or "").strip()] == ["quiet"]


def _parse(*argv: str) -> argparse.Namespace:
    return cli.parse_args(cli.build_parser(), list(argv))


@pytest.mark.parametrize("argv", [
    ("--host", "beta", "ct", "list"),
    ("ct", "list", "--host", "beta"),
    ("ct", "--host", "beta", "list"),
    ("migrate", "web", "gamma", "--host", "beta"),
    ("check", "web", "gamma", "--host", "beta", "--json"),
    ("migrations", "--host", "beta"),
    ("recover", "--host", "beta"),
    ("ct", "exec", "web", "--host", "beta", "--", "ls"),
])  # fmt: skip
def test_host_is_accepted_before_or_after_the_command(argv: tuple[str, ...]) -> None:
    assert _parse(*argv).host == "beta"


def test_hosts_file_after_the_command_and_no_host_means_the_default() -> None:
    args = _parse("ct", "list", "--hosts-file", "/x/hosts.json")
    assert args.hosts_file == Path("/x/hosts.json") and args.host is None


def test_what_follows_the_double_dash_is_the_containers_command() -> None:
    args = _parse("ct", "exec", "web", "--timeout", "5", "--", "ls", "--timeout", "9", "--", "-l")
    assert (args.id, args.timeout, args.cmd) == ("web", 5.0, ["ls", "--timeout", "9", "--", "-l"])
    args = _parse("ct", "exec", "--timeout", "7", "web", "--", "cat", "/now")
    assert (args.timeout, args.cmd) == (7.0, ["cat", "/now"])
    assert _parse("ct", "start", "web").cmd == [] and _parse("ct", "start", "web", "--", "sleep", "9").cmd == ["sleep", "9"]
    assert _parse("lab", "exec", "alpha", "--", "ip", "-br", "a").cmd == ["ip", "-br", "a"]


def test_a_command_after_double_dash_where_none_is_taken_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parse("migrate", "web", "beta", "--", "ls")
    assert e.value.code == 2 and "takes no command after `--`" in capsys.readouterr().err


def test_usage_errors_in_json_mode_are_json(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parse("ct", "list", "--json", "--bogus")
    shown = json.loads(capsys.readouterr().err)
    assert e.value.code == 2 and shown["exit_code"] == 2 and "--bogus" in shown["error"] and shown["schema_version"] == 1


def _hosts(tmp_path: Path, sockets: dict[str, bool], pki: bool = True) -> Path:
    hosts = {}
    for i, (name, present) in enumerate(sockets.items()):
        sock = tmp_path / f"{name}.sock"
        if present:
            sock.touch()
        hosts[name] = {"address": f"127.0.0.1:{7000 + i}", "socket": str(sock)}
    if pki:
        for f in ("ca.crt", "admin.crt", "admin.key"):
            (tmp_path / f).write_text("x")
    f = tmp_path / "hosts.json"
    f.write_text(json.dumps({"pki": {"ca": "ca.crt", "cert": "admin.crt", "key": "admin.key"}, "hosts": hosts}))
    return f


def test_default_host_is_the_one_local_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.HOST_ENV, raising=False)
    f = _hosts(tmp_path, {"web1": False, "db1": True})
    assert cli._host(_parse("--hosts-file", str(f), "ct", "list")) == "db1"
    monkeypatch.setenv(cli.HOST_ENV, "web1")
    assert cli._host(_parse("--hosts-file", str(f), "ct", "list")) == "web1"
    assert cli._host(_parse("--hosts-file", str(f), "ct", "list", "--host", "db1")) == "db1"


def test_the_lab_keeps_alpha_as_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.HOST_ENV, raising=False)
    f = _hosts(tmp_path, {"alpha": True, "beta": True})  # both agents' sockets are on the lab's machine
    assert cli._host(_parse("--hosts-file", str(f), "ct", "list")) == "alpha"


def test_no_default_host_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.HOST_ENV, raising=False)
    f = _hosts(tmp_path, {"web1": False, "db1": False})
    with pytest.raises(InvalidInput) as e:
        cli._host(_parse("--hosts-file", str(f), "ct", "list"))
    assert "no --host given" in e.value.message and "db1, web1" in e.value.hint


@pytest.mark.parametrize("json_mode", [False, True])
def test_a_missing_certificate_is_a_clear_error_not_a_traceback(tmp_path: Path, json_mode: bool) -> None:
    f = _hosts(tmp_path, {"alpha": False}, pki=False)
    cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(f), "ct", "list", "--host", "alpha"]
    proc = subprocess.run([*cmd, *(["--json"] if json_mode else [])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    if json_mode:
        shown = json.loads(proc.stderr)
        assert "admin.crt" in shown["error"] and "does not exist" in shown["error"] and "pki issue admin" in shown["hint"]
    else:
        assert f"certificate {tmp_path / 'admin.crt'}" in proc.stderr and "pki issue admin" in proc.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert "phaul" in script and "migrate" in script and "--max-downtime" in script
    if shell == "bash":
        checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert checked.returncode == 0, checked.stderr


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "phaul", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("phaul ")
