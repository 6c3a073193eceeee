"""Host checks: is everything phaul needs here, and which migration methods can it use?

`run_checks()` inspects the host at run time (CRIU and the kernel features it
reports, the network lock, runc, rsync, socat, busybox, the cgroup layout,
privileges) and returns one `Check` per item; `report_table()` and `summary()`
render them. `features()` is the cheap, cached answer other code uses to pick
methods: soft-dirty pre-dump or full-dump rounds, post-copy or not.

Nothing here assumes a particular host: every answer comes from a command or
a file read when the function runs. `python -m phaul.linux.doctor` prints the table.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from phaul.checks import CheckState
from phaul.containers import workloads
from phaul.errors import PhaulError, ToolFailed
from phaul.linux import pycriu_module
from phaul.linux.criu import error_lines
from phaul.linux.fsutil import is_static_elf
from phaul.linux.run import run
from phaul.linux.task_owners import FIX as FOREIGN_FIX
from phaul.linux.task_owners import dump_ability

log = logging.getLogger(__name__)

TIMEOUT = 10.0  # seconds, for every external command
MIN_CRIU = (4, 2)
SETUP_FIX = "run `make setup` (builds CRIU 4.2 from Debian's source)"
PIPE_MAX_WANTED = 4 << 20  # lazy pages splice page runs through pipes this large


@dataclass
class Check:
    name: str
    status: CheckState
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class _Feature:
    """A `criu check --feature NAME` probe and what it means for phaul."""

    key: str  # key in features(), or "" if only the doctor reports it
    criu_name: str
    label: str
    enables: str
    fallback: str
    kernel: str  # what the kernel needs for it


# Names from the feature_list of criu/cr-check.c (CRIU 4.2). Basic TCP repair
# is part of plain `criu check`; only its half-closed variant has a feature.
FEATURES: tuple[_Feature, ...] = (
    _Feature(
        "soft_dirty", "mem_dirty_track", "soft-dirty",
        "pre-dump with memory tracking (criu pre-dump --track-mem)",
        "phaul pre-copies with full `criu dump --leave-running` rounds and sends page deltas",
        "a kernel built with CONFIG_MEM_SOFT_DIRTY",
    ),
    _Feature(
        "uffd", "uffd-noncoop", "userfaultfd",
        "lazy pages (post-copy: the container resumes before all memory has arrived)",
        "no post-copy: all memory is copied before the container resumes",
        "a kernel built with CONFIG_USERFAULTFD (Linux >= 4.11)",
    ),
    _Feature(
        "pagemap_scan", "pagemap_scan", "PAGEMAP_SCAN",
        "CRIU finds present pages with the PAGEMAP_SCAN ioctl (faster dumps of sparse memory)",
        "CRIU reads /proc/PID/pagemap (slower on large, sparse address spaces)",
        "Linux >= 6.7",
    ),
    _Feature(
        "", "tcp_half_closed", "TCP half-closed repair",
        "--tcp-established also for half-closed TCP connections",
        "a container holding a half-closed TCP connection cannot be dumped with --tcp-established",
        "a kernel whose TCP_REPAIR accepts half-closed sockets",
    ),
)


# ---- running commands --------------------------------------------------------


@dataclass
class _Run:
    rc: int | None  # None: could not run, or timed out
    out: str  # stdout followed by stderr
    error: str = ""  # why it could not run


def _run(argv: list[str]) -> _Run:
    try:
        p = run(argv, timeout=TIMEOUT, check=False)
    except ToolFailed as e:
        return _Run(None, "", e.message)
    return _Run(p.returncode, p.stdout + p.stderr)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


_CRIU_PREFIX = re.compile(r"^(Error|Warn)\s*\([^)]*\):\s*")


def _criu_error(out: str) -> str:
    """The root cause in CRIU's output: its first Error line (without the source prefix), else the last line.
    The RLIMIT_NOFILE error CRIU logs when root lacks CAP_SYS_RESOURCE is harmless and skipped."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    errors = [ln.strip() for ln in error_lines(out)]
    line = errors[0] if errors else (lines[-1] if lines else "")
    return _CRIU_PREFIX.sub("", line)


