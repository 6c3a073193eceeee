"""How a container's memory reaches the destination: one class per method.

- `StopAndCopy`: nothing before the freeze; the final dump's images travel
  whole while the container is frozen.
- `PageDeltaMethod` (no soft-dirty tracking, e.g. this project's machines): pre-copy
  rounds of `runc checkpoint --leave-running`; the first round's images travel
  whole, every later round (and the final dump) only as a page delta against
  what the destination already holds (`phaul.memory.page_delta`), which the
  destination applies so that it always holds exactly the last dump's images.
  The final delta goes over a page stream opened before the freeze
  (`phaul.memory.page_stream`), rounds' deltas by rsync (they may be rate-capped).
- `PostCopy`: nothing before the freeze; the final dump leaves private memory
  behind and the destination fetches it after the resume (phaul.memory.lazy_link).
- `Offline`: no memory moves at all; the destination creates the container from
  its configuration and starts its command afresh (phaul.migration.offline).
- `SoftDirty` (kernels with soft-dirty): CRIU's own pre-dump rounds with memory
  tracking; each round holds only the pages dirtied since the previous one and
  names it as its parent; the final dump does too, and CRIU restores through
  the parent chain. Written against CRIU's documented behaviour but not run
  on the project's machines (they have no soft-dirty tracking).

Every pre-copy round freezes the container through `phaul.linux.freezer` (no 100 ms
CRIU freezer poll) and thaws it right after the dump.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from phaul.channels.fs_sync import RsyncSender
from phaul.config import Timeouts
from phaul.containers import ContainerKind
from phaul.errors import PhaulError, ToolFailed
from phaul.linux import criu, freezer
from phaul.memory import page_delta
from phaul.memory.page_stream import PageStream, StreamError

log = logging.getLogger(__name__)

PAGE = page_delta.PAGE

_ROUND_SCRIPT = """#!/bin/sh
# phaul pre-copy round (generated). CRIU runs this at each action.
case "$CRTOOLS_SCRIPT_ACTION" in
  pre-dump) date +%s%N > {dir}/frozen-at; {freeze} ;;
  post-dump) date +%s%N > {dir}/dumped-at ;;
esac
exit 0
"""


class PrecopyDumpFailed(ToolFailed):
    """A pre-copy dump (the container left running) failed; the container runs on
    as it was. The migration can still stop and copy."""


@dataclass
class Context:
    """What a method needs from the migration."""

    ct: ContainerKind
    ct_id: str
    dir: Path  # the migration's directory on the source
    sender: RsyncSender
    apply_pages: Callable[[], float]  # the destination applies delta/ onto images/; returns its ms
    dump_timeout: float = Timeouts.dump  # s: a pre-copy dump must end within this
    bandwidth: int = 0  # bytes/s cap of pre-copy transfers, 0 = none
    open_stream: Callable[[], PageStream] | None = None  # a page stream to the destination (phaul.memory.page_stream)
    tcp_established: bool = True
    freezer: Path | None = None  # the container's freezer.state, if phaul may freeze it
    keep_basis: Callable[[], None] | None = None  # hybrid: the destination keeps the images it holds now


@dataclass
class RoundDump:
    """One pre-copy dump on the source."""

    dir: Path
    pages: int
    frozen_ms: float  # the container's freeze, from the freeze to the thaw
    dump_frozen_ms: float  # the freeze up to the end of the dump (what a final dump costs)
    snapshot_ns: int  # wall clock of the freeze: the moment the images show
    startup_ms: float  # from starting runc to the freeze
    criu_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Sent:
    """What one round (or the final transfer) sent."""

    pages_sent: int
    bytes_sent: int
    send_ms: float  # the transfer itself
    local_ms: float = 0.0  # delta computation and the destination applying it
    phases_ms: dict[str, float] = field(default_factory=dict)


class MemoryMethod(ABC):
    """One way to move memory. `precopy` says whether it runs rounds before the freeze."""

    name: ClassVar[str]
    precopy: ClassVar[bool]
    lazy: ClassVar[bool] = False  # the final dump leaves private memory behind (post-copy)
    page_basis: Path | None = None  # hybrid: the images both hosts hold, for the page link (phaul.memory.page_basis)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.rounds_dir = ctx.dir / "rounds"

    def precopy_round(self, k: int) -> tuple[RoundDump, Sent]:
        """Dump (the container keeps running) and send round `k` (from 1)."""
        raise NotImplementedError(f"{self.name} has no pre-copy rounds")

    def final_parent(self) -> Path | None:
        """The parent images of the final dump, relative to its image directory."""
        return None

    def prepare_final(self) -> None:
        """Before the freeze: get ready to send the final dump fast."""

    def release(self) -> None:
        """Let go of what `prepare_final` holds (idempotent)."""

    @abstractmethod
    def send_final(self, images: Path) -> Sent:
        """Send what the destination needs to hold the final dump `images` exactly."""

    def cleanup(self) -> None:
        shutil.rmtree(self.rounds_dir, ignore_errors=True)
        shutil.rmtree(self.ctx.dir / "round-work", ignore_errors=True)


class StopAndCopy(MemoryMethod):
    name = "stop-and-copy"
    precopy = False

    def send_final(self, images: Path) -> Sent:
        s = self.ctx.sender.push(images, "images", bwlimit=0, whole_file=True)
        return Sent(_pages_in(images), s.bytes_sent, s.duration_ms)


class PostCopy(StopAndCopy):
    """Post-copy: the final dump leaves private memory in the frozen tree (CRIU's lazy
    pages), so what travels while frozen is small; the destination runs as soon as it
    is restored, and pages follow on fault and in the background over the page link
    (phaul.memory.lazy_link). The source's tree stays frozen until the last page left."""

    name = "postcopy"
    lazy = True


