"""Hybrid's page answers against a basis (phaul.memory.page_basis): what the source encodes,
the destination decodes back exactly, and a lying answer is refused, never filled in."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pycriu
import pytest
from test_page_delta import _pages, _write_dump

from phaul.errors import InvalidInput
from phaul.memory.page_basis import (
    COUNT,
    ENCODED,
    IOV,
    PAGE,
    PE_LAZY,
    PE_PRESENT,
    SEGMENT,
    BasisError,
    BasisIndex,
    Decoder,
    encode,
    keep_basis,
)

PS_IOV_ADD_F = 0x40001  # what CRIU's page server answers with (PS_IOV_ADD_F | PE_PRESENT << 16)


def _answer(pid: int, vaddr: int, pages: np.ndarray) -> bytes:
    return IOV.pack(PS_IOV_ADD_F, len(pages), vaddr, pid) + pages.tobytes()


def _decode(decoder: Decoder, wire: bytes) -> tuple[bytes, int]:
    f = io.BytesIO(wire)
    return decoder.read_answer(f.read, f.read(IOV.size))


@pytest.fixture
def basis(tmp_path: Path) -> Path:
    """A round's images: task 10 with 64 pages at 0x10000 and 16 at 0x800000, task 11 with 8.
    As in a full dump, task 10's runs are marked lazy-able (PE_LAZY) besides PE_PRESENT."""
    content = _pages(1, 80)
    d = tmp_path / "round"
    _write_dump(d, {10: ([(0x10000, 64), (0x800000, 16)], content), 11: ([(0x4000, 8)], _pages(2, 8))})
    with open(d / "pagemap-10.img", "rb") as f:
        pm = pycriu.images.load(f, pretty=False)
    for e in pm["entries"][1:]:
        e["flags"] = PE_PRESENT | PE_LAZY
    with open(d / "pagemap-10.img", "wb") as f:
        pycriu.images.dump(pm, f)
    return d


def test_unchanged_pages_cross_as_references_and_come_back_exact(tmp_path: Path, basis: Path) -> None:
    index = BasisIndex(basis)
    old = _pages(1, 80)
    now = old[:64].copy()
    now[[3, 4, 40], 5] ^= 1  # three pages changed since the round
    answer = _answer(10, 0x10000, now)
    wire = encode(answer, index)
    cmd, nr, vaddr, pid = IOV.unpack_from(wire)
    assert cmd & ENCODED and nr == 64 and (vaddr, pid) == (0x10000, 10)
    (nseg,) = COUNT.unpack_from(wire, IOV.size)
    assert nseg == 5  # 0-2 basis, 3-4 literal, 5-39 basis, 40 literal, 41-63 basis
    assert len(wire) == IOV.size + COUNT.size + nseg * SEGMENT.size + 3 * PAGE
    dest = tmp_path / "dest-basis"
    shutil.copytree(basis, dest)
    decoder = Decoder(dest)
    back, wire_bytes = _decode(decoder, wire)
    assert back == answer and wire_bytes == len(wire) and decoder.basis_pages == 61


def test_pages_the_basis_lacks_go_literal(basis: Path) -> None:
    index = BasisIndex(basis)
    # a task the round did not have, an address it did not map, and a run crossing the end of one
    for pid, vaddr, n in ((99, 0x10000, 4), (10, 0x500000, 4)):
        answer = _answer(pid, vaddr, _pages(3, n))
        assert encode(answer, index) == answer
    tail = np.concatenate([_pages(1, 80)[62:64], _pages(4, 2)])  # 2 pages as in the round, then 2 past its run
    answer = _answer(10, 0x10000 + 62 * PAGE, tail)
    back, _ = _decode(Decoder(basis), encode(answer, index))
    assert back == answer


def test_a_plain_answer_needs_no_basis() -> None:
    answer = _answer(10, 0x10000, _pages(5, 3))
    assert _decode(Decoder(None), answer) == (answer, len(answer))


@pytest.mark.parametrize("lie", ["no basis here", "short count", "zero segment", "past the file", "too many segments"])
def test_an_answer_that_does_not_fit_is_refused(basis: Path, lie: str) -> None:
    head = IOV.pack(PS_IOV_ADD_F | ENCODED, 4, 0x10000, 10)
    segments = {
        "no basis here": [(4, 1, 0)],
        "short count": [(3, 1, 0)],
        "zero segment": [(0, 1, 0), (4, 1, 0)],
        "past the file": [(4, 1, 78)],
        "too many segments": [(1, 1, 0)] * 5,
    }[lie]
    wire = head + COUNT.pack(len(segments)) + b"".join(SEGMENT.pack(*s) for s in segments)
    with pytest.raises(BasisError):
        _decode(Decoder(None if lie == "no basis here" else basis), wire)


def test_keep_basis_links_the_page_files_and_refuses_strangers(tmp_path: Path, basis: Path) -> None:
    kept = tmp_path / "kept"
    assert keep_basis(basis, kept) == 4  # two pagemaps, two pages files
    assert (kept / "pages-1.img").stat().st_ino == (basis / "pages-1.img").stat().st_ino
    assert not (kept / "core-1.img").exists()
    os.symlink("/etc/passwd", basis / "pages-9.img")
    with pytest.raises(InvalidInput):
        keep_basis(basis, tmp_path / "kept2")
