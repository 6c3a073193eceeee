"""The kernel-object matrix in the lab: one container holds one of each object CRIU
carries (workloads/objects.c, plus two process pairs talking TCP over 127.0.0.1
and ::1), is migrated alpha -> beta, and every object must go on working with its
state intact. Objects the destination cannot take are refused by preflight
before anything moves. The table is in docs/notes/kernel-objects.md."""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import Lab, wait_for

pytestmark = pytest.mark.lab

# Every object kind workloads/objects.c makes that a migration carries.
MOVABLE = (
    "pty", "pipe", "fifo", "unix-stream", "unix-dgram", "unix-seqpacket", "unix-bound", "unix-bound-dgram",
    "unix-unlinked", "tcp4-loopback", "tcp6-loopback", "sysv-shm", "sysv-sem", "sysv-msg", "posix-shm",
    "memfd", "deleted-file", "eventfd", "epoll", "timerfd", "signalfd", "posix-timer", "threads", "zombie",
    "session", "file-locks", "inotify",
)  # fmt: skip
# What preflight refuses: the words its error must use for it, and what `ct create` needs to make it
# (fanotify_init is past the default seccomp profile only with CAP_SYS_ADMIN).
REFUSED = {"fanotify": ("fanotify marks cannot be moved", ["--seccomp", "unconfined"])}
PAIRS = {"4": ("127.0.0.1", "127.0.0.1:7501"), "6": ("::1", "[::1]:7506")}  # echo-server + tcp-probe per family
LOCKS = {"flock": ("/tmp/obj-flock", "FLOCK"), "posix": ("/tmp/obj-posix", "POSIX"), "ofd": ("/tmp/obj-ofd", "OFDLCK")}


def _script(objects: tuple[str, ...]) -> list[str]:
    """The container's command: the loopback TCP pairs in the background, then the objects as PID 1."""
    lines = []
    for bind, addr in PAIRS.values():
        port = addr.rsplit(":", 1)[1]
        lines.append(f"echo-server --port {port} --bind {bind} > /dev/null &")
    lines.append("sleep 0.5")
    for fam, (_bind, addr) in PAIRS.items():
        lines.append(f"tcp-probe --connect {addr} --interval-ms 20 --json > /probe{fam}.json & echo $! > /probe{fam}.pid")
    lines.append(f"exec objects run --interval-ms 200 {' '.join(objects)}")
    return ["/bin/sh", "-c", "\n".join(lines)]


def _status(lab: Lab, host: str, ct: str) -> dict[str, tuple[str, int, str]]:
    """object -> (ok|FAIL, checks passed, reason), from the workload's status file."""
    path = lab.rootfs(host, ct) / "objects.status"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines()[1:]:
        name, state, checks, *why = line.split(" ", 3)
        out[name] = (state, int(checks), why[0] if why else "")
    return out


def _table(status: dict[str, tuple[str, int, str]], before: dict[str, tuple[str, int, str]]) -> str:
    rows = [f"{'object':18} {'result':6} checks(before->after) reason"]
    for name in sorted(status):
        state, n, why = status[name]
        rows.append(f"{name:18} {state:6} {before.get(name, ('', 0, ''))[1]}->{n} {why}")
    return "\n".join(rows)


def _locks(lab: Lab, host: str, ct: str) -> None:
    """Each lock is held (a second process fails to take it) and /proc/locks shows it, the POSIX one by PID 1."""
    text = lab.exec(host, ct, "cat", "/proc/locks")
    for kind, (path, name) in LOCKS.items():
        proc = lab.phaul("--host", host, "ct", "exec", ct, "--", "objects", "trylock", path, kind, check=False)
        assert proc.returncode == 0 and "held by another" in proc.stdout, (kind, proc.stdout, proc.stderr)
        assert re.search(rf"^\d+: {name} +ADVISORY +WRITE", text, re.M), (name, text)
    assert re.search(r"^\d+: POSIX +ADVISORY +WRITE +1 ", text, re.M), text


