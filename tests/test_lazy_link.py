"""The source's end of post-copy's page link (phaul.memory.lazy_link.serve), without the lab:
the secret first, then HELLO and bytes both ways to a hub that may open late (a wrong
secret: tests/test_page_relay.py)."""

from __future__ import annotations

import io
import os
import socket
import threading
import time

from phaul.memory import lazy_link, page_relay


def _pipe_io(data: bytes) -> tuple[io.BufferedReader, int]:
    r, w = os.pipe()
    os.write(w, data)
    return os.fdopen(r, "rb"), w


def test_relays_both_ways_to_a_hub_that_listens_late(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "hub.sock"
    got: list[bytes] = []

    def hub() -> None:  # opens 0.3 s late
        time.sleep(0.3)
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(sock))
            s.listen(1)
            conn, _ = s.accept()
            with conn:
                got.append(conn.recv(100))
                conn.sendall(b"pages" * 1000)

    t = threading.Thread(target=hub)
    t.start()
    rx, w = _pipe_io(b"s3cret\nrequest")
    out_r, out_w = os.pipe()
    closer = threading.Timer(1.0, os.close, (w,))  # the destination ends its side after a while
    closer.start()
    with rx, os.fdopen(out_w, "wb", closefd=False) as tx:  # serve closes it: the end of its answers
        assert lazy_link.serve("s3cret", sock, rx, tx, dial_timeout=5) == 0
    t.join()
    closer.join()
    with os.fdopen(out_r, "rb") as answer:
        assert answer.read() == page_relay.HELLO + b"pages" * 1000
    assert got == [b"request"]


def test_status_is_read_line_by_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    status = tmp_path / "lazy.status"
    assert lazy_link.read_status(status) == {}
    status.write_text('{"listening": 5}\n{"held": 2}\nhalf a li')
    assert lazy_link.read_status(status) == {"listening": 5, "held": 2}