class Offline(MemoryMethod):
    """Restart mode: nothing is dumped and nothing but files travels (phaul.migration.offline)."""

    name = "offline"
    precopy = False

    def send_final(self, images: Path) -> Sent:
        return Sent(0, 0, 0.0)


class PageDeltaMethod(MemoryMethod):
    name = "precopy-page-delta"
    precopy = True

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.basis: Path | None = None  # the images the destination holds, kept here to compare with
        self.outgoing = ctx.dir / "outgoing"
        self.stream: PageStream | None = None
        self.retired: Path | None = None  # the previous basis, removed before the next dump

    def precopy_round(self, k: int) -> tuple[RoundDump, Sent]:
        self._drop_retired()
        d = dump_round(self.ctx, k, self.rounds_dir / str(k))
        return d, self._send(d.dir, self.ctx.bandwidth)

    def prepare_final(self) -> None:
        """Open the page stream now, while the container still runs: its TLS
        handshake and the receiver's start-up then cost the freeze nothing."""
        if self.ctx.open_stream is not None and self.basis is not None and self.stream is None:
            try:
                self.stream = self.ctx.open_stream()
            except (PhaulError, StreamError, OSError) as e:
                log.warning("no page stream to the destination (%s); the final delta goes by rsync", e)
        self._drop_retired()

    def release(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def send_final(self, images: Path) -> Sent:
        if self.stream is None or self.basis is None:
            return self._send(images, 0)
        try:
            t0 = time.monotonic()
            try:
                delta, stats = page_delta.make_delta(images, self.basis, self.outgoing)
            except (page_delta.DeltaError, OSError, ValueError) as e:
                log.warning("no page delta for %s (%s); sending the images whole", images, e)
                return self._send_whole(images, 0)
            delta_ms = (time.monotonic() - t0) * 1000
            try:
                res = self.stream.send(self.outgoing)
            except StreamError as e:  # the destination's images may be half patched: send them whole
                log.warning("the page stream failed (%s); sending the images whole", e)
                return self._send_whole(images, 0)
            self._rebase(images)
            self._drop_retired(background=True)  # the last basis is of no more use; free it off the frozen path
            phases = {"delta": delta_ms, "delta.compare": stats.compare_ms, "stream": res.ms, "apply_dest": res.dest_ms}
            return Sent(stats.literal_pages, res.bytes_sent, res.ms, delta_ms, phases)
        finally:
            self.release()

    def _send(self, images: Path, bwlimit: int) -> Sent:
        ctx = self.ctx
        if self.basis is None:
            s = ctx.sender.push(images, "images", bwlimit=bwlimit, whole_file=True)
            self._rebase(images)
            return Sent(_pages_in(images), s.bytes_sent, s.duration_ms)
        t0 = time.monotonic()
        try:
            delta, stats = page_delta.make_delta(images, self.basis, self.outgoing)
        except (page_delta.DeltaError, OSError, ValueError) as e:
            log.warning("no page delta for %s (%s); sending the images whole", images, e)
            return self._send_whole(images, bwlimit)
        delta_ms = (time.monotonic() - t0) * 1000
        # By content: every dump rewrites the small images, most of them unchanged.
        s = ctx.sender.push(self.outgoing, "delta", bwlimit=bwlimit, whole_file=True, checksum=True)
        t1 = time.monotonic()
        try:
            dest_ms = ctx.apply_pages()
        except PhaulError as e:
            log.warning("the destination could not apply the page delta (%s); sending the images whole", e)
            whole = self._send_whole(images, bwlimit)
            whole.bytes_sent += s.bytes_sent
            return whole
        apply_ms = (time.monotonic() - t1) * 1000
        self._rebase(images)
        phases = {"delta": delta_ms, "delta_transfer": s.duration_ms, "apply": apply_ms, "apply_dest": dest_ms}
        return Sent(stats.literal_pages, s.bytes_sent, s.duration_ms, delta_ms + apply_ms, phases)

    def _send_whole(self, images: Path, bwlimit: int) -> Sent:
        s = self.ctx.sender.push(images, "images", bwlimit=bwlimit)
        self._rebase(images)
        return Sent(_pages_in(images), s.bytes_sent, s.duration_ms)

    def _rebase(self, images: Path) -> None:
        """`images` is what the destination holds now. The old basis is removed
        right before the next dump rather than now: on a VM whose host reclaims
        free guest memory, pages freed just before they are needed again are
        still backed, and CRIU writes the next dump into them several times
        faster than into memory the host has to fault in again."""
        old, self.basis = self.basis, images
        if old is not None and old != images:
            self._drop_retired()
            self.retired = old

    def _drop_retired(self, background: bool = False) -> None:
        if self.retired is not None:
            old, self.retired = self.retired, None
            if background:
                threading.Thread(target=shutil.rmtree, args=(old, True), name="drop-basis", daemon=True).start()
            else:
                shutil.rmtree(old, ignore_errors=True)

    def cleanup(self) -> None:
        self.release()
        super().cleanup()
        shutil.rmtree(self.outgoing, ignore_errors=True)


class SoftDirty(MemoryMethod):
    """CRIU pre-dump rounds with memory tracking (needs soft-dirty, see module doc)."""

    name = "precopy-soft-dirty"
    precopy = True

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.last = 0

    def precopy_round(self, k: int) -> tuple[RoundDump, Sent]:
        parent = Path(f"../{self.last}") if self.last else None
        d = dump_round(self.ctx, k, self.rounds_dir / str(k), pre_dump=True, parent=parent)
        # CRIU's `parent` link is made by the destination (phaul.migration.dest), never sent
        s = self.ctx.sender.push(d.dir, f"rounds/{k}", ("/parent",), bwlimit=self.ctx.bandwidth, whole_file=True)
        self.last = k
        pages = int(d.criu_ms.get("pages_written", _pages_in(d.dir)))
        return d, Sent(pages, s.bytes_sent, s.duration_ms)

    def final_parent(self) -> Path | None:
        # The final dump is written to DIR/images; its parent is DIR/rounds/N (same layout on both hosts).
        return Path(f"../rounds/{self.last}") if self.last else None

    def send_final(self, images: Path) -> Sent:
        s = self.ctx.sender.push(images, "images", ("/parent",), bwlimit=0, whole_file=True)
        return Sent(_pages_in(images), s.bytes_sent, s.duration_ms)


class Hybrid(PageDeltaMethod):
    """Pre-copy rounds by page deltas, then post-copy: the final dump leaves private memory
    in the frozen tree, and after the resume only the pages that differ from the last
    round cross the link; the rest the destination rebuilds from that round's images,
    which both hosts keep (`page_basis`; phaul.memory.page_basis)."""

    name = "hybrid"
    lazy = True

    def prepare_final(self) -> None:
        super().prepare_final()
        if self.basis is None or self.ctx.keep_basis is None or self.page_basis is not None:
            return
        kept = self.ctx.dir / "page-basis"
        try:
            self.ctx.keep_basis()
            shutil.rmtree(kept, ignore_errors=True)
            kept.mkdir()
            for f in self.basis.iterdir():  # links: the round's directory may go, these stay
                (kept / f.name).hardlink_to(f)
            self.page_basis = kept
        except (PhaulError, OSError) as e:
            log.warning("no basis for the page link (%s); every page the container left crosses it", e)

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.ctx.dir / "page-basis", ignore_errors=True)


