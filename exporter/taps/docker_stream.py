"""The daemon's side of a non-Tty exec session: Docker's stdcopy multiplexing.

Each frame is an 8-byte header (stream: 0 stdin, 1 stdout, 2 stderr, 3 the daemon's
own error; three zero bytes; a big-endian uint32 payload length) and its payload. The
daemon cuts stdout into frames of up to 32 KiB wherever its copy buffer ends, so an
HTTP/2 frame of the session may straddle any number of them: stdout payloads are
handed on as one continuous byte stream, one piece per chunk the splice read: a
memoryview slice of it when the chunk holds one stdout payload (no copy), the payloads
joined when it holds several; every other stream is dropped.
"""

from __future__ import annotations

from collections.abc import Callable

STDOUT = 1
_HEADER = 8
_MAX_STREAM = 3  # stdin, stdout, stderr, systemerr: anything above is not stdcopy

Output = Callable[[memoryview, float], None]
OnError = Callable[["StreamError"], None]


class StreamError(Exception):
    """The bytes are not a stdcopy stream."""


class StdcopyDemultiplexer:
    """Feeds the stdout payloads of a multiplexed stream to `output`.

    Bytes that are not stdcopy are reported to `on_error` once; everything after them
    is ignored, since where the next frame starts is lost.
    """

    __slots__ = ("_failed", "_head", "_on_error", "_out", "_remaining", "_stdout")

    def __init__(self, output: Output, on_error: OnError) -> None:
        self._out = output
        self._on_error = on_error
        self._head = bytearray()  # a header split over reads
        self._remaining = 0  # payload bytes of the current frame still to come
        self._stdout = False  # the current frame is stdout
        self._failed = False

    def feed(self, data: bytes, now: float) -> None:
        if self._failed:
            return
        try:
            self._feed(data, now)
        except StreamError as exc:
            self._failed = True
            self._on_error(exc)

    def _feed(self, data: bytes, now: float) -> None:
        pieces: list[memoryview] = []
        try:
            self._split(memoryview(data), pieces)
        finally:
            # What came before bad bytes is handed on too: it was stdout.
            if len(pieces) == 1:
                self._out(pieces[0], now)
            elif pieces:
                # One read holding several frames (the daemon writes 32 KiB frames, the
                # splice reads up to 256 KiB): one joined piece costs a copy, but every
                # piece boundary cuts an HTTP/2 frame that the observer must reassemble,
                # which costs more.
                self._out(memoryview(b"".join(pieces)), now)

    def _split(self, mv: memoryview, pieces: list[memoryview]) -> None:
        end = len(mv)
        pos = 0
        remaining = self._remaining
        while pos < end:
            if remaining:
                stop = pos + remaining if end - pos > remaining else end
                if self._stdout:
                    pieces.append(mv[pos:stop])
                remaining -= stop - pos
                pos = stop
                continue
            head = self._head
            if head or end - pos < _HEADER:
                take = min(_HEADER - len(head), end - pos)
                head += mv[pos : pos + take]
                pos += take
                if len(head) < _HEADER:
                    break
                remaining = self._header(head)
                head.clear()
            else:
                remaining = self._header(mv[pos : pos + _HEADER])
                pos += _HEADER
        self._remaining = remaining

    def _header(self, header: bytes | bytearray | memoryview) -> int:
        stream = header[0]
        if stream > _MAX_STREAM or header[1] or header[2] or header[3]:
            raise StreamError("not a stdcopy frame header")
        self._stdout = stream == STDOUT
        return int.from_bytes(header[4:8], "big")
