"""Page deltas: the destination ends with byte-for-byte the new dump's images.

Synthetic image directories (with pagemaps written by pycriu) cover layout
changes; two real `criu dump --leave-running` dumps of a running memload cover
what CRIU actually writes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pycriu
import pytest

from phaul.memory import page_delta
from phaul.memory.page_delta import PAGE, DeltaError, apply_delta, make_delta

REPO = Path(__file__).resolve().parents[1]
MEMLOAD = REPO / "workloads" / "bin" / "memload"


def _pages(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, size=(n, PAGE // 8), dtype=np.uint64)


def _write_dump(d: Path, procs: dict[int, tuple[list[tuple[int, int]], np.ndarray]], extra: dict[str, bytes] | None = None) -> None:
    """A fake dump: per process (pid -> runs of (vaddr, pages), page contents), a
    pagemap-PID.img naming pages-ID.img, plus small files."""
    d.mkdir(parents=True, exist_ok=True)
    for pages_id, (pid, (runs, content)) in enumerate(sorted(procs.items()), 1):
        assert sum(n for _, n in runs) == len(content)
        entries = [{"pages_id": pages_id}] + [{"vaddr": v, "compat_nr_pages": 0, "nr_pages": n, "flags": page_delta.PE_PRESENT} for v, n in runs]
        with open(d / f"pagemap-{pid}.img", "wb") as f:
            pycriu.images.dump({"magic": "PAGEMAP", "entries": entries}, f)
        (d / f"pages-{pages_id}.img").write_bytes(content.tobytes())
    for name, data in (extra or {"core-1.img": b"core", "pstree.img": b"tree"}).items():
        (d / name).write_bytes(data)


def _same_dirs(a: Path, b: Path) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _roundtrip(tmp: Path, old: Path, new: Path) -> page_delta.PageDelta:
    """Make the delta old -> new, apply it on a copy of old (the destination), compare."""
    dest = tmp / "dest"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(old, dest)
    delta, stats = make_delta(new, old, tmp / "out")
    assert stats.literal_pages == delta.literal_pages
    # only the delta directory travels
    shutil.rmtree(tmp / "recv", ignore_errors=True)
    shutil.copytree(tmp / "out", tmp / "recv")
    apply_delta(tmp / "recv", dest)
    _same_dirs(new, dest)
    return delta


def test_changed_pages_only(tmp_path: Path) -> None:
    content = _pages(1, 300)
    _write_dump(tmp_path / "old", {10: ([(0x10000, 200), (0x800000, 100)], content)})
    changed = content.copy()
    changed[[3, 4, 5, 150, 299], 7] ^= 1
    _write_dump(tmp_path / "new", {10: ([(0x10000, 200), (0x800000, 100)], changed)}, {"core-1.img": b"core2", "pstree.img": b"tree"})
    delta = _roundtrip(tmp_path, tmp_path / "old", tmp_path / "new")
    [r] = delta.recipes
    assert r.literal_pages == 5 and r.in_place()
    assert (tmp_path / "out" / "pages-1.img.delta").stat().st_size == 5 * PAGE


def test_identical_dumps_send_no_pages(tmp_path: Path) -> None:
    content = _pages(2, 64)
    _write_dump(tmp_path / "old", {1: ([(0x400000, 64)], content)})
    _write_dump(tmp_path / "new", {1: ([(0x400000, 64)], content)})
    delta = _roundtrip(tmp_path, tmp_path / "old", tmp_path / "new")
    assert delta.literal_pages == 0
    assert not list((tmp_path / "out").glob("*.delta"))


def test_new_mapping_in_the_middle_shifts_pages(tmp_path: Path) -> None:
    """A mapping appears between two old ones: the pages after it move in the file
    but are matched by address, so only the new mapping's pages are sent."""
    a, b, fresh = _pages(3, 50), _pages(4, 40), _pages(5, 8)
    _write_dump(tmp_path / "old", {7: ([(0x1000000, 50), (0x3000000, 40)], np.concatenate([a, b]))})
    _write_dump(tmp_path / "new", {7: ([(0x1000000, 50), (0x2000000, 8), (0x3000000, 40)], np.concatenate([a, fresh, b]))})
    delta = _roundtrip(tmp_path, tmp_path / "old", tmp_path / "new")
    [r] = delta.recipes
    assert r.literal_pages == 8 and not r.in_place()
    assert [(s.start, s.count, s.literal, s.offset) for s in r.segments] == [(0, 50, False, 0), (50, 8, True, 0), (58, 40, False, 50)]


