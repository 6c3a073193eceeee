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
import tempfile
import time
from pathlib import Path

import numpy as np
import pycriu
import pytest

from phaul.channels.transport import write_secret
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


def test_a_basis_linked_elsewhere_is_replaced_never_patched(tmp_path: Path) -> None:
    """A standby host starts a refresh's images as hard links of the checkpoint it keeps
    (phaul.standby.store.seed): applying the delta leaves the kept checkpoint as it was."""
    content = _pages(2, 64)
    _write_dump(tmp_path / "old", {10: ([(0x10000, 64)], content)})
    changed = content.copy()
    changed[[1, 40], 0] ^= 1
    _write_dump(tmp_path / "new", {10: ([(0x10000, 64)], changed)})
    kept, seeded = tmp_path / "kept", tmp_path / "seeded"
    shutil.copytree(tmp_path / "old", kept)
    seeded.mkdir()
    for f in kept.iterdir():
        os.link(f, seeded / f.name)
    make_delta(tmp_path / "new", tmp_path / "old", tmp_path / "out")
    apply_delta(tmp_path / "out", seeded)
    _same_dirs(tmp_path / "new", seeded)
    _same_dirs(tmp_path / "old", kept)


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
    rx = io.BytesIO(b"s3cret\n" + _stream_message(tmp_path / "out"))
    tx = io.BytesIO()
    page_stream.serve("s3cret", tmp_path / "mdir" / "delta", tmp_path / "mdir" / "images", rx, tx)
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
    page_stream.serve("s3cret", tmp_path / "mdir" / "delta", tmp_path / "mdir" / "images", io.BytesIO(b"s3cret\n" + header + b"x"), tx)
    answer = json.loads(tx.getvalue().splitlines()[1])
    assert answer["ok"] is False
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("first", [b"", b"\n", b"wrong\n", b"s3cre\n", b"s3cret2\n"])
def test_page_stream_receiver_requires_the_secret(tmp_path: Path, first: bytes) -> None:
    """A wrong or missing secret: one error answer, nothing written, the rest unread."""
    import io
    import json

    from phaul.memory import page_stream

    _two_dumps(tmp_path)
    before = sorted(p.read_bytes() for p in (tmp_path / "mdir" / "images").iterdir())
    tx = io.BytesIO()
    page_stream.serve("s3cret", tmp_path / "mdir" / "delta", tmp_path / "mdir" / "images",
                      io.BytesIO(first + _stream_message(tmp_path / "out")), tx)
    (answer,) = tx.getvalue().splitlines()
    assert json.loads(answer) == {"ok": False, "error": "wrong or missing migration secret"}
    assert not (tmp_path / "mdir" / "delta").exists()
    assert sorted(p.read_bytes() for p in (tmp_path / "mdir" / "images").iterdir()) == before


def test_page_stream_client_against_a_local_receiver(tmp_path: Path) -> None:
    """The source's PageStream over a pipe instead of TLS: send, answer, close."""
    import sys

    from phaul.memory import page_stream

    _two_dumps(tmp_path)
    write_secret(tmp_path / "secret", "s3cret")

    class Local(page_stream.PageStream):
        def __init__(self) -> None:  # the receiver directly, no TLS hop
            self.timeout = 30.0
            self._stderr = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "phaul.memory.page_stream", str(tmp_path / "secret"), str(tmp_path / "mdir" / "delta"),
                 str(tmp_path / "mdir" / "images")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
            )
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"s3cret\n")
            self.proc.stdin.flush()
            assert self._readline() == page_stream.READY

    s = Local()
    try:
        res = s.send(tmp_path / "out")
    finally:
        s.close()
    assert res.pages_written == 2 and res.bytes_sent > 2 * PAGE
    _same_dirs(tmp_path / "new", tmp_path / "mdir" / "images")
    assert s.proc.returncode == 0


# -- received areas are data: nothing is followed out of them (phaul.linux.datatree) ------------


def _canary(tmp: Path) -> tuple[Path, Path]:
    """A directory outside the areas with one file; returns (dir, file)."""
    d = tmp / "canary"
    d.mkdir()
    (d / "file").write_bytes(b"canary")
    return d, d / "file"


def _untouched(canary: Path) -> None:
    assert sorted(os.listdir(canary)) == ["file"]
    assert (canary / "file").read_bytes() == b"canary"


def _plant(path: Path, what: str, target: Path) -> None:
    import socket
    import stat

    path.unlink(missing_ok=True)
    if what == "symlink":
        path.symlink_to(target)
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "device":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()


STRANGERS = ["symlink", "fifo", "device", "socket"]


@pytest.mark.parametrize("what", STRANGERS)
@pytest.mark.parametrize(("area", "name"), [
    ("recv", page_delta.MANIFEST), ("recv", "core-1.img"), ("recv", "pages-1.img.delta"),
    ("dest", "pages-1.img"), ("dest", "core-1.img"), ("dest", ".pages-1.img.new"), ("dest", ".core-1.img.new"),
])
def test_apply_refuses_anything_but_regular_files(tmp_path: Path, what: str, area: str, name: str) -> None:
    canary, canary_file = _canary(tmp_path)
    content = _pages(30, 8)
    _write_dump(tmp_path / "old", {1: ([(0x10000, 8)], content)})
    changed = content.copy()
    changed[3, 1] ^= 1
    _write_dump(tmp_path / "new", {1: ([(0x10000, 8)], changed)}, {"core-1.img": b"core-new", "pstree.img": b"tree"})
    shutil.copytree(tmp_path / "old", tmp_path / "dest")
    make_delta(tmp_path / "new", tmp_path / "old", tmp_path / "out")
    shutil.copytree(tmp_path / "out", tmp_path / "recv")
    _plant(tmp_path / area / name, what, canary_file)
    with pytest.raises(DeltaError, match=f"{name}.* is a"):
        apply_delta(tmp_path / "recv", tmp_path / "dest")
    _untouched(canary)


