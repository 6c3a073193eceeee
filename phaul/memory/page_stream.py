"""A pre-opened stream for the final page delta.

An rsync push costs about 70 ms before the first byte moves (TLS handshake,
rsync's start and file list), and applying the delta takes one more call to
the destination agent. The final delta travels while the container is frozen,
so the source opens this stream before it freezes the container: the
destination agent listens on a per-migration TLS endpoint (`phaul.channels.transport`)
that accepts the source's certificate only and runs `python -m
phaul.memory.page_stream SECRET_FILE DELTA_DIR IMAGES_DIR` for the connection.
The source's first line is the migration's secret (phaul.channels.transport);
a wrong or missing one ends the stream with an error answer and nothing
written. Then that process says `ready` and for each message writes the
files into DELTA_DIR, applies the page delta to IMAGES_DIR
(`phaul.memory.page_delta`) and answers.

Message: one JSON line `{"files": [[NAME, SIZE], ...]}`, then the files'
bytes in that order. Answer: one JSON line, `{"ok": true, "pages_written": N,
"ms": MS}` or `{"ok": false, "error": TEXT}`.
"""

from __future__ import annotations

import hmac
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, NoReturn

from phaul.errors import InvalidInput
from phaul.linux.datatree import DataDir

MAX_FILES = 100_000
MAX_BYTES = 1 << 40
MAX_HEADER = 64 << 20
CHUNK = 1 << 20
READY = b"ready\n"


class StreamError(Exception):
    """The stream failed; the caller sends the delta another way."""


@dataclass
class StreamResult:
    bytes_sent: int
    pages_written: int
    dest_ms: float
    ms: float


# -- destination: the process behind the endpoint ----------------------------------------


def serve(secret: str, delta_dir: Path, images_dir: Path, rx: BinaryIO, tx: BinaryIO) -> None:
    """Check that the source knows `secret`, then answer messages on `rx`/`tx` until
    the source closes the stream: write each message's files into `delta_dir`
    (created if missing, emptied first) and apply them to `images_dir`. Both are
    received areas: every file is opened by name relative to its directory, never
    through a link (`phaul.linux.datatree`)."""
    from phaul.memory import page_delta

    given = rx.readline(256).rstrip(b"\n")
    if not secret or not hmac.compare_digest(given, secret.encode()):
        tx.write(json.dumps({"ok": False, "error": "wrong or missing migration secret"}).encode() + b"\n")
        tx.flush()
        return
    tx.write(READY)
    tx.flush()
    while True:
        line = rx.readline(MAX_HEADER)
        if not line:
            return
        try:
            files = _parse_header(line)
            with DataDir(delta_dir, create=True) as delta:
                for name in delta.names():
                    delta.unlink(name)
                for name, size in files:
                    _receive(rx, delta, name, size)
            stats = page_delta.apply_delta(delta_dir, images_dir)
            answer: dict[str, object] = {"ok": True, "pages_written": stats.pages_written, "ms": stats.ms}
        except (page_delta.DeltaError, StreamError, InvalidInput, OSError, ValueError) as e:
            answer = {"ok": False, "error": str(e)[:2000]}
            tx.write(json.dumps(answer).encode() + b"\n")
            tx.flush()
            return  # the rest of the stream cannot be trusted
        tx.write(json.dumps(answer).encode() + b"\n")
        tx.flush()


def _parse_header(line: bytes) -> list[tuple[str, int]]:
    try:
        raw = json.loads(line)["files"]
        files = [(str(n), int(s)) for n, s in raw]
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:  # 1e999, [[[[...
        raise StreamError(f"malformed page stream header: {type(e).__name__}: {str(e)[:200]}") from None
    if len(files) > MAX_FILES or sum(s for _, s in files) > MAX_BYTES:
        raise StreamError("page stream message too large")
    for name, size in files:
        if not name or name != os.path.basename(name) or name in (".", "..") or "\0" in name or size < 0:
            raise StreamError(f"invalid file {name!r} in page stream")
    if len({n for n, _ in files}) != len(files):
        raise StreamError("duplicate file in page stream")
    return files


def _receive(rx: BinaryIO, delta: DataDir, name: str, size: int) -> None:
    with os.fdopen(delta.create(name), "wb") as f:
        _copy(rx, f, size, f"page stream ended inside {name}")


def _copy(src: IO[bytes], dst: IO[bytes], size: int, short: str) -> None:
    """Copy `size` bytes from `src` to `dst` a chunk at a time; StreamError(`short`) if `src` ends first."""
    left = size
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise StreamError(short)
        dst.write(chunk)
        left -= len(chunk)


def main(argv: list[str]) -> int:
    from phaul.channels.transport import read_secret

    if len(argv) != 3:
        print("usage: python -m phaul.memory.page_stream SECRET_FILE DELTA_DIR IMAGES_DIR", file=sys.stderr)
        return 2
    serve(read_secret(Path(argv[0])), Path(argv[1]), Path(argv[2]), sys.stdin.buffer, sys.stdout.buffer)
    return 0


# -- source ----------------------------------------------------------------------------------


class PageStream:
    """The source's end: a TLS connection (`phaul.channels.transport.TLS_RSH`) to the
    destination's page stream endpoint, opened and ready before the freeze; the
    migration's `secret` is its first line."""

    def __init__(self, env: dict[str, str], secret: str, timeout: float = 30.0) -> None:
        from phaul.channels.transport import TLS_RSH

        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile()  # socat's reason when the stream fails
        self.proc = subprocess.Popen(
            ["sh", str(TLS_RSH)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(secret.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:
            self._fail(f"the page stream broke: {e}")
        line = self._readline()
        if line != READY:
            self._fail(f"the page stream did not become ready ({line[:80]!r})")

    def send(self, delta_dir: Path) -> StreamResult:
        """Send every file of `delta_dir`; the destination applies the delta. Raises StreamError."""
        t0 = time.monotonic()
        files = sorted((p.name, p.stat().st_size) for p in delta_dir.iterdir() if p.is_file())
        header = json.dumps({"files": files}, separators=(",", ":")).encode() + b"\n"
        sent = len(header)
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(header)
            for name, size in files:
                with open(delta_dir / name, "rb") as f:
                    _copy(f, stdin, size, f"{name} shrank while it was sent")
                sent += size
            stdin.flush()
        except OSError as e:
            self._fail(f"the page stream broke: {e}")
        line = self._readline()
        try:
            answer = json.loads(line)
        except ValueError:
            raise StreamError(f"the page stream answered {line[:80]!r}") from None
        if not answer.get("ok"):
            raise StreamError(f"the destination could not apply the page delta: {answer.get('error')}")
        return StreamResult(
            sent, int(answer.get("pages_written", 0)), float(answer.get("ms", 0.0)), (time.monotonic() - t0) * 1000
        )

    def _readline(self) -> bytes:
        import select

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            self._fail(f"the page stream did not answer within {self.timeout:g} s")
        return self.proc.stdout.readline(4096)

    def _fail(self, what: str) -> NoReturn:
        """End the stream and raise StreamError(`what`), with the TLS client's last words."""
        self._end(grace=0.5)
        self._stderr.seek(0)
        said = self._stderr.read()[-600:].decode(errors="replace").strip()
        self._stderr.close()
        raise StreamError(f"{what}: {said}" if said else what)

    def close(self) -> None:
        self._end()
        self._stderr.close()

    def _end(self, grace: float = 5.0) -> None:
        """Close the client's input and give it `grace` seconds to end, then kill it."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=grace)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
