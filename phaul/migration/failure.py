"""What the source does when its migration fails: the invariant's rules.

- Before the commit the source copy is running or frozen at the gate: resume
  it (TCP connections included) and remove whatever the destination holds:
  `rolled_back`. If the source copy died meanwhile (its CRIU was killed while
  it held the container), a copy the destination holds restored is now the
  only one: run it (`ok`); with none, `failed`.
- After the commit the source copy is gone: get the destination's copy
  running (`ok`), or, when the destination cannot be reached, `in_doubt`: the
  final images stay until `phaul recover` (or the agents' resolvers) settle it.
- Post-copy, after the resume: the only complete state is split between the
  destination's memory and the source's frozen tree. If the pages stop coming
  for good the destination's keeper kills its copy before any task can read a
  missing page (phaul.memory.lazy_link), the source kills its stale tree, and
  the result is `failed`: the container is lost, and the report says so.
- Offline moves and copies (phaul.migration.offline), before the destination's
  start: abort the destination, start the source copy again if it was stopped
  (`settle_offline`).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from typing import TYPE_CHECKING

from phaul.errors import PhaulError
from phaul.linux import network
from phaul.migration import recovery
from phaul.migration.copies import ensure_running, source_copy, start_stopped
from phaul.migration.report import Result
from phaul.rpc import phaul_pb2 as pb

if TYPE_CHECKING:
    from phaul.migration.source import SourceMigration


def undo_preflight(m: SourceMigration) -> None:
    """A refused preflight: remove what the destination prepared and what is here."""
    dest = m.held.dest
    if dest is not None:
        if m.held.prepared:
            try:
                dest.call("Abort", pb.MigrationRef(migration_id=m.id), timeout=60)
            except PhaulError as e:
                m.log.warning("removing what %s prepared: %s", m.dest_name, e)
        dest.close()
    shutil.rmtree(m.dir, ignore_errors=True)


def settle(m: SourceMigration) -> Result:
    """Settle after a failure; returns the migration's result."""
    held, link = m.held, m.host.timeouts.call
    if held.lost:  # post-copy: the destination's copy was killed for pages that never came, the source's too
        m.remove_source()
        _cleanup_method(m)
        reports = m.host.state_dir / "reports"
        with contextlib.suppress(OSError):  # CRIU's account of the page server, beside the report
            reports.mkdir(exist_ok=True)
            shutil.copy(m.dir / "work" / "dump.log", reports / f"{m.id}-dump.log")
        shutil.rmtree(m.dir, ignore_errors=True)
        return Result.FAILED
    if m.offline and not held.committed:
        return settle_offline(m)
    if held.committed:
        m.remove_source()
        if not _resume_dest(m, deadline=time.monotonic() + 3 * link):
            return Result.IN_DOUBT  # the images stay until the migration settles (phaul recover)
        if held.method is not None and held.method.lazy:
            return _settle_postcopy(m)
        _finish_after_failure(m)
        return Result.OK
    m.stop_network_watch()
    source_ok = _resume_source(m)
    if not source_ok and held.prepared and source_copy(m.host, m.ct_id, m.dir) == "gone":
        # The source copy died (e.g. CRIU was killed while it held it): a copy the
        # destination holds restored is now the only one.
        if _dest_state(m, link) == recovery.DestState.RESTORED and _resume_dest(m, time.monotonic() + 3 * link):
            held.committed = True
            m.host.containers.destroy(m.ct_id, timeout=0)
            _finish_after_failure(m)
            return Result.OK
    if held.prepared and held.dest is not None:
        try:
            held.dest.call("Abort", pb.MigrationRef(migration_id=m.id), timeout=3 * link)
        except PhaulError as e:
            m.log.error("removing the copy on %s failed: %s", m.dest_name, e)
            m.report.error += f"; the destination may keep partial state: {e}"
    if source_ok:  # the segment may have learned the destination meanwhile
        network.reannounce(m.host.containers, m.ct_id)
    _cleanup_method(m)
    shutil.rmtree(m.dir, ignore_errors=True)
    return Result.ROLLED_BACK if source_ok else Result.FAILED


