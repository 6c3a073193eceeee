"""Page deltas between two CRIU dumps of the same container.

Where the kernel has no soft-dirty tracking, CRIU cannot tell which pages
changed since the last dump, so phaul finds out itself: the source keeps the
images the destination already holds (the *basis*), dumps again, and compares
the new pages with the basis page by page. `make_delta` writes what the
destination needs to rebuild the new images exactly:

- every image file other than `pages-*.img` (small: cores, pagemaps, mm, ...),
  hard-linked into the delta directory;
- per `pages-N.img`: a recipe of segments (copy pages from a basis file, or
  take them from the delta's data file) and a data file with the new content
  of only the pages that differ;
- a manifest, `page-delta.json`.

`apply_delta` runs on the destination and turns its basis directory into a
byte-for-byte copy of the new dump (patching a pages file in place when its
layout did not change). The pagemaps only guide which basis page a new page is
compared with (same process, same virtual address); what gets copied is always
what was compared, so the result is exact whatever the pagemaps say.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phaul.errors import InvalidInput
from phaul.linux.datatree import DataDir

log = logging.getLogger(__name__)

PAGE = 4096
MANIFEST = "page-delta.json"
MAX_MANIFEST = 64 << 20
FORMAT = 1
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
_PAGES = re.compile(r"^pages-(\d+)\.img$")
_BLOCK = 256  # pages compared at once (1 MiB)
_PARALLEL_PAGES = 16384  # files this large (64 MiB) are compared by two threads


class DeltaError(Exception):
    """The delta cannot be made or applied; the caller sends the full images instead."""


@dataclass(frozen=True)
class Segment:
    """`count` pages of the new file from page `start` on, taken from page
    `offset` of the delta's data file (`literal`) or of the recipe's basis file."""

    start: int
    count: int
    literal: bool
    offset: int


@dataclass
class Recipe:
    """How to build one new pages file of `pages` pages."""

    name: str
    pages: int
    basis: str  # the basis file copy segments read from ("" = none)
    data: str  # the data file with this file's literal pages ("" = none)
    segments: list[Segment] = field(default_factory=list)

    @property
    def literal_pages(self) -> int:
        return sum(s.count for s in self.segments if s.literal)

    def in_place(self) -> bool:
        """True if the basis is the same file and every copied page stays where it is."""
        return self.basis == self.name and all(s.literal or s.offset == s.start for s in self.segments)


@dataclass
class PageDelta:
    """The manifest: every file of the new dump and how to build its pages files."""

    files: dict[str, int]  # name -> size in bytes, for every image file of the new dump
    recipes: list[Recipe]
    format: int = FORMAT

    @property
    def pages(self) -> int:
        return sum(r.pages for r in self.recipes)

    @property
    def literal_pages(self) -> int:
        return sum(r.literal_pages for r in self.recipes)

    def to_json(self) -> str:
        d = asdict(self)
        for r in d["recipes"]:
            r["segments"] = [[s["start"], s["count"], int(s["literal"]), s["offset"]] for s in r["segments"]]
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PageDelta:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise DeltaError(f"page delta format {d.get('format')!r} is not {FORMAT}")
        recipes = [
            Recipe(r["name"], r["pages"], r["basis"], r["data"], [Segment(a, b, bool(c), e) for a, b, c, e in r["segments"]])
            for r in d["recipes"]
        ]
        return cls(files=dict(d["files"]), recipes=recipes)


@dataclass
class DeltaStats:
    pages: int  # pages in the new dump
    literal_pages: int  # pages whose content is sent
    data_bytes: int  # literal pages plus the small image files
    ms: float
    compare_ms: float = 0.0  # of `ms`: comparing pages


# -- which page is where --------------------------------------------------------


@dataclass
class PagesFile:
    """A pages file and the virtual address of each of its pages, in file order."""

    name: str
    owner: str  # the pagemap image that describes it (one process or shmem segment)
    vaddrs: Any  # numpy uint64 array, or None when unknown


def pages_files(image_dir: Path) -> dict[str, PagesFile]:
    """Every pages-*.img of a dump with the addresses its pages belong to. A
    dump's directory never changes once written, so the answer is kept for
    the next round, where this dump is the basis (only an optimisation: pages
    are always compared by content)."""
    st = image_dir.stat()
    key = (str(image_dir), st.st_ino, st.st_mtime_ns)
    found = _INDEX.get(key)
    if found is None:
        found = _read_pages_files(image_dir)
        _INDEX.clear()  # one dump back is all a delta needs
        _INDEX[key] = found
    return found


_INDEX: dict[tuple[str, int, int], dict[str, PagesFile]] = {}


def _read_pages_files(image_dir: Path) -> dict[str, PagesFile]:
    import numpy as np

    from phaul.linux import pycriu_module

    pycriu = pycriu_module.load("read CRIU's page maps")

    found: dict[str, PagesFile] = {}
    for pm in sorted(image_dir.glob("pagemap*.img")):
        try:
            with open(pm, "rb") as f:
                entries = pycriu.images.load(f, pretty=False)["entries"]
            name = f"pages-{int(entries[0]['pages_id'])}.img"
            runs = []
            for e in entries[1:]:
                n = int(e.get("nr_pages") or e.get("compat_nr_pages") or 0)
                flags = int(e["flags"]) if "flags" in e else (PE_PARENT if e.get("in_parent") else PE_PRESENT)
                if n and flags & PE_PRESENT and not flags & PE_PARENT:
                    runs.append(np.arange(n, dtype=np.uint64) * PAGE + np.uint64(int(e["vaddr"])))
            vaddrs = np.concatenate(runs) if runs else np.zeros(0, dtype=np.uint64)
        except Exception as e:  # pycriu raises its own types; the delta still works without addresses
            log.debug("cannot read %s (%s); comparing its pages by position", pm, e)
            continue
        found[name] = PagesFile(name, pm.name, vaddrs)
    for p in image_dir.iterdir():
        if _PAGES.match(p.name) and p.name not in found:
            found[p.name] = PagesFile(p.name, "", None)
    return found


def _image_files(image_dir: Path) -> dict[str, int]:
    files: dict[str, int] = {}
    for p in image_dir.iterdir():
        if p.is_symlink() or not p.is_file():
            raise DeltaError(f"{p} is not a regular file; page deltas handle flat image directories only")
        files[p.name] = p.stat().st_size
    return files


# -- source side ------------------------------------------------------------------


def make_delta(new_dir: Path, basis_dir: Path, out_dir: Path) -> tuple[PageDelta, DeltaStats]:
    """Write into `out_dir` (emptied first) what turns `basis_dir` into `new_dir`."""
    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.iterdir():
        p.unlink()
    files = _image_files(new_dir)
    old_pf = pages_files(basis_dir)
    new_pf = pages_files(new_dir)  # kept: the basis of the next delta
    old_by_owner = {pf.owner: pf for pf in old_pf.values() if pf.owner}
    data_bytes = 0
    for name in files:
        if name not in new_pf:
            os.link(new_dir / name, out_dir / name)
            data_bytes += files[name]
    recipes: list[Recipe] = []
    compare_ms = 0.0
    for name in sorted(new_pf):
        pf = new_pf[name]
        size = files[name]
        if size % PAGE:
            raise DeltaError(f"{new_dir / name} is not a whole number of pages")
        n = size // PAGE
        old = old_by_owner.get(pf.owner) if pf.owner else None
        if old is None and name in old_pf and not old_pf[name].owner:
            old = old_pf[name]
        src = _sources(pf, old, n, basis_dir)
        t1 = time.monotonic()
        same = _same_pages(new_dir / name, basis_dir / old.name if old else None, src)
        compare_ms += (time.monotonic() - t1) * 1000
        recipe = _recipe(new_dir / name, basis_dir / old.name if old else None, src, same, out_dir, name)
        recipes.append(recipe)
        data_bytes += recipe.literal_pages * PAGE
    delta = PageDelta(files=files, recipes=recipes)
    (out_dir / MANIFEST).write_text(delta.to_json())
    stats = DeltaStats(delta.pages, delta.literal_pages, data_bytes, (time.monotonic() - t0) * 1000, compare_ms)
    log.debug(
        "page delta %s -> %s: %d of %d pages differ (%.0f ms, comparing %.0f ms)",
        basis_dir, new_dir, stats.literal_pages, stats.pages, stats.ms, compare_ms,
    )
    return delta, stats


def _sources(pf: PagesFile, old: PagesFile | None, n: int, basis_dir: Path) -> Any:
    """For each page of the new file, the index of the basis page to compare it with (-1: none)."""
    import numpy as np

    if old is None:
        return np.full(n, -1, dtype=np.int64)
    old_n = (basis_dir / old.name).stat().st_size // PAGE
    if pf.vaddrs is not None and old.vaddrs is not None and len(pf.vaddrs) == n and len(old.vaddrs) == old_n:
        if n == old_n and np.array_equal(pf.vaddrs, old.vaddrs):
            return np.arange(n, dtype=np.int64)
        if old_n == 0:
            return np.full(n, -1, dtype=np.int64)
        idx = np.searchsorted(old.vaddrs, pf.vaddrs)
        clipped = np.minimum(idx, old_n - 1)
        return np.where(old.vaddrs[clipped] == pf.vaddrs, clipped, -1).astype(np.int64)
    src = np.arange(n, dtype=np.int64)  # no usable addresses: compare by position
    src[src >= old_n] = -1
    return src


def _same_pages(new: Path, basis: Path | None, src: Any) -> Any:
    """For each page of `new`, whether it equals the basis page `src` names (numpy bool array)."""
    import numpy as np

    n = len(src)
    same = np.zeros(n, dtype=bool)
    if not n or basis is None or not (src >= 0).any():
        return same
    a = np.memmap(new, dtype=np.uint64, mode="r").reshape(n, PAGE // 8)
    b = np.memmap(basis, dtype=np.uint64, mode="r").reshape(-1, PAGE // 8)
    memcmp = _memcmp()
    # Runs of pages whose basis pages follow each other are compared with
    # memcmp a block at a time (most blocks are equal); only blocks that
    # differ are compared page by page.
    follows = np.append(np.diff(src) == 1, False)
    pa, pb = a.ctypes.data, b.ctypes.data

    def compare(lo: int, hi: int) -> None:
        for s in range(lo, hi, _BLOCK):
            e = min(hi, s + _BLOCK)
            first = int(src[s])
            if first >= 0 and follows[s : e - 1].all():
                if memcmp(pa + s * PAGE, pb + first * PAGE, (e - s) * PAGE) == 0:
                    same[s:e] = True
                else:
                    same[s:e] = ~(a[s:e] != b[first : first + e - s]).any(axis=1)
            else:
                idx = src[s:e]
                ok = np.flatnonzero(idx >= 0)
                if len(ok):
                    same[s + ok] = ~(a[s + ok] != b[idx[ok]]).any(axis=1)

    # Large files: both halves at once (memcmp and numpy let go of the GIL).
    if n >= _PARALLEL_PAGES:
        mid = (n // 2) // _BLOCK * _BLOCK
        t = threading.Thread(target=compare, args=(mid, n), name="page-compare")
        t.start()
        try:
            compare(0, mid)
        finally:
            t.join()
    else:
        compare(0, n)
    return same  # the memory maps close with the last reference to them, on return


def _recipe(new: Path, basis: Path | None, src: Any, same: Any, out_dir: Path, name: str) -> Recipe:
    import numpy as np

    n = len(src)
    literal = ~same
    segments: list[Segment] = []
    data = ""
    if n:
        brk = np.empty(n, dtype=bool)
        brk[0] = True
        brk[1:] = (literal[1:] != literal[:-1]) | (~literal[1:] & (src[1:] != src[:-1] + 1))
        starts = np.flatnonzero(brk)
        ends = np.append(starts[1:], n)
        data_off = 0
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            if literal[s]:
                segments.append(Segment(s, e - s, True, data_off))
                data_off += e - s
            else:
                segments.append(Segment(s, e - s, False, int(src[s])))
        if data_off:
            data = f"{name}.delta"
            _write_pages(new, np.flatnonzero(literal), out_dir / data)
    return Recipe(name, n, basis.name if basis is not None else "", data, segments)


@functools.cache
def _memcmp() -> Callable[[int, int, int], int]:
    libc = ctypes.CDLL(None)
    fn = libc.memcmp
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn  # type: ignore[no-any-return]


def _write_pages(src: Path, pages: Any, dst: Path) -> None:
    """Copy the listed pages of `src` (in order) into the new file `dst`, run by run."""
    import numpy as np

    brk = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], brk)).astype(np.int64)
    ends = np.concatenate((brk, [len(pages)])).astype(np.int64)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            _copy_range(fi.fileno(), int(pages[s]) * PAGE, fo.fileno(), None, (e - s) * PAGE)


def _copy_range(fd_in: int, off_in: int, fd_out: int, off_out: int | None, length: int) -> None:
    """copy_file_range all of `length` bytes (no user-space copy when the kernel can)."""
    while length > 0:
        n = os.copy_file_range(fd_in, fd_out, length, off_in, off_out)
        if n <= 0:
            raise DeltaError("short copy while building a page delta")
        off_in += n
        if off_out is not None:
            off_out += n
        length -= n


# -- destination side ---------------------------------------------------------------


@dataclass
class ApplyStats:
    pages_written: int
    files: int
    ms: float


def apply_delta(delta_dir: Path, images_dir: Path) -> ApplyStats:
    """Turn `images_dir` (holding the basis) into an exact copy of the dump the
    delta in `delta_dir` was made from. Raises DeltaError when the delta does not
    fit the basis, or when either area holds anything but regular files
    (`phaul.linux.datatree`: nothing is followed out of them); `images_dir` must
    then be refilled with full images."""
    t0 = time.monotonic()
    try:
        with DataDir(delta_dir) as delta_d, DataDir(images_dir) as images_d:
            written, files = _apply(delta_d, images_d)
    except InvalidInput as e:
        raise DeltaError(e.message) from None
    except OSError as e:
        raise DeltaError(f"applying the page delta in {images_dir} failed: {e}") from None
    return ApplyStats(written, files, (time.monotonic() - t0) * 1000)


def _apply(delta_d: DataDir, images_d: DataDir) -> tuple[int, int]:
    """apply_delta on open areas; (pages written, files of the dump)."""
    for area in (delta_d, images_d):
        area.regular_files()  # a flat directory of regular files, or refused naming the first stranger
    try:
        delta = PageDelta.from_json(delta_d.read_bytes(MANIFEST, MAX_MANIFEST).decode())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DeltaError(f"unreadable page delta in {delta_d.path}: {e}") from None
    names = set(delta.files)
    for n in list(names) + [r.basis for r in delta.recipes] + [r.data for r in delta.recipes]:
        if n and (n != os.path.basename(n) or n in (".", "..") or "\0" in n or n == MANIFEST):
            raise DeltaError(f"invalid file name {n!r} in page delta")
    for r in delta.recipes:
        if r.name not in names:
            raise DeltaError(f"page delta builds {r.name}, which the dump does not list")
        if r.basis and not images_d.exists(r.basis):
            raise DeltaError(f"basis {r.basis} for {r.name} is missing on this host")
    referenced: dict[str, int] = {}
    for r in delta.recipes:
        if r.basis:
            referenced[r.basis] = referenced.get(r.basis, 0) + 1
    written = 0
    staged: list[tuple[str, str]] = []  # (temporary name, final name) in images
    try:
        for r in delta.recipes:
            if r.in_place() and referenced.get(r.name, 0) == 1 and images_d.links(r.name) == 1:
                written += _patch(images_d, delta_d, r)
            else:
                staged.append((f".{r.name}.new", r.name))
                written += _build(images_d, staged[-1][0], delta_d, r)
        for tmp, final in staged:
            images_d.replace(tmp, images_d, final)
        staged.clear()
        recipe_names = {r.name for r in delta.recipes}
        for name in names - recipe_names:
            tmp = f".{name}.new"
            delta_d.link_into(name, images_d, tmp)  # the delta dir keeps its copy: rsync's basis next round
            images_d.replace(tmp, images_d, name)
        for name in images_d.names():
            if name not in names:
                images_d.unlink(name)
        for name, size in delta.files.items():
            if images_d.size(name) != size:
                raise DeltaError(f"{name} has {images_d.size(name)} bytes after the delta, not {size}")
    except OSError as e:
        raise DeltaError(f"applying the page delta in {images_d.path} failed: {e}") from None
    finally:
        for tmp, _ in staged:
            images_d.unlink(tmp, missing_ok=True)
    return written, len(names)


def _check_data(delta_d: DataDir, r: Recipe) -> None:
    if r.literal_pages and (not r.data or not delta_d.exists(r.data) or delta_d.size(r.data) != r.literal_pages * PAGE):
        raise DeltaError(f"the data file of {r.name} is missing or has the wrong size")


def _patch(images_d: DataDir, delta_d: DataDir, r: Recipe) -> int:
    _check_data(delta_d, r)
    fd = images_d.open(r.name, os.O_WRONLY)
    try:
        if r.data:
            data = delta_d.open(r.data)
            try:
                for s in r.segments:
                    if s.literal:
                        _copy_range(data, s.offset * PAGE, fd, s.start * PAGE, s.count * PAGE)
            finally:
                os.close(data)
        os.ftruncate(fd, r.pages * PAGE)
    finally:
        os.close(fd)
    return r.literal_pages


def _build(images_d: DataDir, tmp: str, delta_d: DataDir, r: Recipe) -> int:
    _check_data(delta_d, r)
    fds: dict[str, int] = {}
    try:
        if r.basis:
            fds["basis"] = images_d.open(r.basis)
        if r.data:
            fds["data"] = delta_d.open(r.data)
        out = images_d.create(tmp)
        fds["out"] = out
        for s in r.segments:
            src = "data" if s.literal else "basis"
            if src not in fds:
                raise DeltaError(f"a segment of {r.name} reads a {src} file the delta does not have")
            _copy_range(fds[src], s.offset * PAGE, out, s.start * PAGE, s.count * PAGE)
        os.ftruncate(out, r.pages * PAGE)
    finally:
        for fd in fds.values():
            os.close(fd)
    return r.literal_pages