def test_unmapped_pages_and_a_process_that_left(tmp_path: Path) -> None:
    one, two = _pages(6, 30), _pages(7, 20)
    _write_dump(tmp_path / "old", {1: ([(0x10000, 30)], one), 2: ([(0x10000, 20)], two)})
    # process 2 is gone, process 1 unmapped its first 10 pages and its pages file got a new ID
    _write_dump(tmp_path / "new", {1: ([(0x10000 + 10 * PAGE, 20)], one[10:])})
    delta = _roundtrip(tmp_path, tmp_path / "old", tmp_path / "new")
    assert delta.literal_pages == 0
    assert not (tmp_path / "dest" / "pagemap-2.img").exists()


def test_pages_files_swap_names(tmp_path: Path) -> None:
    """pages-1.img and pages-2.img trade owners: each is built from the other's basis."""
    one, two = _pages(8, 12), _pages(9, 16)
    _write_dump(tmp_path / "old", {1: ([(0x10000, 12)], one), 2: ([(0x20000, 16)], two)})
    new = tmp_path / "new"
    _write_dump(new, {1: ([(0x10000, 12)], one), 2: ([(0x20000, 16)], two)})
    for pid, pages_id in ((1, 2), (2, 1)):  # rewrite the heads: process 1 now owns pages-2.img
        p = new / f"pagemap-{pid}.img"
        with open(p, "rb") as f:
            img = pycriu.images.load(f, pretty=False)
        img["entries"][0]["pages_id"] = pages_id
        with open(p, "wb") as f:
            pycriu.images.dump(img, f)
    (new / "pages-1.img").write_bytes(two.tobytes())
    (new / "pages-2.img").write_bytes(one.tobytes())
    delta = _roundtrip(tmp_path, tmp_path / "old", new)
    assert delta.literal_pages == 0


def test_without_pagemaps_pages_are_compared_by_position(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    content = _pages(10, 20)
    (old / "pages-1.img").write_bytes(content.tobytes())
    grown = np.concatenate([content, _pages(11, 4)])
    grown[0, 0] ^= 1
    (new / "pages-1.img").write_bytes(grown.tobytes())
    (new / "inventory.img").write_bytes(b"inv")
    delta = _roundtrip(tmp_path, old, new)
    assert delta.literal_pages == 5


def test_apply_refuses_a_delta_that_does_not_fit(tmp_path: Path) -> None:
    content = _pages(12, 16)
    _write_dump(tmp_path / "old", {1: ([(0x10000, 16)], content)})
    changed = content.copy()
    changed[2, 2] ^= 1
    _write_dump(tmp_path / "new", {1: ([(0x10000, 16)], changed)})
    make_delta(tmp_path / "new", tmp_path / "old", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DeltaError, match="missing"):
        apply_delta(tmp_path / "out", empty)
    (tmp_path / "out" / "pages-1.img.delta").write_bytes(b"short")
    dest = tmp_path / "dest"
    shutil.copytree(tmp_path / "old", dest)
    with pytest.raises(DeltaError, match="wrong size"):
        apply_delta(tmp_path / "out", dest)
    (tmp_path / "out" / page_delta.MANIFEST).write_text('{"format": 99}')
    with pytest.raises(DeltaError, match="format"):
        apply_delta(tmp_path / "out", dest)


def test_apply_refuses_names_outside_the_directory(tmp_path: Path) -> None:
    d = page_delta.PageDelta(files={"../evil": 0}, recipes=[])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / page_delta.MANIFEST).write_text(d.to_json())
    (tmp_path / "dest").mkdir()
    with pytest.raises(DeltaError, match="invalid file name"):
        apply_delta(tmp_path / "out", tmp_path / "dest")