def settle_offline(m: SourceMigration) -> Result:
    """An offline move or a copy failed before the destination started its copy (the
    commit): abort the destination and start the source copy again if the move had
    stopped it. When the destination was told to start and cannot say whether it did,
    `in_doubt`: a copy that may run elsewhere is never started here."""
    held, link = m.held, m.host.timeouts.call
    in_doubt = f"; {m.dest_name} cannot say whether its copy runs: `phaul recover {m.id}` settles it"

    def started() -> Result | None:
        """The destination's copy runs after all (its start went through): committed."""
        state = _dest_state(m, link)
        if state == recovery.DestState.RUNNING:
            held.committed = True
            m.remove_source()
            _finish_after_failure(m)
            return Result.OK
        return Result.IN_DOUBT if state is None else None

    if held.starting and (result := started()) is not None:
        m.report.error += in_doubt if result == Result.IN_DOUBT else ""
        return result
    if held.prepared and held.dest is not None:
        try:
            held.dest.call("Abort", pb.MigrationRef(migration_id=m.id), timeout=3 * link)
        except PhaulError as e:
            if held.starting:  # e.g. its start ended meanwhile, and it refuses to remove a running copy
                if started() == Result.OK:
                    return Result.OK
                m.report.error += in_doubt
                return Result.IN_DOUBT
            # Without our Resume it starts nothing, and none comes now.
            m.log.error("removing the copy on %s failed: %s", m.dest_name, e)
            m.report.error += f"; {m.dest_name} may keep partial state (removed once it learns the outcome): {e}"
    result = Result.ROLLED_BACK
    if held.stopped and not start_stopped(m.host, m.ct_id):
        m.report.error += f"; {m.ct_id} did not start again: `phaul --host {m.host.name} ct start {m.ct_id}`"
        result = Result.FAILED  # its files are here, whole: not lost
    _cleanup_method(m)
    shutil.rmtree(m.dir, ignore_errors=True)
    return result


def _cleanup_method(m: SourceMigration) -> None:
    """Close what the memory method holds (streams, round images), whatever happened."""
    if m.held.method is not None:
        try:
            m.held.method.cleanup()
        except Exception as e:  # keep settling
            m.log.warning("memory method clean-up: %s", e)


def _settle_postcopy(m: SourceMigration) -> Result:
    """Post-copy after the resume: only the destination's keeper knows whether every page
    came. `ok` when it says so, `failed` when it lost the copy, else `in_doubt` (its
    resolver or `phaul recover` settles it once it can say)."""
    try:
        m.report.postcopy_bytes = m.finish_postcopy(patient=False)  # the migration asked patiently already
    except PhaulError as e:
        if m.held.lost:
            return settle(m)
        m.log.error("post-copy: the destination cannot say whether every page came: %s", e)
        return Result.IN_DOUBT
    _cleanup_method(m)
    shutil.rmtree(m.dir, ignore_errors=True)
    return Result.OK


def _finish_after_failure(m: SourceMigration) -> None:
    """The destination's copy runs after all: drop what the migration kept here and there."""
    try:
        m.dest.call("Finish", pb.MigrationRef(migration_id=m.id), timeout=m.host.timeouts.call)
    except PhaulError as e:
        m.log.warning("destination clean-up: %s (its resolver finishes it)", e)
    _cleanup_method(m)
    shutil.rmtree(m.dir, ignore_errors=True)


def _resume_dest(m: SourceMigration, deadline: float) -> bool:
    """Tell the destination to run its copy, retrying until `deadline`; True once it runs."""
    while True:
        try:
            m.dest.call("Resume", pb.MigrationRef(migration_id=m.id), timeout=m.host.timeouts.call)
            return True
        except PhaulError as e:
            m.log.error("resuming on %s failed: %s", m.dest_name, e)
        if time.monotonic() > deadline:
            return False
        time.sleep(1)


def _dest_state(m: SourceMigration, timeout: float) -> str | None:
    try:
        return str(m.dest.call("MigrationStatus", pb.MigrationRef(migration_id=m.id), timeout=timeout).state)
    except PhaulError:
        return None


def _resume_source(m: SourceMigration) -> bool:
    """Make sure the source copy runs again; True if it does."""
    gate, dump = m.held.gate, m.held.dump
    if m.held.method is not None and m.held.method.lazy:
        m.end_lazy_dump()
    if gate is not None and dump is not None and dump.poll() is None:
        gate.release(commit=False)
        try:
            dump.wait(timeout=60)
        except subprocess.TimeoutExpired:
            m.log.error("the dump did not end after abort")
    return ensure_running(m.host, m.ct_id)  # thaws a copy whose CRIU died at the gate
