"""Hybrid migration's page answers: only what differs from the last pre-copy round crosses.

In a hybrid migration the destination already holds the last pre-copy round's
images when the container resumes there with its private memory left behind
(post-copy). Both hosts keep those images as the *basis*: the source a copy of
the round it sent (`Hub --basis`), the destination what it received (hard links
made by `KeepBasis` before the final dump, outside the peer-writable area).

The source's page hub (phaul.memory.page_relay.Hub) reads each of CRIU's page
server answers (`IOV` header, then the pages of task `dst_id` from `vaddr` on)
and `encode`s it for the link: a page equal, byte for byte, to the page the
basis holds for the same task and address is sent as a reference to that basis
page; every other page goes as it is. Only the source compares, with the pages
CRIU is serving from the frozen tree, so a reference is always exact.

Encoded answer (the link only; CRIU never sees it): the `IOV` header with
`ENCODED` set in its command, a u32 count of segments, that many `SEGMENT`s
(`count` pages, from basis file `pages-ID.img` at page `offset`, or literal
when `pages_id` is 0), then the literal pages in order. The destination's
replayer `decode`s it back into CRIU's answer before the lazy-pages daemon
reads it, reading referenced pages from its basis directory (regular files
only, by name, never through a link: phaul.linux.datatree). An answer that
does not add up is a broken protocol: `BasisError`, and the post-copy fails
as a lost link does (no page is ever made up).
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import InvalidInput
from phaul.linux.datatree import DataDir

log = logging.getLogger(__name__)

PAGE = 4096
IOV = struct.Struct("=I4xQQQ")  # as phaul.memory.page_relay.IOV: {u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id}
ENCODED = 0x80000000  # in an answer's cmd: segments follow (CRIU's commands use the low 24 bits)
COUNT = struct.Struct("=I")
SEGMENT = struct.Struct("=IIQ")  # count, pages_id (0: literal), page offset in pages-ID.img
_PAGEMAP = re.compile(r"^pagemap-(\d+)\.img$")
_PAGES = re.compile(r"^pages-(\d+)\.img$")
MAX_SEGMENTS = 1 << 20
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4  # pagemap entry flags (criu/images/pagemap.proto)


class BasisError(Exception):
    """An encoded answer the basis cannot turn back into CRIU's: the link cannot be trusted."""


@dataclass(frozen=True)
class Run:
    vaddr: int  # first page's address
    count: int
    pages_id: int
    offset: int  # first page's index in pages-ID.img


class BasisIndex:
    """Source: where each (task, address) page is in the basis images (`image_dir`),
    from their page maps, and its content."""

    def __init__(self, image_dir: Path) -> None:
        self.dir = image_dir
        self.runs: dict[int, list[Run]] = {}
        self.served = self.referenced = 0  # pages encoded, and of them sent as references
        self._starts: dict[int, list[int]] = {}
        self._fds: dict[int, int] = {}
        self._read_maps()
        for runs in self.runs.values():  # opened now: the directory may go before the last page is served
            for r in runs:
                if r.pages_id not in self._fds:
                    self._fds[r.pages_id] = os.open(self.dir / f"pages-{r.pages_id}.img", os.O_RDONLY | os.O_NOFOLLOW)

    def _read_maps(self) -> None:
        from phaul.linux import pycriu_module

        pycriu = pycriu_module.load("read CRIU's page maps")
        for pm in sorted(self.dir.iterdir()):
            m = _PAGEMAP.match(pm.name)
            if not m:
                continue
            with open(pm, "rb") as f:
                entries = pycriu.images.load(f, pretty=False)["entries"]
            pages_id, offset, runs = int(entries[0]["pages_id"]), 0, []
            for e in entries[1:]:
                n = int(e.get("nr_pages") or e.get("compat_nr_pages") or 0)
                flags = int(e.get("flags", PE_PRESENT))
                # in the file: PE_PRESENT without PE_PARENT (a full dump marks lazy-able pages PE_LAZY too)
                if n and flags & PE_PRESENT and not flags & PE_PARENT:
                    runs.append(Run(int(e["vaddr"]), n, pages_id, offset))
                    offset += n
            runs.sort(key=lambda r: r.vaddr)
            self.runs[int(m.group(1))] = runs
            self._starts[int(m.group(1))] = [r.vaddr for r in runs]

    def locate(self, pid: int, vaddr: int) -> Run | None:
        """The run of the basis that holds `pid`'s page at `vaddr`, cut to start there."""
        starts = self._starts.get(pid)
        if not starts:
            return None
        i = bisect.bisect_right(starts, vaddr) - 1
        if i < 0:
            return None
        r = self.runs[pid][i]
        skip = (vaddr - r.vaddr) // PAGE
        if vaddr % PAGE or skip >= r.count:
            return None
        return Run(vaddr, r.count - skip, r.pages_id, r.offset + skip)

    def read(self, pages_id: int, offset: int, count: int) -> bytes:
        return os.pread(self._fds[pages_id], count * PAGE, offset * PAGE)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def encode(answer: bytes, index: BasisIndex) -> bytes:
    """CRIU's answer (header and pages) as sent over the link: pages the basis holds
    unchanged become references. An answer with no such page goes as it is."""
    cmd, nr, vaddr, dst_id = IOV.unpack_from(answer)
    pages = memoryview(answer)[IOV.size:]
    if nr == 0 or len(pages) != nr * PAGE:
        return answer
    pid = dst_id  # a lazy-pages request names the task by its virtual PID (criu/pagemap.c: pr->img_id)
    segments: list[tuple[int, int, int]] = []  # (count, pages_id, offset)
    literal: list[memoryview] = []
    i = 0
    while i < nr:
        run = index.locate(pid, vaddr + i * PAGE)
        n = min(run.count, nr - i) if run is not None else 1
        if run is None:
            _add(segments, 1, 0, 0)
            literal.append(pages[i * PAGE:(i + 1) * PAGE])
            i += 1
            continue
        basis = index.read(run.pages_id, run.offset, n)
        for k in range(n):
            page = pages[(i + k) * PAGE:(i + k + 1) * PAGE]
            if basis[k * PAGE:(k + 1) * PAGE] == page:
                _add(segments, 1, run.pages_id, run.offset + k)
            else:
                _add(segments, 1, 0, 0)
                literal.append(page)
        i += n
    index.served += nr
    index.referenced += sum(c for c, p, _ in segments if p)
    if all(p == 0 for _, p, _ in segments):
        return answer
    head = IOV.pack(cmd | ENCODED, nr, vaddr, dst_id) + COUNT.pack(len(segments))
    return head + b"".join(SEGMENT.pack(*s) for s in segments) + b"".join(literal)


