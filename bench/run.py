"""`make bench`: phaul's pre-copy migration against stop-and-copy and the local floor.

For each workload, in one lab session, each method runs REPS times on a fresh
container (methods interleaved, so drift hits them alike):

- `phaul`: `phaul migrate CT beta` (pre-copy rounds, commit gate, restore held
  stopped, then resume);
- `stop-and-copy`: what a user scripts today: rsync the container's directory
  to the other host while it runs, `runc checkpoint` to local images, rsync of
  the images and the root file system (what changed) to the other host over an
  encrypted link (as `rsync -e ssh` would; here TLS, the lab has no sshd),
  `runc restore` there;
- `local floor`: `runc checkpoint` and `runc restore` on the same host, nothing
  transferred: what CRIU alone costs.

Frozen time: from the freeze (CRIU's pre-dump action) to the container running
again. Output: a table of medians on the terminal, bench/results/latest.json
(every run, with CRIU's own timings) and bench/results/latest.png.

    .venv/bin/python bench/run.py            # every workload, 3 repetitions
    .venv/bin/python bench/run.py --quick    # mem256 only, 1 repetition
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phaul.hosts import read_hosts  # noqa: E402
from phaul.testing import lab  # noqa: E402
from phaul.linux import criu
from phaul.containers.runc import RuncContainers  # noqa: E402
from phaul.channels.transport import TLS_RSH  # noqa: E402

LAB_DIR = Path("/var/lib/phaul-lab-bench")
SUBNET = "10.213.7.0/24"
LOCK = Path("/run/lock/phaul-lab.lock")
RESULTS = REPO / "bench" / "results"
METHODS = ("phaul", "stop-and-copy", "local floor")
RSYNC_PORT = 8730
MiB = 1 << 20


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    memory_limit: str  # the container's memory limit
    args: tuple[str, ...] = ()  # empty: the template's idle shell
    memload_mib: int = 0  # memload's working set (memory is verified after each move)
    files: int = 0  # small files created in /data before the start
    warmup_s: float = 2.0


WRITER = (
    "while :; do i=0; while [ $i -lt 5 ]; do echo $RANDOM$RANDOM > /data/f$((RANDOM % {n})); i=$((i+1)); done; "
    "sleep 0.1; done"
)
WORKLOADS = {
    w.name: w
    for w in (
        Workload("idle", "idle", "64M"),
        Workload("mem256", "256 MiB, 8 MiB/s", "400M", ("memload", "--size", "256", "--rate", "8"), memload_mib=256, warmup_s=3),
        Workload("mem1g", "1 GiB, 32 MiB/s", "1300M", ("memload", "--size", "1024", "--rate", "32"), memload_mib=1024, warmup_s=3),
        Workload("files20k", "20,000 files, 50/s", "64M", ("/bin/sh", "-c", WRITER.format(n=20000)), files=20000),
    )
}


@dataclass
class Run:
    workload: str
    method: str
    rep: int
    ok: bool = False
    frozen_ms: float = 0.0
    total_ms: float = 0.0
    bytes_sent: int = 0
    frozen_bytes_sent: int = 0  # sent while the container was frozen
    criu_ms: dict[str, float] = field(default_factory=dict)  # freezing, frozen, memdump, memwrite, restore
    resident_bytes: int = 0  # memory CRIU dumped in the final dump
    fs_bytes: int = 0  # size of the container's root file system
    rounds: int = 0
    last_round_dirty_bytes: int = 0  # pages that changed since the last pre-copy round (phaul)
    predicted_frozen_ms: float | None = None  # the convergence policy's prediction after the last round (phaul)
    round_frozen_ms: list[float] = field(default_factory=list)  # each pre-copy round's own freeze (phaul)
    memory_method: str = ""
    stop_reason: str = ""
    phases_ms: dict[str, float] = field(default_factory=dict)
    frozen_ratio_vs_stop_and_copy: float | None = None  # phaul runs: same workload and repetition
    verified: str = ""
    error: str = ""


def sh(args: list[str], ns: str | None = None, check: bool = True, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    cmd = (["nsenter", f"--net=/run/netns/{lab.NETNS[ns]}", "--"] if ns else []) + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return proc


def rsync_sent(out: str) -> int:
    for line in out.splitlines():
        if line.startswith("Total bytes sent:"):
            return int(line.split(":")[1].strip().replace(",", "").replace(".", ""))
    return 0


class Bench:
    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = lab_dir
        self.hosts_file = lab_dir / "hosts.json"
        self.work = lab_dir / "bench"
        self.work.mkdir(parents=True, exist_ok=True)
        hosts = read_hosts(self.hosts_file)
        self.beta_ip = hosts.host("beta").address.rpartition(":")[0]
        self.cts = {h: RuncContainers(lab_dir / "hosts" / h, h) for h in ("alpha", "beta")}
        self.recv = self.work / "beta-recv"
        self.recv.mkdir(exist_ok=True)
        conf = self.work / "rsyncd.conf"
        conf.write_text(
            "use chroot = no\nmunge symlinks = no\nnumeric ids = yes\nlog file = /dev/null\nreverse lookup = no\n"
            f"[bench]\n  path = {self.recv}\n  read only = no\n  uid = root\n  gid = root\n"
        )
        # The user's channel to the other host: rsync over an encrypted link, as with
        # `rsync -e ssh` (the lab has no sshd): an rsync daemon behind TLS on beta, the
        # same kind of channel phaul's data channel is, so both pay the same for crypto.
        pki_dir = lab_dir / "pki"
        listen = (
            f"OPENSSL-LISTEN:{RSYNC_PORT},bind={self.beta_ip},reuseaddr,fork,cert={pki_dir / 'beta.crt'},"
            f"key={pki_dir / 'beta.key'},cafile={pki_dir / 'ca.crt'},verify=1,commonname=alpha,nodelay"
        )
        self.rsyncd = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{lab.NETNS['beta']}", "--", "socat", "-t", "0.01", listen,
             f"EXEC:rsync --server --daemon --config={conf} ."],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.rsync_env = {
            **os.environ, "PHAUL_PEER": f"{self.beta_ip}:{RSYNC_PORT}", "PHAUL_PEER_NAME": "beta",
            "PHAUL_CERT": str(pki_dir / "alpha.crt"), "PHAUL_KEY": str(pki_dir / "alpha.key"), "PHAUL_CA": str(pki_dir / "ca.crt"),
        }
        time.sleep(0.3)
        self.seq = 0

    def close(self) -> None:
        os.killpg(self.rsyncd.pid, 9)
        self.rsyncd.wait()

    def phaul(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "phaul", "--hosts-file", str(self.hosts_file), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"phaul {' '.join(args)} -> {proc.returncode}: {proc.stdout[-500:]} {proc.stderr[-800:]}")
        return proc

    # -- containers -------------------------------------------------------------

    def new_container(self, w: Workload) -> tuple[str, int]:
        """A fresh running container of workload `w` on alpha; (ID, root file system bytes)."""
        self.seq += 1
        ct = f"b{self.seq}-{w.name}"
        self.phaul("--host", "alpha", "ct", "create", ct, "--memory", w.memory_limit)
        rootfs = self.cts["alpha"].bundle_dir(ct) / "rootfs"
        if w.files:
            data = rootfs / "data"
            data.mkdir()
            blob = os.urandom(1024)
            for i in range(w.files):
                (data / f"f{i}").write_bytes(blob[i % 512 :] + blob[: i % 512])
        self.phaul("--host", "alpha", "ct", "start", ct, *(["--", *w.args] if w.args else []))
        if w.memload_mib:
            deadline = time.monotonic() + 120
            while self.exec("alpha", ct, "sh", "-c", "test -s /memload.pid && echo up || true").strip() != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"memload in {ct} did not start")
                time.sleep(0.2)
        time.sleep(w.warmup_s)
        fs = sum(p.lstat().st_size for p in rootfs.rglob("*") if p.is_file() and not p.is_symlink())
        return ct, fs

    def exec(self, host: str, ct: str, *cmd: str) -> str:
        return self.phaul("--host", host, "ct", "exec", ct, "--", *cmd).stdout

    def verify(self, w: Workload, host: str, ct: str) -> str:
        if not w.memload_mib:
            running = self.phaul("--host", host, "ct", "list", "--json").stdout
            return "running" if any(c["id"] == ct and c["state"] == "running" for c in json.loads(running)) else "NOT RUNNING"
        self.exec(host, ct, "sh", "-c", "rm -f /memload.report; kill -USR1 $(cat /memload.pid)")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.exec(host, ct, "sh", "-c", "cat /memload.report 2>/dev/null || true").strip()
            if out:
                return out
            time.sleep(0.2)
        return "no report"

    def destroy(self, ct: str) -> None:
        for host in ("alpha", "beta"):
            self.phaul("--host", host, "ct", "destroy", ct, check=False)

    def _stamp_conf(self, host: str, ct: str, name: str) -> Path:
        """Measurement only: a CRIU action script that notes when the dump freezes the container."""
        stamp = self.work / f"{name}.frozen-at"
        stamp.unlink(missing_ok=True)
        script = self.work / f"{name}.sh"
        script.write_text(f'#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ] && date +%s%N > {stamp}\nexit 0\n')
        script.chmod(0o700)
        self.cts[host].criu_config_path(ct).write_text(f"action-script {script}\n")
        return stamp

    # -- methods ------------------------------------------------------------------

    def run(self, w: Workload, method: str, rep: int) -> Run:
        r = Run(w.name, method, rep)
        ct = ""
        try:
            ct, r.fs_bytes = self.new_container(w)
            fn = {"phaul": self._phaul, "stop-and-copy": self._stop_and_copy, "local floor": self._floor}[method]
            where = fn(ct, r)
            r.verified = self.verify(w, where, ct)
            r.ok = r.verified.startswith("ok") or r.verified == "running"
        except Exception as e:  # one failed run must not end the benchmark
            r.error = str(e)[-2000:]
        finally:
            if ct:
                self.destroy(ct)
        return r

    def _phaul(self, ct: str, r: Run) -> str:
        proc = self.phaul("--host", "alpha", "migrate", ct, "beta", "--json", check=False)
        rep = json.loads(proc.stdout)
        if rep.get("result") != "ok":
            raise RuntimeError(f"phaul migrate: {rep.get('result')}: {rep.get('error')}")
        final = rep["rounds"][-1]
        r.frozen_ms, r.total_ms, r.bytes_sent = rep["frozen_ms"], rep["total_ms"], rep["bytes_sent"]
        r.frozen_bytes_sent = final["bytes_sent"] + final["fs_bytes_sent"]
        r.criu_ms = {k: v for k, v in rep["criu_ms"].items() if k in ("freezing", "frozen", "memdump", "memwrite", "restore")}
        r.resident_bytes = final["pages_dumped"] * 4096
        r.rounds = len(rep["rounds"])
        r.last_round_dirty_bytes = final["pages_sent"] * 4096 if len(rep["rounds"]) > 1 else 0
        r.predicted_frozen_ms = rep["rounds"][-2]["predicted_frozen_ms"] if len(rep["rounds"]) > 1 else None
        r.round_frozen_ms = [x["frozen_ms"] for x in rep["rounds"][:-1]]
        r.memory_method, r.stop_reason, r.phases_ms = rep["memory_method"], rep["stop_reason"], rep["phases_ms"]
        return "beta"

    def _checkpoint(self, ct: str, d: Path) -> None:
        alpha = self.cts["alpha"]
        cmd = alpha.checkpoint_cmd(ct, d / "img", d / "work", tcp_established=True)
        sh(cmd, ns="alpha")

    def _stop_and_copy(self, ct: str, r: Run) -> str:
        alpha, beta = self.cts["alpha"], self.cts["beta"]
        d = self.work / f"sac-{ct}"
        (d / "img").mkdir(parents=True)
        (d / "work").mkdir()
        (d / "restore-work").mkdir()
        shutil.rmtree(self.recv, ignore_errors=True)
        self.recv.mkdir()
        src_dir = alpha.container_dir(ct)
        stamp = self._stamp_conf("alpha", ct, f"sac-{ct}")
        t0 = time.time_ns()
        url = "peer::bench"
        rsync = ["rsync", "-aH", "--numeric-ids", "--delete", "--stats", "--modify-window=-1", "-e", f"sh {TLS_RSH}"]
        env = self.rsync_env
        sent = rsync_sent(sh(rsync + ["--exclude=criu.conf", f"{src_dir}/", f"{url}/ct/"], ns="alpha", env=env).stdout)  # while it runs
        self._checkpoint(ct, d)
        frozen_sent = rsync_sent(sh(rsync + [f"{d / 'img'}/", f"{url}/img/"], ns="alpha", env=env).stdout)
        frozen_sent += rsync_sent(sh(rsync + ["--exclude=criu.conf", f"{src_dir}/", f"{url}/ct/"], ns="alpha", env=env).stdout)
        # on beta: put the container directory in place and restore it
        target = beta.container_dir(ct)
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.recv / "ct").rename(target)
        beta.rewrite_for_host(ct)  # lab only: per-host cgroup path (both hosts share one kernel)
        beta.criu_config_path(ct).write_text("")
        _run_restore(beta.restore_cmd(ct, self.recv / "img", d / "restore-work", tcp_established=True), "beta")
        t1 = time.time_ns()
        frozen_at = _stamp(stamp, t0)
        r.frozen_ms, r.total_ms = (t1 - frozen_at) / 1e6, (t1 - t0) / 1e6
        r.bytes_sent, r.frozen_bytes_sent = sent + frozen_sent, frozen_sent
        self._criu_stats(r, d / "work", d / "restore-work")
        shutil.rmtree(alpha.container_dir(ct), ignore_errors=True)  # the source copy is gone; its directory stays behind
        shutil.rmtree(d, ignore_errors=True)
        return "beta"

    def _floor(self, ct: str, r: Run) -> str:
        alpha = self.cts["alpha"]
        d = self.work / f"floor-{ct}"
        (d / "img").mkdir(parents=True)
        (d / "work").mkdir()
        (d / "restore-work").mkdir()
        stamp = self._stamp_conf("alpha", ct, f"floor-{ct}")
        t0 = time.time_ns()
        self._checkpoint(ct, d)
        alpha.criu_config_path(ct).write_text("")
        _run_restore(alpha.restore_cmd(ct, d / "img", d / "restore-work", tcp_established=True), "alpha")
        t1 = time.time_ns()
        frozen_at = _stamp(stamp, t0)
        r.frozen_ms, r.total_ms = (t1 - frozen_at) / 1e6, (t1 - t0) / 1e6
        self._criu_stats(r, d / "work", d / "restore-work")
        shutil.rmtree(d, ignore_errors=True)
        return "alpha"

    def _criu_stats(self, r: Run, dump_work: Path, restore_work: Path) -> None:
        dump = criu.read_stats(dump_work, "dump")
        restore = criu.read_stats(restore_work, "restore")
        r.criu_ms = {k: dump[k] for k in ("freezing", "frozen", "memdump", "memwrite") if k in dump}
        if "restore" in restore:
            r.criu_ms["restore"] = restore["restore"]
        r.resident_bytes = int(dump.get("pages_written", 0)) * 4096
        r.rounds = 1


def _run_restore(cmd: list[str], host: str) -> None:
    """runc restore --detach, run the way the agents run it (in the host's network namespace)."""
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.NETNS[host]}", "--", *cmd],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"runc restore on {host} failed: {proc.stderr.decode(errors='replace')[-500:]}")