def test_every_object_survives_migration(clean_lab: Lab) -> None:
    lab = clean_lab
    lab.phaul("--host", "alpha", "ct", "create", "objs", "--memory", "128M")
    lab.phaul("--host", "alpha", "ct", "start", "objs", "--", *_script(MOVABLE))
    wait_for(lambda: len(_status(lab, "alpha", "objs")) == len(MOVABLE)
             and min(c for _s, c, _w in _status(lab, "alpha", "objs").values()) >= 3,
             timeout=30, what="every object to pass three checks on alpha")  # fmt: skip
    before = _status(lab, "alpha", "objs")
    assert all(s == "ok" for s, _c, _w in before.values()), _table(before, {})
    _locks(lab, "alpha", "objs")

    report = lab.migrate("objs", "alpha", "beta")
    assert report["result"] == "ok", report
    after = _status(lab, "beta", "objs")

    def moved_on() -> bool:
        nonlocal after
        after = _status(lab, "beta", "objs")
        done = all(after[n][1] >= before[n][1] + 3 for n in MOVABLE if after.get(n, ("FAIL",))[0] == "ok")
        return done and len(after) == len(MOVABLE)

    wait_for(moved_on, timeout=60, what="every object to pass three more checks on beta")
    print(f"\nkernel objects after alpha -> beta (frozen {report['frozen_ms']} ms):\n{_table(after, before)}")
    failed = {n: w for n, (s, _c, w) in after.items() if s != "ok"}
    assert not failed, _table(after, before)
    _locks(lab, "beta", "objs")

    # The listeners on 127.0.0.1 and ::1 accept new connections from a new process ...
    for _bind, addr in PAIRS.values():
        probe = lab.phaul("--host", "beta", "ct", "exec", "objs", "--", "tcp-probe", "--connect", addr,
                          "--duration", "0.5", "--json", check=False)  # fmt: skip
        assert probe.returncode == 0, (addr, probe.stdout, probe.stderr)
    # ... and the pairs connected before the migration lost no byte and saw no reset.
    for fam in PAIRS:
        pid = lab.exec("beta", "objs", "cat", f"/probe{fam}.pid").strip()
        lab.exec("beta", "objs", "kill", "-INT", pid)
    results = {}
    for fam in PAIRS:
        path = lab.rootfs("beta", "objs") / f"probe{fam}.json"
        wait_for(lambda p=path: p.is_file() and p.read_text().strip().endswith("}"), timeout=15, what=f"{path}")
        results[fam] = json.loads(path.read_text())
    print(f"loopback pairs: {results}")
    for fam, r in results.items():
        assert r["received"] > 0 and r["wrong"] == 0 and r["missing"] == 0, (fam, r)
        assert not r["reset"] and not r["eof"] and r["error"] is None, (fam, r)


@pytest.mark.parametrize("obj", sorted(REFUSED))
def test_preflight_refuses_what_cannot_move(clean_lab: Lab, obj: str) -> None:
    """The destination's image check refuses these kinds; preflight names the object and
    refuses before anything moves, and the container runs on where it was."""
    lab = clean_lab
    ct = f"no-{obj}"
    words, create = REFUSED[obj]
    lab.phaul("--host", "alpha", "ct", "create", ct, *create)
    lab.phaul("--host", "alpha", "ct", "start", ct, "--", "/bin/objects", "run", "--interval-ms", "200", obj, "pipe")
    wait_for(lambda: _status(lab, "alpha", ct).get(obj, ("", 0, ""))[1] >= 2, what=f"{obj} to be made")
    proc = lab.phaul("--host", "alpha", "migrate", ct, "beta", check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "preflight failed: objects on alpha" in proc.stderr and words in proc.stderr, proc.stderr
    assert "(objects) fd " in proc.stderr and "--force objects" in proc.stderr, proc.stderr
    assert [c["id"] for c in lab.ct_list("beta")] == []
    for host in ("alpha", "beta"):
        for sub in ("migrations", "incoming"):
            d = lab.state_dir(host) / sub
            assert not d.exists() or not list(d.iterdir()), (host, sub, list(d.iterdir()))
    n = _status(lab, "alpha", ct)[obj][1]
    time.sleep(0.1)
    wait_for(lambda: _status(lab, "alpha", ct)[obj][1] > n, what=f"{obj} to keep working on alpha")
    assert _status(lab, "alpha", ct)[obj][0] == "ok"
    check = lab.phaul("--host", "alpha", "check", ct, "beta", check=False)
    assert "objects" in check.stdout, check.stdout
