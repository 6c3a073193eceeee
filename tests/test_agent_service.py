"""The agent as a service, with real agents and real TLS clients (no lab): sd_notify
over a real datagram socket, SIGHUP reloading peers, admins and the revocation list
from agent.toml without dropping a running call, and journald's log format."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from agentlib import REPO, RunningAgent, make_pki, running_agent
from cryptography import x509

from phaul.agent import journald
from phaul.agent.config import AgentConfig, load_config, render_config
from phaul.agent.notify import Notifier
from phaul.channels.revocation import format_serial
from phaul.channels.transport import Credentials
from phaul.errors import Refused
from phaul.rpc import phaul_pb2 as pb

WAIT = 60.0  # s: only so that a broken agent fails the test instead of hanging it


# -- sd_notify -------------------------------------------------------------------------------


@contextmanager
def notify_socket(tmp_path: Path, abstract: bool) -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket as systemd has, and its $NOTIFY_SOCKET spelling."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"phaul-test-{os.getpid()}-{time.monotonic_ns()}"
        s.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        s.bind(address)
    s.settimeout(WAIT)
    try:
        yield s, address
    finally:
        s.close()


def _fields(s: socket.socket) -> dict[str, str]:
    data = s.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_one_datagram_per_state(tmp_path: Path, abstract: bool) -> None:
    with notify_socket(tmp_path, abstract) as (s, address):
        env = {"NOTIFY_SOCKET": address, "OTHER": "x"}
        n = Notifier.from_environment(env)
        assert env == {"OTHER": "x"}  # the agent's children must not see it (runc would proxy it)
        n.ready("serving\non x")
        assert _fields(s) == {"READY": "1", "STATUS": "serving on x"}
        n.reloading()
        f = _fields(s)
        assert f["RELOADING"] == "1" and int(f["MONOTONIC_USEC"]) > 0
        n.stopping("bye")
        assert _fields(s) == {"STOPPING": "1", "STATUS": "bye"}
    assert not Notifier(None).send("READY=1")  # no socket: nothing to do
    assert not Notifier(str(tmp_path / "gone.sock")).send("READY=1")  # a lost notification is logged, not raised


# -- real agents from agent.toml -----------------------------------------------------------


def _config(d: Path, creds: dict[str, Credentials], peers: list[str], admins: list[str], **changes: object) -> AgentConfig:
    me = creds["alpha"]
    return AgentConfig(
        name="alpha", listen="127.0.0.1:1", state_dir=d / "state", creds=me,
        peers=frozenset(peers), admins=frozenset(admins), **changes,  # type: ignore[arg-type]
    )


def _write(path: Path, cfg: AgentConfig) -> Path:
    path.write_text(render_config(cfg))
    load_config(path)  # what the agent will read is valid
    return path


def _info(agent: RunningAgent, who: str) -> str:
    with agent.stub(who, tcp=True) as a:
        return str(a.call("Info", pb.Empty(), timeout=WAIT).name)


def _refused(agent: RunningAgent, who: str) -> str:
    with pytest.raises(Refused) as e:
        _info(agent, who)
    return e.value.message


def _serial(c: Credentials) -> int:
    return int(x509.load_pem_x509_certificate(c.cert.read_bytes()).serial_number)


def _reload(agent: RunningAgent, s: socket.socket) -> dict[str, str]:
    agent.proc.send_signal(signal.SIGHUP)
    assert _fields(s)["RELOADING"] == "1"
    return _fields(s)  # READY=1 and what it did


def test_agent_notifies_ready_reload_and_stopping(tmp_path: Path) -> None:
    creds = make_pki(tmp_path, ["alpha", "beta", "admin"])
    config = _write(tmp_path / "agent.toml", _config(tmp_path, creds, ["beta"], ["admin"]))
    with notify_socket(tmp_path, abstract=True) as (s, address):
        with running_agent(tmp_path / "a", "alpha", creds, [], [], config=config, env={"NOTIFY_SOCKET": address}) as agent:
            assert _fields(s).get("STATUS", "").startswith("settling")
            ready = _fields(s)
            assert ready["READY"] == "1" and f"127.0.0.1:{agent.port}" in ready["STATUS"]
            assert _info(agent, "admin") == "alpha"  # it serves once it said so
            after = _reload(agent, s)
            assert after["READY"] == "1" and "reloaded: peers beta; admins admin" in after["STATUS"]
            agent.proc.send_signal(signal.SIGTERM)
            assert _fields(s)["STOPPING"] == "1"
            assert agent.proc.wait(WAIT) == 0


def test_sighup_reloads_peers_admins_and_revocations_without_dropping_a_call(tmp_path: Path) -> None:
    creds = make_pki(tmp_path, ["alpha", "beta", "gamma", "admin", "carol"])
    revoked = tmp_path / "other-revoked.txt"  # a list the agent does not read until a reload names it
    path = _write(tmp_path / "agent.toml", _config(tmp_path, creds, ["beta"], ["admin"]))
    with notify_socket(tmp_path, abstract=False) as (s, address), \
            running_agent(tmp_path / "a", "alpha", creds, [], [], config=path, env={"NOTIFY_SOCKET": address}) as agent:
        while "READY" not in _fields(s):
            pass
        assert _info(agent, "beta") == "alpha"
        assert "carol may not call Info" in _refused(agent, "carol") and "gamma" in _refused(agent, "gamma")

        # a call is running while the agent reloads: it ends as it would have
        with agent.stub("admin", tcp=True) as admin:
            admin.call("CreateContainer", pb.ContainerConfig(id="web", memory=64 << 20), timeout=WAIT)
            rootfs = agent.state / "containers" / "web" / "bundle" / "rootfs"
            started, go = rootfs / "started", rootfs / "go"
            out: list[pb.ExecReply] = []
            script = "touch /started; while [ ! -e /go ]; do sleep 0.1; done; echo survived"
            call = threading.Thread(target=lambda: out.append(admin.call(
                "ExecContainer", pb.ExecRequest(id="web", args=["/bin/sh", "-c", script], timeout=WAIT), timeout=WAIT)))
            admin.call("StartContainer", pb.StartRequest(id="web", args=["/bin/sleep", "3600"]), timeout=WAIT)
            call.start()
            try:
                deadline = time.monotonic() + WAIT
                while not started.exists():
                    assert time.monotonic() < deadline and call.is_alive(), out
                    time.sleep(0.05)
                revoked.write_text(f"{format_serial(_serial(creds['carol']))}  carol\n")
                _write(path, _config(tmp_path, creds, ["gamma"], ["admin", "carol"], revoked=revoked))
                status = _reload(agent, s)["STATUS"]
                assert "peers gamma; admins admin, carol" in status and "1 serials" in status
            finally:
                go.touch()
                call.join(WAIT)
            assert [(r.returncode, r.stdout) for r in out] == [(0, b"survived\n")]
            assert admin.call("ListContainers", pb.Empty(), timeout=WAIT).containers  # the same channel still serves

        assert "beta may not call Info" in _refused(agent, "beta")  # removed: refused at its next call
        assert _info(agent, "gamma") == "alpha"  # added
        assert "is revoked" in _refused(agent, "carol")  # an admin now, but its certificate is on the new list

        # a bad file on reload changes nothing, and says why
        path.write_text(path.read_text().replace('peers = ["gamma"]', 'peers = "gamma"'))
        status = _reload(agent, s)["STATUS"]
        assert "reload refused (previous configuration kept)" in status and "`peers`" in status
        assert _info(agent, "gamma") == "alpha" and "beta may not" in _refused(agent, "beta")
        assert "reload refused, the previous peers, admins and revocation list stay" in agent.log()


# -- journald ---------------------------------------------------------------------------------


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("phaul.agent.server", level, __file__, 1, msg, None, None)


def test_journald_lines_carry_the_priority_and_no_timestamp() -> None:
    f = journald.JournaldFormatter()
    assert f.format(_record(logging.ERROR, "it broke")) == "<3>phaul.agent.server: it broke"
    assert f.format(_record(logging.WARNING, "careful\nsecond line")) == (
        "<4>phaul.agent.server: careful\n<4>second line")  # every line is its own journal entry
    assert [journald.priority(lvl) for lvl in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO,
                                               logging.DEBUG, 5)] == [2, 3, 4, 6, 7, 7]


def test_journal_stream_is_detected_by_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journald.under_journald(stream, env)
        assert isinstance(journald.formatter(stream, env), journald.JournaldFormatter)
        assert not journald.under_journald(other, env)  # stderr redirected elsewhere: not the journal's
        for value in ("", "garbage", f"{st.st_dev}:", f"{st.st_dev}:{st.st_ino + 1}"):
            assert not journald.under_journald(stream, {"JOURNAL_STREAM": value})
        assert not journald.under_journald(io.StringIO(), env)  # no file descriptor
        plain = journald.formatter(other, env).format(_record(logging.INFO, "hello"))
        assert plain.endswith("phaul.agent.server INFO hello") and plain[:4].isdigit()  # the time first, as before


def test_an_agent_on_the_journal_stream_logs_with_priorities(tmp_path: Path) -> None:
    creds = make_pki(tmp_path, ["alpha", "admin"])
    path = _write(tmp_path / "agent.toml", _config(tmp_path, creds, [], ["admin"]))
    d = tmp_path / "a"
    d.mkdir()
    (d / "agent.log").touch()  # running_agent writes the agent's stderr here: make it the "journal stream"
    st = os.stat(d / "agent.log")
    with running_agent(d, "alpha", creds, [], [], config=path, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) as agent:
        assert _info(agent, "admin") == "alpha"
        lines = agent.log().splitlines()
    assert any(line.startswith("<6>phaul.agent.server: agent alpha listening") for line in lines), lines
    assert all(line[:1] == "<" and line[2:3] == ">" for line in lines), lines


# -- the CLI's default agent --------------------------------------------------------------------


def test_the_cli_talks_to_the_local_agent_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from phaul import cli, local_agent
    from phaul.hosts import PkiFiles

    creds = make_pki(tmp_path, ["alpha", "admin"])
    sock = tmp_path / "a" / "agent.sock"
    path = _write(tmp_path / "agent.toml", _config(tmp_path, creds, [], ["admin"], socket=sock))
    admin = creds["admin"]
    for var in ("PHAUL_HOST", "PHAUL_HOSTS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PHAUL_LAB_DIR", str(tmp_path / "no-lab"))  # no hosts file at all
    monkeypatch.setenv(local_agent.SOCKET_ENV, str(sock))
    monkeypatch.setattr(local_agent, "DEFAULT_PKI", PkiFiles(ca=admin.ca, cert=admin.cert, key=admin.key))
    monkeypatch.setattr(local_agent, "DEFAULT_CONFIG", tmp_path / "elsewhere.toml")
    assert cli.main(["ct", "list"]) == 2  # no socket yet: the lab's default, and no hosts file says where
    assert "no hosts file" in capsys.readouterr().err
    with running_agent(tmp_path / "a", "alpha", creds, [], [], config=path):
        assert cli.main(["ct", "list"]) == 2  # a socket, but whose?
        assert "neither the hosts file nor" in capsys.readouterr().err
        monkeypatch.setattr(local_agent, "DEFAULT_CONFIG", path)  # the agent's own file names it
        assert cli.main(["ct", "list", "--json"]) == 0
        assert '"containers": []' in capsys.readouterr().out
        hosts = tmp_path / "hosts.json"  # or the hosts file's entry with that socket
        hosts.write_text(json.dumps({"pki": {"ca": str(admin.ca), "cert": str(admin.cert), "key": str(admin.key)},
                                     "hosts": {"alpha": {"address": "127.0.0.1:1", "socket": str(sock)},
                                               "beta": {"address": "127.0.0.1:2"}}}))
        monkeypatch.setattr(local_agent, "DEFAULT_CONFIG", tmp_path / "elsewhere.toml")
        assert cli.main(["--hosts-file", str(hosts), "ct", "list"]) == 0
        assert capsys.readouterr().out.startswith("ID ")


def test_containers_and_their_keepers_outlive_the_agent(tmp_path: Path) -> None:
    """What the unit's KillMode=process keeps: systemd signals only the agent, and the container's
    tasks and its console keeper (its subreaper and log) go on without it."""
    from agentlib import stop_agent

    creds = make_pki(tmp_path, ["alpha", "admin"])
    path = _write(tmp_path / "agent.toml", _config(tmp_path, creds, [], ["admin"]))
    with running_agent(tmp_path / "a", "alpha", creds, [], [], config=path) as agent:
        with agent.stub("admin") as admin:
            admin.call("CreateContainer", pb.ContainerConfig(id="kept", memory=64 << 20), timeout=WAIT)
            info = admin.call("StartContainer", pb.StartRequest(id="kept", args=["/bin/sleep", "3600"]), timeout=WAIT)
        [keeper_file] = agent.state.rglob("keeper.pid")
        keeper = int(keeper_file.read_text())
        stop_agent(agent.proc)
        assert agent.proc.returncode == 0
        for pid in (info.pid, keeper):
            assert Path(f"/proc/{pid}").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


SIGNAL_IN_ANOTHER_THREAD = """
import os, signal, threading, time
from phaul.agent.signals import Signals
signals = Signals()
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # SIGHUP not blocked there
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # the main thread never takes it itself
os.kill(os.getpid(), signal.SIGHUP)
print(signals.next().name, flush=True)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
os.kill(os.getpid(), signal.SIGTERM)
print(signals.next().name, flush=True)
"""


def test_a_signal_taken_by_another_thread_reaches_the_main_loop() -> None:
    """The kernel may hand SIGHUP to any thread (gRPC's); the agent's main loop, blocked reading
    its signals, must still see it at once, not at the next signal the main thread happens to take."""
    proc = subprocess.run([sys.executable, "-c", SIGNAL_IN_ANOTHER_THREAD], capture_output=True, text=True,
                          timeout=WAIT, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.split() == ["RELOAD", "STOP"], proc.stderr