def _stamp(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


# -- summary, table, chart ------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[Run], workloads: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in workloads:
        per: dict[str, Any] = {}
        for m in METHODS:
            ok = [r for r in runs if r.workload == w and r.method == m and r.ok]
            per[m] = {
                "runs": len([r for r in runs if r.workload == w and r.method == m]),
                "ok": len(ok),
                "frozen_ms": median([r.frozen_ms for r in ok]),
                "total_ms": median([r.total_ms for r in ok]),
                "bytes_sent": median([r.bytes_sent for r in ok]),
                "frozen_bytes_sent": median([r.frozen_bytes_sent for r in ok]),
                "rounds": median([r.rounds for r in ok]),
                "criu_ms": {
                    k: median([r.criu_ms[k] for r in ok if k in r.criu_ms])
                    for k in ("freezing", "frozen", "memdump", "memwrite", "restore")
                },
                "phases_ms": {
                    k: median([r.phases_ms[k] for r in ok if k in r.phases_ms])
                    for k in sorted({k for r in ok for k in r.phases_ms})
                },
            }
        ph = [r for r in runs if r.workload == w and r.method == "phaul" and r.ok]
        per["phaul"]["predicted_frozen_ms"] = median([r.predicted_frozen_ms for r in ph if r.predicted_frozen_ms is not None])
        ratios = [r.frozen_ratio_vs_stop_and_copy for r in ph if r.frozen_ratio_vs_stop_and_copy]
        frozen_vs_dirty = [r.frozen_bytes_sent / r.last_round_dirty_bytes for r in ph if r.last_round_dirty_bytes]
        total_vs_size = [r.bytes_sent / (r.resident_bytes + r.fs_bytes) for r in ph if r.resident_bytes + r.fs_bytes]
        per["phaul_vs_stop_and_copy"] = {
            "frozen_ratio_median": median(ratios),
            "frozen_ratio_target": "< 0.5 (256 MiB workload)",
            "frozen_bytes_over_last_round_dirty_median": median(frozen_vs_dirty),
            "frozen_bytes_target": "<= 2",
            "total_bytes_over_resident_plus_fs_median": median(total_vs_size),
            "total_bytes_target": "<= 1.3",
        }
        out[w] = per
    return out


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'workload':<20} {'method':<14} {'frozen ms':>10} {'total ms':>10} {'sent MiB':>9} {'frozen MiB':>10} {'rounds':>6}  ok",
    ]
    for w, per in summary.items():
        title = WORKLOADS[w].title
        for i, m in enumerate(METHODS):
            s = per[m]

            def f(v: float | None, scale: float = 1.0, fmt: str = ".0f") -> str:
                return "-" if v is None else format(v / scale, fmt)

            lines.append(
                f"{title if i == 0 else '':<20} {m:<14} {f(s['frozen_ms']):>10} {f(s['total_ms']):>10} "
                f"{f(s['bytes_sent'], MiB, '.1f'):>9} {f(s['frozen_bytes_sent'], MiB, '.1f'):>10} {f(s['rounds']):>6}  {s['ok']}/{s['runs']}"
            )
        t = per["phaul_vs_stop_and_copy"]

        def g(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        lines.append(
            f"{'':<20} phaul/stop-and-copy frozen {g(t['frozen_ratio_median'])}; frozen bytes / last round's dirty "
            f"{g(t['frozen_bytes_over_last_round_dirty_median'])}; total bytes / (memory + fs) {g(t['total_bytes_over_resident_plus_fs_median'])}"
        )
    return "\n".join(lines)


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.27
    for ax, key, title in ((axes[0], "frozen_ms", "frozen time (ms, median)"), (axes[1], "total_ms", "total time (ms, median)")):
        for i, m in enumerate(METHODS):
            vals = [summary[w][m][key] or 0 for w in names]
            bars = ax.bar([x + (i - 1) * width for x in range(len(names))], vals, width, label=m)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in vals], fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(names)), [WORKLOADS[w].title for w in names], fontsize=8)
        ax.set_title(title)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8)
    fig.suptitle("phaul pre-copy vs stop-and-copy vs local CRIU floor (lab, one VM, 2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one workload (mem256), one repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(WORKLOADS)}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    workloads = ["mem256"] if args.quick else [w for w in args.workloads.split(",") if w]
    reps = 1 if args.quick else args.reps
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    if os.geteuid() != 0:
        ap.error("run as root (the lab uses network namespaces, runc and CRIU)")
    args.out.mkdir(parents=True, exist_ok=True)
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    runs: list[Run] = []
    with open(LOCK, "w") as lock:
        print(f"bench: waiting for the lab lock {LOCK}", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        t_start = time.monotonic()  # the lab and the runs, not the wait for the lock
        print("bench: bringing the lab up", file=sys.stderr, flush=True)
        lab.down(LAB_DIR)
        try:
            lab.up(SUBNET, lab_dir=LAB_DIR)
            bench = Bench(LAB_DIR)
            try:
                for w in workloads:
                    for rep in range(1, reps + 1):
                        for m in METHODS:
                            r = bench.run(WORKLOADS[w], m, rep)
                            runs.append(r)
                            write_results(runs, workloads, reps, t_start, args.out, complete=False)  # survives an interruption
                            state = "ok" if r.ok else f"FAILED: {r.error[:300] or r.verified}"
                            print(
                                f"bench: {w:<9} rep {rep} {m:<14} frozen {r.frozen_ms:7.0f} ms  total {r.total_ms:7.0f} ms  "
                                f"sent {r.bytes_sent / MiB:7.1f} MiB  {state}",
                                file=sys.stderr, flush=True,
                            )
            finally:
                bench.close()
        finally:
            left = lab.down(LAB_DIR)
            print(f"bench: lab down ({len(left)} items removed)", file=sys.stderr)
    summary = write_results(runs, workloads, reps, t_start, args.out, complete=True)
    chart(summary, args.out / "latest.png")
    print(table(summary))
    print(f"bench: {len(runs)} runs in {time.monotonic() - t_start:.0f} s; {args.out / 'latest.json'}, {args.out / 'latest.png'}")
    return 0 if all(r.ok for r in runs) else 1


def write_results(runs: list[Run], workloads: list[str], reps: int, t_start: float, out: Path, complete: bool) -> dict[str, Any]:
    """bench/results/latest.json: every run so far and the medians; returns the summary."""
    for r in runs:
        if r.method == "phaul" and r.ok:
            base = [s for s in runs if s.workload == r.workload and s.rep == r.rep and s.method == "stop-and-copy" and s.ok]
            r.frozen_ratio_vs_stop_and_copy = r.frozen_ms / base[0].frozen_ms if base and base[0].frozen_ms else None
    summary = summarize(runs, workloads)
    result = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "duration_s": round(time.monotonic() - t_start, 1),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "criu": _version(["criu", "--version"]),
                 "runc": _version(["runc", "--version"])},
        "config": {"workloads": workloads, "reps": reps, "methods": list(METHODS),
                   "workload_details": {w: asdict(WORKLOADS[w]) for w in workloads}},
        "summary": summary,
        "runs": [asdict(r) for r in runs],
    }
    tmp = out / ".latest.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out / "latest.json")
    return summary


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