@pytest.mark.parametrize("area", ["recv", "dest"])
def test_apply_refuses_an_area_that_is_a_link(tmp_path: Path, area: str) -> None:
    canary, _ = _canary(tmp_path)
    content = _pages(31, 4)
    _write_dump(tmp_path / "old", {1: ([(0x10000, 4)], content)})
    _write_dump(tmp_path / "new", {1: ([(0x10000, 4)], content[::-1].copy())})
    shutil.copytree(tmp_path / "old", tmp_path / "dest")
    make_delta(tmp_path / "new", tmp_path / "old", tmp_path / "recv")
    for p in (tmp_path / area).iterdir():
        shutil.copy(p, canary / p.name) if area == "recv" else None
    shutil.rmtree(tmp_path / area)
    (tmp_path / area).symlink_to(canary)
    before = {p.name: p.read_bytes() for p in canary.iterdir()}
    with pytest.raises(DeltaError, match=f"{area} is a symbolic link"):
        apply_delta(tmp_path / "recv", tmp_path / "dest")
    assert {p.name: p.read_bytes() for p in canary.iterdir()} == before


def _serve(delta: Path, images: Path, message: bytes) -> dict:  # type: ignore[type-arg]
    import io
    import json

    from phaul.memory import page_stream

    tx = io.BytesIO()
    page_stream.serve("s3cret", delta, images, io.BytesIO(b"s3cret\n" + message), tx)
    ready, answer = tx.getvalue().splitlines()
    assert ready == page_stream.READY.strip()
    return json.loads(answer)  # type: ignore[no-any-return]


@pytest.mark.parametrize("what", STRANGERS)
@pytest.mark.parametrize("where", ["images/pages-1.img", "images/.pages-1.img.new", "images/core-1.img", "delta/core-1.img"])
def test_page_stream_refuses_strangers_in_either_area(tmp_path: Path, what: str, where: str) -> None:
    canary, canary_file = _canary(tmp_path)
    _two_dumps(tmp_path)
    mdir = tmp_path / "mdir"
    (mdir / "delta").mkdir(exist_ok=True)
    _plant(mdir / where, what, canary_file)
    answer = _serve(mdir / "delta", mdir / "images", _stream_message(tmp_path / "out"))
    if where.startswith("delta/"):
        # the stream empties delta/ first (unlinking, never following) and writes its own files
        assert answer["ok"] is True, answer
        _same_dirs(tmp_path / "new", mdir / "images")
    else:
        assert answer["ok"] is False and where.split("/")[1] in answer["error"] and " is a" in answer["error"], answer
    _untouched(canary)


@pytest.mark.parametrize("area", ["delta", "images"])
def test_page_stream_refuses_an_area_that_is_a_link(tmp_path: Path, area: str) -> None:
    canary, _ = _canary(tmp_path)
    _two_dumps(tmp_path)
    mdir = tmp_path / "mdir"
    shutil.rmtree(mdir / area, ignore_errors=True)
    if area == "images":
        shutil.copytree(tmp_path / "old", canary, dirs_exist_ok=True)
    (mdir / area).symlink_to(canary)
    before = {p.name: p.read_bytes() for p in canary.iterdir()}
    answer = _serve(mdir / "delta", mdir / "images", _stream_message(tmp_path / "out"))
    assert answer["ok"] is False and f"{area} is a symbolic link" in answer["error"], answer
    assert {p.name: p.read_bytes() for p in canary.iterdir()} == before


def test_the_planted_links_of_issue_10_leave_the_canary_untouched(tmp_path: Path) -> None:
    """The review's two reproductions: `images/.pages-1.img.new -> /canary/file` under
    ApplyPages, `delta -> /canary/dir` under the page stream."""
    canary, canary_file = _canary(tmp_path)
    content = _pages(32, 8)
    _write_dump(tmp_path / "old", {1: ([(0x10000, 8)], content)})
    _write_dump(tmp_path / "new", {1: ([(0x20000, 4), (0x10000, 8)], np.concatenate([_pages(33, 4), content]))})
    shutil.copytree(tmp_path / "old", tmp_path / "images")
    delta, _ = make_delta(tmp_path / "new", tmp_path / "old", tmp_path / "delta")
    assert not delta.recipes[0].in_place()  # built into .pages-1.img.new
    (tmp_path / "images" / ".pages-1.img.new").symlink_to(canary_file)
    with pytest.raises(DeltaError, match=r"\.pages-1\.img\.new is a symbolic link"):
        apply_delta(tmp_path / "delta", tmp_path / "images")
    _untouched(canary)
    (tmp_path / "images" / ".pages-1.img.new").unlink()
    msg = _stream_message(tmp_path / "delta")
    shutil.rmtree(tmp_path / "delta")
    (tmp_path / "delta").symlink_to(canary)
    answer = _serve(tmp_path / "delta", tmp_path / "images", msg)
    assert answer["ok"] is False and "delta is a symbolic link" in answer["error"]
    _untouched(canary)


@pytest.mark.parametrize("header", [b'{"files": [["a", 1e999]]}', b"[" * 100_000, b'{"files": [["a", "x"]]}'])
def test_a_malformed_page_stream_header_gets_an_error_answer(header: bytes) -> None:
    from phaul.memory import page_stream

    with pytest.raises(page_stream.StreamError, match="malformed page stream header"):
        page_stream._parse_header(header)