METHODS: dict[str, type[MemoryMethod]] = {
    m.name: m for m in (StopAndCopy, PageDeltaMethod, SoftDirty, PostCopy, Offline, Hybrid)
}


def dump_round(ctx: Context, k: int, image_dir: Path, *, pre_dump: bool = False, parent: Path | None = None) -> RoundDump:
    """One dump that leaves the container running (a pre-copy round)."""
    work = ctx.dir / "round-work" / str(k)
    stamps = work / "stamps"
    for d in (image_dir, work, stamps):
        d.mkdir(parents=True, exist_ok=True)
    script = stamps / "round.sh"
    script.write_text(_ROUND_SCRIPT.format(dir=stamps, freeze=freezer.freeze_snippet(ctx.freezer)))
    script.chmod(0o700)
    # The container runs on after a round, and the round's socket images are never
    # restored (the final dump's are): CRIU's network lock would only drop the
    # client's segments meanwhile, and each would wait for a retransmission.
    ctx.ct.set_criu_options(ctx.ct_id, f"action-script {script}\nnetwork-lock skip\n")
    args = ctx.ct.checkpoint_cmd(
        ctx.ct_id, image_dir, work, leave_running=True, tcp_established=ctx.tcp_established,
        pre_dump=pre_dump, parent_path=parent,
    )
    start_ns = time.time_ns()
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=ctx.dump_timeout)
    except subprocess.TimeoutExpired:
        raise PrecopyDumpFailed(
            f"pre-copy dump {k} did not finish within {ctx.dump_timeout:.0f} s: {criu.explain_log(work / 'dump.log')}\n"
            f"{criu.log_tail(work / 'dump.log', 5)}", f"see {work / 'dump.log'}"
        ) from None
    finally:
        freezer.thaw(ctx.freezer)
        thawed_ns = time.time_ns()
        ctx.ct.set_criu_options(ctx.ct_id)
    if proc.returncode != 0:
        failure = criu.explain_log(work / "dump.log")
        raise PrecopyDumpFailed(
            f"pre-copy dump {k} failed (exit {proc.returncode}): {failure}\n"
            f"{proc.stderr.decode(errors='replace').strip()[-300:]}\n{criu.log_tail(work / 'dump.log')}",
            f"{failure.fix}; CRIU's log: {work / 'dump.log'}; `--precopy=off` skips pre-copy",
        )
    frozen_ns = _stamp(stamps / "frozen-at", start_ns)
    dumped_ns = _stamp(stamps / "dumped-at", thawed_ns)
    stats = criu.read_stats(work, "dump")
    pages = int(stats.get("pages_written", 0)) or _pages_in(image_dir)
    return RoundDump(
        dir=image_dir, pages=pages,
        frozen_ms=(thawed_ns - frozen_ns) / 1e6, dump_frozen_ms=(dumped_ns - frozen_ns) / 1e6,
        snapshot_ns=frozen_ns, startup_ms=max(0.0, (frozen_ns - start_ns) / 1e6), criu_ms=stats,
    )


def _stamp(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def _pages_in(images: Path) -> int:
    return sum(p.stat().st_size for p in images.glob("pages-*.img")) // PAGE
