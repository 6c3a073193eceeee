"""agent.toml (phaul.agent.config) and the systemd unit (phaul.agent.unit): the file
loads, renders back, refuses what is wrong by key and file, flags override it, and
the unit `phaul agent install-unit` writes passes `systemd-analyze verify`."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agentlib import REPO, make_pki

from phaul import cli
from phaul.agent import config as agent_config
from phaul.agent.config import DEFAULT_SOCKET, AgentConfig, load_config, render_config
from phaul.agent.unit import phaul_command, render_unit
from phaul.channels.transport import Credentials
from phaul.config import Limits, Timeouts
from phaul.errors import InvalidInput

MINIMAL = """\
name = "alpha"
listen = "127.0.0.1:7473"
peers = ["beta"]
admins = ["admin"]

[tls]
cert = "pki/alpha.crt"
key = "pki/alpha.key"
ca = "pki/ca.crt"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_minimal_file_gets_the_defaults_and_paths_relative_to_it(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    pki = tmp_path / "pki"
    assert cfg.name == "alpha" and cfg.listen == "127.0.0.1:7473" and cfg.advertise is None
    assert cfg.creds == Credentials("alpha", pki / "alpha.crt", pki / "alpha.key", pki / "ca.crt")
    assert (cfg.peers, cfg.admins) == (frozenset({"beta"}), frozenset({"admin"}))
    assert cfg.socket == DEFAULT_SOCKET  # an agent run from a file serves the local CLI
    assert cfg.revoked == pki / "revoked.txt"  # beside the certificate, which lives beside the CA
    assert cfg.state_dir == Path("/var/lib/phaul") and cfg.timeouts == Timeouts() and cfg.limits == Limits()


def test_render_then_load_gives_the_same_configuration(tmp_path: Path) -> None:
    cfg = AgentConfig(
        name="gamma", listen="[fd00::13]:7473", advertise="gamma.example:7473", state_dir=Path("/srv/phaul state"),
        creds=Credentials("gamma", Path("/etc/phaul/pki/gamma.crt"), Path("/etc/phaul/pki/gamma.key"),
                          Path("/etc/phaul/pki/ca.crt")),
        socket=None, bridge="br-ct", cache_dir=Path("/var/cache/x"), build_netns=Path("/proc/1/ns/net"),
        workload_dir=Path('/opt/"w"'), peers=frozenset({"alpha", "beta"}), admins=frozenset({"admin"}),
        timeouts=Timeouts(gate=12.5, link=3.0, dump=100.0, restore=90.0, resolve_interval=0.0), max_migrations=2,
        revoked=None, limits=Limits(incoming=3, incoming_per_peer=1, quota_factor=1.5, quota_extra=0),
    )
    text = render_config(cfg)
    assert load_config(_write(tmp_path, text)) == cfg
    defaults = dataclasses.replace(cfg, socket=DEFAULT_SOCKET, revoked=Path("/etc/phaul/pki/revoked.txt"), bridge=None)
    assert load_config(_write(tmp_path, render_config(defaults))) == defaults


@pytest.mark.parametrize(("text", "words"), [
    (MINIMAL + "peer = ['x']\n", ["unknown key `tls.peer`"]),  # after [tls]: a key of that table
    ("colour = 1\n" + MINIMAL, ["unknown key `colour`", "listen"]),
    (MINIMAL + "[timeouts]\ngate = 'soon'\n", ["`timeouts.gate`", "a number", "not a string"]),
    (MINIMAL + "[limits]\nincoming = 2.5\n", ["`limits.incoming`", "whole number"]),
    (MINIMAL + "[limits]\nmax_migrations = 0\n", ["`limits.max_migrations`"]),
    (MINIMAL + "[limits]\ndisk_reserve = -1\n", ["`limits.disk_reserve`", "bytes"]),
    (MINIMAL.replace('peers = ["beta"]', 'peers = "beta"'), ["`peers`", "an array of names"]),
    (MINIMAL.replace('peers = ["beta"]', 'peers = ["../x"]'), ["`peers`", "certificate name"]),
    (MINIMAL.replace('name = "alpha"', "name = 7"), ["`name`", "not an integer"]),
    (MINIMAL.replace('name = "alpha"\n', ""), ["no `name`", "--name"]),
    (MINIMAL.replace('ca = "pki/ca.crt"\n', ""), ["no `tls.ca`", "--ca"]),
    ('tls = "x"\n', ["`tls`", "a table"]),
    ("name = \n", ["not valid TOML"]),
])  # fmt: skip
def test_a_wrong_file_is_refused_naming_the_key_and_the_file(tmp_path: Path, text: str, words: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InvalidInput) as e:
        load_config(path)
    assert str(path) in e.value.message
    for word in words:
        assert word in str(e.value)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read the agent's configuration"):
        load_config(tmp_path / "nope.toml")


def _args(*argv: str):  # type: ignore[no-untyped-def]
    return cli.parse_args(cli.build_parser(), ["agent", *argv])


def test_flags_override_the_file(tmp_path: Path) -> None:
    make_pki(tmp_path, ["alpha", "admin"])
    path = _write(tmp_path, MINIMAL + "[timeouts]\nlink = 7\n")
    cfg = cli.agent_config(_args("--config", str(path), "--peers", "beta,gamma", "--gate-timeout", "9",
                                 "--socket", str(tmp_path / "s.sock")))
    assert cfg.peers == {"beta", "gamma"} and cfg.admins == {"admin"}
    assert (cfg.timeouts.gate, cfg.timeouts.link) == (9.0, 7.0) and cfg.socket == tmp_path / "s.sock"


def test_the_default_file_is_read_without_name_and_ignored_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = make_pki(tmp_path, ["alpha", "admin"])
    monkeypatch.setattr(agent_config, "DEFAULT_CONFIG", _write(tmp_path, MINIMAL))
    assert cli.agent_config(_args()).listen == "127.0.0.1:7473"
    me = creds["alpha"]
    flags = cli.agent_config(_args("--name", "alpha", "--listen", "127.0.0.1:9", "--cert", str(me.cert),
                                   "--key", str(me.key), "--ca", str(me.ca), "--admins", "admin"))
    assert flags.listen == "127.0.0.1:9" and flags.socket is None and flags.peers == frozenset()
    with pytest.raises(InvalidInput, match="no `listen` in the command line"):
        cli.agent_config(_args("--name", "alpha"))


def test_missing_certificates_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="certificate .*alpha.crt does not exist"):
        cli.agent_config(_args("--config", str(_write(tmp_path, MINIMAL))))