def test_real_criu_dumps_of_a_running_process(tmp_path: Path) -> None:
    """Two `criu dump --leave-running` of memload rewriting 16 MiB/s: the delta is
    a fraction of the dump and rebuilds the second dump exactly."""
    proc = subprocess.Popen(
        [str(MEMLOAD), "--size", "32", "--rate", "16", "--pid-file", str(tmp_path / "pid"), "--report", str(tmp_path / "report")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "pid").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "memload did not start"
            time.sleep(0.02)
        for name in ("d1", "d2"):
            (tmp_path / name).mkdir()
            subprocess.run(
                ["criu", "dump", "-t", str(proc.pid), "-D", str(tmp_path / name), "--leave-running",
                 "-o", str(tmp_path / f"{name}.log")],
                check=True, capture_output=True, timeout=60,
            )
            time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    for name in ("d1", "d2"):  # keep images only
        for p in (tmp_path / name).glob("stats-*"):
            p.unlink()
    delta = _roundtrip(tmp_path, tmp_path / "d1", tmp_path / "d2")
    assert delta.pages > 32 * 256
    assert 0 < delta.literal_pages < delta.pages // 2, (delta.literal_pages, delta.pages)


def test_large_files_are_compared_in_two_halves(tmp_path: Path) -> None:
    n = page_delta._PARALLEL_PAGES + 1000
    content = np.zeros((n, PAGE // 8), dtype=np.uint64)
    content[:, 0] = np.arange(n)
    _write_dump(tmp_path / "old", {1: ([(0x10000000, n)], content)})
    changed = content.copy()
    hit = [0, 255, 256, n // 2 - 1, n // 2, n // 2 + 1, n - 1]
    changed[hit, 3] = 7
    _write_dump(tmp_path / "new", {1: ([(0x10000000, n)], changed)})
    delta = _roundtrip(tmp_path, tmp_path / "old", tmp_path / "new")
    assert delta.literal_pages == len(hit)


# -- the page stream (phaul.memory.page_stream), without TLS -------------------------------------


def _stream_message(delta_dir: Path) -> bytes:
    import json

    files = sorted((p.name, p.stat().st_size) for p in delta_dir.iterdir())
    body = b"".join((delta_dir / n).read_bytes() for n, _ in files)
    return json.dumps({"files": files}).encode() + b"\n" + body


def _two_dumps(tmp: Path) -> None:
    content = _pages(20, 40)
    _write_dump(tmp / "old", {1: ([(0x10000, 40)], content)})
    changed = content.copy()
    changed[[1, 30], 5] ^= 1
    _write_dump(tmp / "new", {1: ([(0x10000, 40)], changed)}, {"core-1.img": b"core-new", "pstree.img": b"tree"})
    make_delta(tmp / "new", tmp / "old", tmp / "out")
    (tmp / "mdir").mkdir()
    shutil.copytree(tmp / "old", tmp / "mdir" / "images")


def test_page_stream_receiver_applies_each_message(tmp_path: Path) -> None:
    import io
    import json

    from phaul.memory import page_stream

    _two_dumps(tmp_path)
    rx = io.BytesIO(_stream_message(tmp_path / "out"))
    tx = io.BytesIO()
    page_stream.serve(tmp_path / "mdir", rx, tx)
    ready, answer = tx.getvalue().splitlines()
    assert ready == b"ready"
    assert json.loads(answer) == {"ok": True, "pages_written": 2, "ms": pytest.approx(json.loads(answer)["ms"])}
    _same_dirs(tmp_path / "new", tmp_path / "mdir" / "images")


@pytest.mark.parametrize("header", [
    b'{"files": [["../escape", 1]]}\n', b'{"files": [["a", -1]]}\n', b'{"files": [["a", 1], ["a", 1]]}\n', b"not json\n",
])
def test_page_stream_receiver_refuses_bad_messages(tmp_path: Path, header: bytes) -> None:
    import io
    import json

    from phaul.memory import page_stream

    (tmp_path / "mdir" / "images").mkdir(parents=True)
    tx = io.BytesIO()
    page_stream.serve(tmp_path / "mdir", io.BytesIO(header + b"x"), tx)
    answer = json.loads(tx.getvalue().splitlines()[1])
    assert answer["ok"] is False
    assert not (tmp_path / "escape").exists()


def test_page_stream_client_against_a_local_receiver(tmp_path: Path) -> None:
    """The source's PageStream over a pipe instead of TLS: send, answer, close."""
    import sys

    from phaul.memory import page_stream

    _two_dumps(tmp_path)

    class Local(page_stream.PageStream):
        def __init__(self) -> None:  # the receiver directly, no TLS hop
            self.timeout = 30.0
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "phaul.memory.page_stream", str(tmp_path / "mdir")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
            )
            assert self._readline() == page_stream.READY

    s = Local()
    try:
        res = s.send(tmp_path / "out")
    finally:
        s.close()
    assert res.pages_written == 2 and res.bytes_sent > 2 * PAGE
    _same_dirs(tmp_path / "new", tmp_path / "mdir" / "images")
    assert s.proc.returncode == 0