def _add(segments: list[tuple[int, int, int]], count: int, pages_id: int, offset: int) -> None:
    """Append, merged with the last segment when it continues it."""
    if segments:
        c, p, o = segments[-1]
        if p == pages_id and (p == 0 or o + c == offset):
            segments[-1] = (c + count, p, o)
            return
    segments.append((count, pages_id, offset))


class Decoder:
    """Destination: turns encoded answers back into CRIU's, from the basis in `basis_dir`."""

    def __init__(self, basis_dir: Path | None) -> None:
        self.basis_dir = basis_dir
        self._dir: DataDir | None = None
        self._fds: dict[int, int] = {}
        self.basis_pages = 0  # pages taken from the basis so far

    def read_answer(self, read: Callable[[int], bytes], head: bytes) -> tuple[bytes, int]:
        """The rest of the answer whose header is `head`, read with `read`: (CRIU's answer,
        bytes read from the link for it, the header included)."""
        from phaul.memory.page_relay import read_exact

        cmd, nr, vaddr, dst_id = IOV.unpack(head)
        if not cmd & ENCODED:
            return head + read_exact(read, nr * PAGE), len(head) + nr * PAGE
        (nseg,) = COUNT.unpack(read_exact(read, COUNT.size))
        if not 0 < nseg <= min(nr, MAX_SEGMENTS):
            raise BasisError(f"an encoded answer of {nr} pages has {nseg} segments")
        raw = read_exact(read, nseg * SEGMENT.size)
        segments = [SEGMENT.unpack_from(raw, k * SEGMENT.size) for k in range(nseg)]
        if any(c == 0 for c, _, _ in segments) or sum(c for c, _, _ in segments) != nr:
            raise BasisError(f"the segments of an encoded answer do not add up to its {nr} pages")
        literal = sum(c for c, p, _ in segments if p == 0)
        data = read_exact(read, literal * PAGE)
        out, at = [IOV.pack(cmd & ~ENCODED, nr, vaddr, dst_id)], 0
        for count, pages_id, offset in segments:
            if pages_id == 0:
                out.append(data[at:at + count * PAGE])
                at += count * PAGE
            else:
                out.append(self._basis(pages_id, offset, count))
                self.basis_pages += count
        wire = IOV.size + COUNT.size + len(raw) + len(data)
        return b"".join(out), wire

    def _basis(self, pages_id: int, offset: int, count: int) -> bytes:
        if self.basis_dir is None:
            raise BasisError("an answer refers to basis pages, and this migration keeps no basis")
        try:
            if self._dir is None:
                self._dir = DataDir(self.basis_dir)
            fd = self._fds.get(pages_id)
            if fd is None:
                fd = self._fds[pages_id] = self._dir.open(f"pages-{pages_id}.img")
            got = os.pread(fd, count * PAGE, offset * PAGE)
        except (OSError, InvalidInput) as e:
            raise BasisError(f"basis pages-{pages_id}.img: {e}") from None
        if len(got) != count * PAGE:
            raise BasisError(f"basis pages-{pages_id}.img has no pages {offset}..{offset + count - 1}")
        return got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._dir is not None:
            self._dir.close()
            self._dir = None


def keep_basis(images: Path, basis: Path) -> int:
    """Destination, before a hybrid migration's final dump: hard links of the pages files
    and page maps of `images` (a received area: regular files only) in the new directory
    `basis`, which the peer cannot write. Returns the number of files."""
    n = 0
    with DataDir(images) as src, DataDir(basis, create=True) as dst:
        for name in src.regular_files():
            if _PAGES.match(name) or _PAGEMAP.match(name):
                src.link_into(name, dst, name)
                n += 1
    return n
