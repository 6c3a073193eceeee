"""CRIU failures are reported with CRIU's own cause, the object it names and what to do
(phaul.linux.criu.explain), never runc's "criu failed: type NOTIFY errno 0"."""

from __future__ import annotations

import pytest

from conftest import COUNTER, Lab, wait_for
from phaul.linux import criu

DUMP_LOG = """(00.049414) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.103057) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted
(00.103074) Error (criu/cr-dump.c:1584): Dump core (pid: 2822) failed with -1
(00.103190) Error (criu/cr-dump.c:1975): Dumping FAILED.
"""
RESTORE_LOG = """(00.010000) Warn  (criu/x.c:1): something harmless
(00.020000)      1: Error (criu/files-reg.c:2143): Can't open file bin/busybox on restore: No such file or directory
(00.020100)      1: Error (criu/files-reg.c:2086): Can't open file bin/busybox: No such file or directory
(00.030000) Error (criu/cr-restore.c:2331): Restoring FAILED.
"""


def test_explain_takes_the_first_error_its_object_and_a_fix() -> None:
    f = criu.explain(DUMP_LOG)
    assert f.cause == "Can't get rlimit 0: Operation not permitted" and f.where == "pid 2822"
    assert "CAP_SYS_RESOURCE" in f.fix and "patches/criu" in f.fix
    assert str(f) == "CRIU: Can't get rlimit 0: Operation not permitted [pid 2822]"
    f = criu.explain(RESTORE_LOG)
    assert f.cause == "Can't open file bin/busybox on restore: No such file or directory"
    assert f.where == "file bin/busybox, pid 1" and "root file system" in f.fix
    none = criu.explain("(00.1) Info: all fine\n")
    assert none.cause == "" and str(none) == "CRIU logged no error" and "log" in none.fix


def test_explain_log_of_a_log_never_written(tmp_path) -> None:
    f = criu.explain_log(tmp_path / "restore.log")
    assert f.cause == "" and "did not start" in f.fix


@pytest.mark.lab
def test_failed_restore_reports_criu_s_cause_to_the_source(clean_lab: Lab) -> None:
    """CRIU itself fails on beta (the images are sound; a file they name is gone): the source's
    report carries CRIU's error line, not runc's errno 0, and the container runs on on alpha."""
    lab = clean_lab
    lab.phaul("--host", "alpha", "ct", "create", "errct")
    lab.phaul("--host", "alpha", "ct", "start", "errct", "--", *COUNTER)
    wait_for(lambda: lab.counter("alpha", "errct") > 2, what="the counter to run")
    report = lab.migrate("errct", "alpha", "beta", fault="restore:break-rootfs", check=False)
    print("report error:", report.get("error", report))
    assert report["result"] == "rolled_back", report
    error = report["error"]
    assert "Can't open file bin/busybox" in error, error
    assert "errno 0" not in error, error
    c = lab.counter("alpha", "errct")
    wait_for(lambda: lab.counter("alpha", "errct") > c, what="the counter to go on on alpha")
    assert lab.ct_list("beta") == []


class _FailingKind:
    """Just enough of a ContainerKind for dump_round: its `runc checkpoint` fails as runc does,
    with CRIU's log in the work directory."""

    def __init__(self, root):
        self.root = root

    def set_criu_options(self, ct_id, options=""):
        (self.root / "criu.conf").write_text(options)

    def checkpoint_cmd(self, ct_id, image_dir, work_dir, **_options):
        log = DUMP_LOG.replace("'", "'\\''")
        return ["/bin/sh", "-c", f"printf '%s' '{log}' > {work_dir}/dump.log; echo 'criu failed: type NOTIFY errno 0' >&2; exit 1"]


def test_precopy_round_failure_names_criu_s_cause(tmp_path) -> None:
    from phaul.memory import methods

    ctx = methods.Context(ct=_FailingKind(tmp_path), ct_id="c", dir=tmp_path, sender=None, apply_pages=lambda: 0.0)  # type: ignore[arg-type]
    with pytest.raises(methods.PrecopyDumpFailed) as info:
        methods.dump_round(ctx, 1, tmp_path / "img")
    first = info.value.message.splitlines()[0]
    assert first == "pre-copy dump 1 failed (exit 1): CRIU: Can't get rlimit 0: Operation not permitted [pid 2822]", first
    assert "CAP_SYS_RESOURCE" in info.value.hint and "dump.log" in info.value.hint