# -- the unit --------------------------------------------------------------------------


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify`, which works without systemd as PID 1 (it loads the unit offline)."""
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)


def test_install_unit_writes_a_unit_systemd_accepts(tmp_path: Path) -> None:
    config, unit = _write(tmp_path, MINIMAL), tmp_path / "phaul-agent.service"
    r = subprocess.run(
        [sys.executable, "-m", "phaul", "agent", "install-unit", "--config", str(config), "--output", str(unit)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    text = unit.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "KillMode=process"):
        assert f"\n{line}\n" in text
    assert f"\nExecStart={sys.executable} -m phaul agent --config {config}\n" in text
    for breaks_criu in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "SystemCallFilter"):
        assert f"\n{breaks_criu}=" not in text
    v = _verify(unit)
    assert (v.returncode, v.stderr.strip(), v.stdout.strip()) == (0, "", "")


def test_systemd_analyze_verify_fails_a_broken_unit(tmp_path: Path) -> None:
    good = render_unit(phaul_command(), tmp_path / "agent.toml")
    bad_value, no_program = tmp_path / "a.service", tmp_path / "b.service"
    bad_value.write_text(good.replace("Type=notify", "Type=notifyy"))
    no_program.write_text(render_unit(["/nonexistent/phaul"], tmp_path / "agent.toml"))
    assert "Failed to parse service type" in _verify(bad_value).stderr
    v = _verify(no_program)
    assert v.returncode != 0 and "/nonexistent/phaul" in v.stderr


def test_install_unit_refuses_a_bad_configuration(tmp_path: Path) -> None:
    unit = tmp_path / "u.service"
    r = subprocess.run(
        [sys.executable, "-m", "phaul", "agent", "install-unit", "--config", str(_write(tmp_path, "nme = 1\n")),
         "--output", str(unit)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 2 and "unknown key `nme`" in r.stderr and not unit.exists()


def test_exec_start_quotes_what_systemd_would_split() -> None:
    text = render_unit(["/opt/my phaul/bin/phaul"], Path("/etc/phaul/50%.toml"))
    assert 'ExecStart="/opt/my phaul/bin/phaul" agent --config /etc/phaul/50%%.toml\n' in text
    with pytest.raises(ValueError):
        render_unit(["phaul"], Path("/x"))
