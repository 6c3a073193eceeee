"""What /proc says about a process."""

from __future__ import annotations

import os
from pathlib import Path


def state(pid: int | str) -> str | None:
    """The one-letter state of `pid` (R, S, T, Z, ...), or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int | str) -> bool:
    """True if `pid` exists and is not a zombie (never reaps: a caller may hold its Popen)."""
    return state(pid) not in (None, "Z", "X")


def status(pid: int | str) -> dict[str, str]:
    """/proc/PID/status as {field: value}, {} when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return parse_status(text)


def parse_status(text: str) -> dict[str, str]:
    """The fields of a /proc/PID/status text ("Uid:\\t0\\t0\\t0\\t0" -> {"Uid": "0\\t0\\t0\\t0"})."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (processes, not threads), parents first; [] when `pid` is gone."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    if state(pid) is None:
        return []
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += sorted(children.get(p, []))
    return out


def tasks_of(init_pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Every process in the pid namespace `init_pid` (a container's init) is in, itself first."""
    try:
        ns = os.readlink(proc / str(init_pid) / "ns" / "pid")
    except OSError:
        return []
    found = [init_pid]
    for d in proc.iterdir():
        if d.name.isdigit() and int(d.name) != init_pid:
            try:
                if os.readlink(d / "ns" / "pid") == ns:
                    found.append(int(d.name))
            except OSError:
                continue  # gone, or a kernel thread
    return found


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes, or None when /proc/meminfo does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
