"""The source's end of post-copy's page link (phaul.memory.lazy_link.serve), without the lab:
the secret first, then bytes both ways to a page server that may open late."""

from __future__ import annotations

import io
import os
import socket
import threading
import time

from phaul.memory import lazy_link


def _pipe_io(data: bytes) -> tuple[io.BufferedReader, int]:
    r, w = os.pipe()
    os.write(w, data)
    return os.fdopen(r, "rb"), w


def test_a_wrong_secret_reaches_nothing() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        rx, w = _pipe_io(b"not-the-secret\nPS_IOV_GET\n")
        os.close(w)
        out_r, out_w = os.pipe()
        with rx, os.fdopen(out_w, "wb") as tx:
            assert lazy_link.serve("s3cret", port, rx, tx, dial_timeout=0.5) == 1
        server.settimeout(0.2)
        try:
            server.accept()
            raise AssertionError("serve connected with a wrong secret")
        except TimeoutError:
            pass
        os.close(out_r)


def test_relays_both_ways_to_a_page_server_that_listens_late() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    got: list[bytes] = []

    def page_server() -> None:  # opens 0.3 s late, as CRIU's does at the commit
        time.sleep(0.3)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1)
            conn, _ = s.accept()
            with conn:
                got.append(conn.recv(100))
                conn.sendall(b"pages" * 1000)

    t = threading.Thread(target=page_server)
    t.start()
    rx, w = _pipe_io(b"s3cret\nrequest")
    out_r, out_w = os.pipe()
    closer = threading.Timer(1.0, os.close, (w,))  # the destination ends its side after a while
    closer.start()
    with rx, os.fdopen(out_w, "wb", closefd=False) as tx:  # serve closes it: the end of its answers
        assert lazy_link.serve("s3cret", port, rx, tx, dial_timeout=5) == 0
    t.join()
    closer.join()
    with os.fdopen(out_r, "rb") as answer:
        assert answer.read() == b"pages" * 1000
    assert got == [b"request"]


def test_status_is_read_line_by_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    status = tmp_path / "lazy.status"
    assert lazy_link.read_status(status) == {}
    status.write_text('{"listening": 5}\n{"held": 2}\nhalf a li')
    assert lazy_link.read_status(status) == {"listening": 5, "held": 2}