def _version_in(text: str, pattern: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else "version unknown"


# ---- CRIU ----------------------------------------------------------------------


def criu_path() -> str | None:
    """The CRIU phaul uses: the first `criu` on PATH (/usr/local/sbin normally precedes /usr/sbin)."""
    return shutil.which("criu")


def criu_version(path: str) -> tuple[int, ...] | None:
    """CRIU's version from `PATH --version` ("Version: 4.2.1" -> (4, 2, 1)), or None."""
    r = _run([path, "--version"])
    if r.rc != 0:
        log.debug("%s --version failed: %s", path, r.error or _last_line(r.out))
        return None
    m = re.search(r"^Version:\s*(\d+(?:\.\d+)*)", r.out, re.MULTILINE)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def _fmt_version(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def _usable_criu() -> str | None:
    """criu_path() if its version is >= MIN_CRIU, else None."""
    path = criu_path()
    if path is None:
        return None
    v = criu_version(path)
    return path if v is not None and v >= MIN_CRIU else None


def _probe_feature(criu: str, name: str) -> tuple[bool, str]:
    """(supported, why not) from `criu check --feature NAME`."""
    r = _run([criu, "check", "--feature", name])
    if r.rc == 0:
        return True, ""
    if r.rc is None:
        return False, r.error
    if "Unknown feature" in r.out:
        return False, f"this CRIU does not know the feature {name!r}"
    return False, _criu_error(r.out) or f"`criu check --feature {name}` exited with {r.rc}"


@functools.cache
def features() -> dict[str, bool]:
    """Which optional kernel features the CRIU on PATH can use, probed once per process:
    {"soft_dirty": ..., "uffd": ..., "pagemap_scan": ...}. All False without a usable CRIU."""
    criu = _usable_criu()
    result: dict[str, bool] = {}
    for f in FEATURES:
        if f.key:
            result[f.key] = criu is not None and _probe_feature(criu, f.criu_name)[0]
    log.debug("features of %s: %s", criu, result)
    return result


def _check_criu() -> tuple[list[Check], str | None]:
    """The CRIU version and `criu check`; returns the checks and the CRIU to probe features with."""
    path = criu_path()
    if path is None:
        return [Check("criu", CheckState.FAILURE, "no `criu` on PATH", SETUP_FIX)], None
    resolved = os.path.realpath(path)
    where = path if resolved == path else f"{path} -> {resolved}"
    v = criu_version(path)
    if v is None:
        return [Check("criu", CheckState.FAILURE, f"{where}: `criu --version` gave no version", SETUP_FIX)], None
    checks: list[Check] = []
    usable = v >= MIN_CRIU
    if usable:
        checks.append(Check("criu", CheckState.PASS, f"{where}, version {_fmt_version(v)}"))
    else:
        checks.append(Check(
            "criu", CheckState.FAILURE,
            f"{where} is version {_fmt_version(v)}; phaul needs >= {_fmt_version(MIN_CRIU)} "
            "(older CRIU fails on recent kernels: vDSO layout, inet socket options)",
            SETUP_FIX,
        ))
    r = _run([path, "check"])
    if r.rc == 0 and "Looks good." in r.out and "missing" not in r.out:
        checks.append(Check("criu check", CheckState.PASS, "Looks good."))
    elif r.rc == 0:
        checks.append(Check("criu check", CheckState.WARNING, _last_line(r.out) or "passed with warnings"))
    else:
        why = r.error or _criu_error(r.out) or f"exited with {r.rc}"
        fix = SETUP_FIX if not usable else "run as root; see the output of `criu check` for the missing kernel feature"
        checks.append(Check("criu check", CheckState.FAILURE, why, fix))
    return checks, path if usable else None


def _check_features(criu: str | None) -> list[Check]:
    checks = []
    for f in FEATURES:
        name = f"{f.label} ({f.criu_name})"
        if criu is None:
            checks.append(Check(name, CheckState.WARNING, f"not checked: no CRIU >= {_fmt_version(MIN_CRIU)}", SETUP_FIX))
            continue
        ok, why = _probe_feature(criu, f.criu_name)
        if ok:
            checks.append(Check(name, CheckState.PASS, f"supported: {f.enables}"))
        else:
            fix = SETUP_FIX if "does not know" in why else f"optional, phaul works without it; needs {f.kernel}"
            checks.append(Check(name, CheckState.WARNING, f"not available ({why}); so {f.fallback}", fix))
    return checks


def _check_foreign_tasks(criu: str | None) -> Check:
    """Can CRIU dump tasks of other users (prlimit without CAP_SYS_RESOURCE; phaul.linux.task_owners)?"""
    name = "other users' tasks"
    if criu is None:
        return Check(name, CheckState.WARNING, f"not checked: no CRIU >= {_fmt_version(MIN_CRIU)}", SETUP_FIX)
    ability = dump_ability(criu)
    if ability.possible:
        return Check(name, CheckState.PASS, f"CRIU can dump tasks of any uid: {ability.how}")
    return Check(name, CheckState.WARNING,
                 f"containers with a task not of uid 0 cannot move: {ability.how}", FOREIGN_FIX)


# ---- kernel settings, network lock, tools -------------------------------------------


def _check_pipe_max_size() -> Check:
    name = "fs.pipe-max-size"
    try:
        size = int(Path("/proc/sys/fs/pipe-max-size").read_text().strip())
    except (OSError, ValueError) as e:
        return Check(name, CheckState.WARNING, f"cannot read /proc/sys/fs/pipe-max-size: {e}")
    if size >= PIPE_MAX_WANTED:
        return Check(name, CheckState.PASS, f"{size} bytes (>= {PIPE_MAX_WANTED})")
    return Check(
        name, CheckState.WARNING,
        f"{size} bytes, below {PIPE_MAX_WANTED} (4 MiB) that lazy pages need; phaul raises it itself before post-copy",
        f"to raise it now: sysctl -w fs.pipe-max-size={PIPE_MAX_WANTED}",
    )


def _missing(name: str, package: str, why: str) -> Check:
    return Check(name, CheckState.FAILURE, f"`{name}` not found on PATH ({why})", f"apt-get install {package}")


def _check_network_lock() -> list[Check]:
    checks = []
    # CRIU's default network lock runs iptables-restore / ip6tables-restore (criu/net.c).
    missing = [b for b in ("iptables-restore", "ip6tables-restore") if shutil.which(b) is None]
    if missing:
        checks.append(Check(
            "network lock (iptables)", CheckState.FAILURE,
            f"{', '.join(missing)} not found on PATH: CRIU locks the network with iptables by default "
            "and every dump of a network namespace fails without it",
            "apt-get install iptables",
        ))
    else:
        r = _run(["iptables", "--version"]) if shutil.which("iptables") else _Run(None, "")
        ver = _version_in(r.out, r"(v\S+(?:\s+\([^)]*\))?)") if r.rc == 0 else "version unknown"
        checks.append(Check("network lock (iptables)", CheckState.PASS,
                            f"CRIU's default lock: iptables-restore found, iptables {ver}"))
    nft = shutil.which("nft")
    if nft is None:
        checks.append(
            Check("network lock (nftables)", CheckState.PASS, "nft not installed (optional; CRIU uses iptables by default)")
        )
        return checks
    r = _run([nft, "--version"])
    ver = _version_in(r.out, r"(v\d\S*)") if r.rc == 0 else "version unknown"
    criu = _usable_criu()
    if criu is not None and _probe_feature(criu, "network_lock_nftables")[0]:
        checks.append(Check("network lock (nftables)", CheckState.PASS,
                            f"nft {ver}; CRIU supports --network-lock nftables"))
    else:
        checks.append(Check(
            "network lock (nftables)", CheckState.WARNING,
            f"nft {ver} present, but this CRIU cannot lock with nftables (network_lock_nftables); iptables is used",
            "optional: CRIU built with libnftables-dev supports it (`make setup`)",
        ))
    return checks


def _check_tool(name: str, package: str, version_argv: list[str], pattern: str, why: str) -> Check:
    path = shutil.which(name)
    if path is None:
        return _missing(name, package, why)
    r = _run([path, *version_argv])
    if r.rc is None:
        return Check(name, CheckState.FAILURE, f"{path}: {r.error}", f"reinstall it: apt-get install --reinstall {package}")
    return Check(name, CheckState.PASS, f"{path}, version {_version_in(r.out, pattern)}")


def _check_optional(name: str, package: str, version_argv: list[str], pattern: str, why: str) -> Check:
    """A tool only some commands need: its absence is a warning naming them."""
    check = _check_tool(name, package, version_argv, pattern, why)
    if check.status is CheckState.FAILURE:
        check.status = CheckState.WARNING
        check.detail += "; everything else works without it"
    return check


def _check_busybox() -> Check:
    fix = "apt-get install busybox-static"
    path = shutil.which("busybox")
    if path is None:
        return _missing("busybox", "busybox-static", "the container template is a static busybox")
    real = os.path.realpath(path)
    try:
        static = is_static_elf(real)
    except OSError as e:
        return Check("busybox", CheckState.FAILURE, f"cannot read {real}: {e}", fix)
    if not static:
        return Check("busybox", CheckState.FAILURE,
                     f"{real} is dynamically linked; the container template needs a static busybox", fix)
    version = _version_in(_run([path, "--help"]).out, r"BusyBox (v\S+)")
    return Check("busybox", CheckState.PASS, f"{path}, static, {version}")


# ---- cgroups, privileges -----------------------------------------------------------


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of this mount namespace."""
    result = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4:
            point = fields[1].replace("\\040", " ")
            result.append((point, fields[2], set(fields[3].split(","))))
    return result


def _cgroup2_freeze(mount: str) -> tuple[bool, str]:
    """Whether cgroup2 groups have cgroup.freeze (kernel >= 5.2); the root group never has it."""
    base = Path(mount)
    candidates: list[Path] = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                candidates.append(base / line[3:].lstrip("/"))
        candidates += [p for p in base.iterdir() if p.is_dir()][:20]
    except OSError:
        pass
    for c in candidates:
        if c != base and (c / "cgroup.freeze").exists():
            return True, f"{c / 'cgroup.freeze'} exists"
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if m and (int(m.group(1)), int(m.group(2))) >= (5, 2):
        return True, f"kernel {os.uname().release} >= 5.2"
    return False, f"kernel {os.uname().release} < 5.2"


def _check_cgroups() -> Check:
    name = "cgroups"
    try:
        mounts = _mounts()
    except OSError as e:
        return Check(name, CheckState.FAILURE, f"cannot read /proc/self/mounts: {e}")
    v1 = [(p, o) for p, t, o in mounts if t == "cgroup"]
    v2 = [p for p, t, _ in mounts if t == "cgroup2"]
    if "/sys/fs/cgroup" in v2:
        ok, how = _cgroup2_freeze("/sys/fs/cgroup")
        if ok:
            return Check(name, CheckState.PASS, f"v2 (unified) at /sys/fs/cgroup; cgroup2 freeze available ({how})")
        return Check(name, CheckState.FAILURE, f"v2 (unified) at /sys/fs/cgroup without cgroup.freeze ({how}); "
                     "runc cannot freeze a container for checkpoint", "use a kernel >= 5.2")
    if not v1:
        return Check(name, CheckState.FAILURE, "no cgroup file system mounted",
                     "mount cgroup2: mount -t cgroup2 none /sys/fs/cgroup")
    layout = f"hybrid (v1 controllers, cgroup2 at {v2[0]})" if v2 else "v1"
    freezer = [p for p, o in v1 if "freezer" in o]
    if freezer:
        return Check(name, CheckState.PASS, f"{layout}; v1 freezer controller at {freezer[0]}")
    return Check(
        name, CheckState.FAILURE,
        f"{layout} without the v1 freezer controller: runc cannot freeze a container for checkpoint",
        "mkdir -p /sys/fs/cgroup/freezer && mount -t cgroup -o freezer freezer /sys/fs/cgroup/freezer",
    )


def _check_pycriu() -> Check:
    why = pycriu_module.missing()
    if why:
        return Check("pycriu", CheckState.FAILURE, f"cannot import pycriu ({why}): no CRIU image can be read, "
                     "so migrations fail", pycriu_module.FIX)
    return Check("pycriu", CheckState.PASS, "CRIU's Python bindings import")


def _check_workloads() -> Check:
    name = "workload programs"
    try:
        programs = workloads.find()
    except PhaulError as e:
        return Check(name, CheckState.WARNING, e.message, e.hint)
    present = programs.present()
    where = f"{programs.path} ({programs.origin})"
    if not present:
        return Check(name, CheckState.WARNING, f"none in {where}: new containers get none (tests and the bench need them)",
                     workloads.FIX)
    missing = [n for n in workloads.NAMES if n not in present]
    if missing:
        return Check(name, CheckState.WARNING, f"{where} lacks {', '.join(missing)}", workloads.FIX)
    return Check(name, CheckState.PASS, f"{where}: all {len(present)}")


_CAPS_NEEDED = {21: "CAP_SYS_ADMIN", 19: "CAP_SYS_PTRACE", 12: "CAP_NET_ADMIN"}


def _check_root() -> Check:
    name = "root"
    if os.geteuid() != 0:
        return Check(name, CheckState.FAILURE, f"running as uid {os.geteuid()}; CRIU, runc and the network lab need root",
                     "run phaul as root (sudo)")
    cap_eff = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                cap_eff = int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    if cap_eff is None:
        return Check(name, CheckState.PASS, "uid 0 (capabilities unknown)")
    lacking = [n for bit, n in sorted(_CAPS_NEEDED.items()) if not cap_eff >> bit & 1]
    if lacking:
        return Check(name, CheckState.FAILURE, f"uid 0 but without {', '.join(lacking)}",
                     "run phaul with full root capabilities (not in a restricted container)")
    note = ""
    if not cap_eff >> 24 & 1:  # CAP_SYS_RESOURCE
        note = ("; no CAP_SYS_RESOURCE: CRIU logs a harmless 'Can't setup RLIMIT_NOFILE' error, "
                "and only a patched CRIU dumps other users' tasks (see \"other users' tasks\")")
    return Check(name, CheckState.PASS, f"uid 0 with CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_NET_ADMIN{note}")


def _check_ipv6() -> Check:
    """Whether agents can listen and dial on IPv6 here (IPv4 and host names work without it)."""
    name, fix = "ipv6", "IPv4 addresses and host names work without it"
    inet6 = Path("/proc/net/if_inet6")
    if not inet6.exists():
        return Check(name, CheckState.WARNING, "the kernel has no IPv6 (not built, or ipv6.disable=1 at boot)",
                     f"boot without ipv6.disable=1 to use IPv6 addresses; {fix}")
    try:
        disabled = Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() == "1"
    except OSError:
        disabled = False
    if disabled:
        return Check(name, CheckState.WARNING, "IPv6 is disabled (net.ipv6.conf.all.disable_ipv6 = 1)",
                     f"sysctl -w net.ipv6.conf.all.disable_ipv6=0 to use IPv6 addresses; {fix}")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return Check(name, CheckState.WARNING, f"cannot bind an IPv6 socket: {e.strerror}", fix)
    rows = [line.split() for line in inet6.read_text().splitlines()]
    usable = sorted({r[5] for r in rows if len(r) > 5 and r[3] == "00"})  # scope 00: global (and unique-local)
    where = f"on {', '.join(usable)}" if usable else "on the loopback only (no global or unique-local address here)"
    return Check(name, CheckState.PASS, f"IPv6 usable {where}")


# ---- public API ----------------------------------------------------------------------


def run_checks() -> list[Check]:
    """Inspect this host now (not cached) and return one Check per item."""
    checks, criu = _check_criu()
    checks += _check_features(criu)
    checks.append(_check_foreign_tasks(criu))
    checks.append(_check_pipe_max_size())
    checks += _check_network_lock()
    checks.append(_check_tool("runc", "runc", ["--version"], r"runc version (\S+)", "runs the containers"))
    checks.append(_check_tool("rsync", "rsync", ["--version"], r"version (\S+)", "copies the root file system"))
    checks.append(_check_tool("socat", "socat", ["-V"], r"socat version (\S+)", "relays streams in the lab"))
    checks.append(_check_ipv6())
    checks.append(_check_busybox())
    checks.append(_check_optional("mmdebstrap", "mmdebstrap", ["--version"], r"mmdebstrap (\S+)",
                                  "`ct create --template debian` builds its root with it"))
    for tool in ("skopeo", "umoci"):
        checks.append(_check_optional(tool, tool, ["--version"], tool + r" version (\S+)",
                                      "`ct create --image` unpacks OCI images and docker archives with skopeo and umoci"))
    checks.append(_check_pycriu())
    checks.append(_check_workloads())
    checks.append(_check_cgroups())
    checks.append(_check_root())
    for c in checks:
        log.debug("check %s: %s: %s", c.name, c.status, c.detail)
    return checks


def report_table(checks: list[Check]) -> str:
    """An aligned table: status, name, detail; the fix on the next line for every check not ok."""
    width = max((len(c.name) for c in checks), default=4)
    indent = " " * (7 + 2 + width)
    lines = [f"{'STATUS':<7}  {'NAME':<{width}}  DETAIL"]
    for c in checks:
        lines.append(f"{c.status:<7}  {c.name:<{width}}  {c.detail}")
        if c.status != CheckState.PASS and c.fix:
            lines.append(f"{indent}  fix: {c.fix}")
    return "\n".join(lines)


def summary(checks: list[Check]) -> str:
    """"all good", or "N problems: ..." naming each fail and warn."""
    problems = [c for c in checks if c.status != CheckState.PASS]
    if not problems:
        return "all good"
    problems.sort(key=lambda c: c.status != CheckState.FAILURE)
    listed = ", ".join(f"{c.name} ({c.status})" for c in problems)
    return f"{len(problems)} problem{'s' if len(problems) != 1 else ''}: {listed}"


def main() -> int:
    checks = run_checks()
    print(report_table(checks))
    print(summary(checks))
    return 1 if any(c.status == CheckState.FAILURE for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
