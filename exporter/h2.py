"""A passive HTTP/2 frame walker for one direction of a connection.

It reads bytes in arbitrary chunks and reports frames through callbacks; it never
answers anything. DATA payloads are handed on in pieces as they arrive, so a large
frame is never buffered; other frames are small and are buffered whole. Anything
that is not HTTP/2 raises `H2Error`: the caller stops observing the connection.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1

# grpc-go's default limit on a header list (client and server alike); a block the
# peers would reject is not worth buffering.
MAX_HEADER_BLOCK = 16 << 20

_FRAME_HEADER = struct.Struct(">BHBBI")
_U32 = struct.Struct(">I")
_U32_PAIR = struct.Struct(">II")
_SETTING = struct.Struct(">HI")
_PREFACE_LEN = len(PREFACE)
# HEADERS flags that the fast path leaves to the general one.
_BLOCK_FLAGS = FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY

# Walker states.
_HEAD = 0  # collecting the 9-byte frame header
_BODY = 1  # collecting a whole (non-streamed) frame payload
_PASS = 2  # passing an unpadded DATA payload on (or skipping an unknown frame)

DataFeed = Callable[[memoryview], None]


class H2Error(Exception):
    """The bytes are not an HTTP/2 stream this walker can follow."""


def _noop(*_: object) -> None:
    return None


class FrameReader:
    """Walks the frames of one direction and calls back for the ones that matter.

    - on_headers(stream_id, block, end_stream): a complete header block (HEADERS plus
      CONTINUATIONs, padding and priority removed).
    - on_push_promise(block): a PUSH_PROMISE header block, only for HPACK state.
    - data_target(stream_id): where the DATA payload of that stream goes, or None.
      Asked once for a run of DATA frames of one stream read together, so its
      answer must not change while that target is being fed.
    - on_data_end(stream_id): a DATA frame with END_STREAM was fully read.
    - on_rst_stream(stream_id, error_code), on_goaway(last_stream_id, error_code).
    - on_settings(ack, [(identifier, value), ...]).
    """

    __slots__ = (
        "_block",
        "_block_end_stream",
        "_block_push",
        "_block_stream",
        "_buf",
        "_data_target",
        "_flags",
        "_left",
        "_need",
        "_on_data_end",
        "_on_goaway",
        "_on_headers",
        "_on_push_promise",
        "_on_rst_stream",
        "_on_settings",
        "_preface_seen",
        "_state",
        "_stream",
        "_target",
        "_type",
    )

    def __init__(
        self,
        *,
        preface: bool,
        on_headers: Callable[[int, bytes, bool], None],
        data_target: Callable[[int], DataFeed | None],
        on_data_end: Callable[[int], None],
        on_rst_stream: Callable[[int, int], None] = _noop,
        on_settings: Callable[[bool, list[tuple[int, int]]], None] = _noop,
        on_goaway: Callable[[int, int], None] = _noop,
        on_push_promise: Callable[[bytes], None] = _noop,
    ) -> None:
        self._on_headers = on_headers
        self._data_target = data_target
        self._on_data_end = on_data_end
        self._on_rst_stream = on_rst_stream
        self._on_settings = on_settings
        self._on_goaway = on_goaway
        self._on_push_promise = on_push_promise
        self._preface_seen = 0 if preface else len(PREFACE)
        self._buf = bytearray()
        self._state = _HEAD
        self._need = 9
        self._left = 0
        self._target: DataFeed | None = None
        self._type = self._flags = self._stream = 0
        # A header block waiting for its CONTINUATION frames.
        self._block: bytearray | None = None
        self._block_stream = 0
        self._block_end_stream = False
        self._block_push = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        end = len(mv)
        pos = 0
        if self._preface_seen < _PREFACE_LEN:
            pos = self._check_preface(mv)
        if self._state != _HEAD or self._buf:
            pos = self._resume(mv, pos, end)
        # The common case, frames that arrive whole, is dispatched here with as little
        # per-frame work as possible; anything split over reads goes through _resume.
        unpack = _FRAME_HEADER.unpack_from
        # A stream's DATA frames come in runs (a log streams in many): its target is
        # looked up once per run. Any other frame may change it, and ends the run.
        run_stream, run_target = -1, None
        while pos < end:
            if end - pos < 9:
                self._buf += mv[pos:end]
                return
            hi, lo, ftype, flags, stream = unpack(mv, pos)
            stream &= 0x7FFFFFFF
            length = (hi << 16) | lo
            body = pos + 9
            stop = body + length
            if self._block is not None and (ftype != CONTINUATION or stream != self._block_stream):
                raise H2Error("header block interrupted")
            if stop > end or ftype > CONTINUATION:
                self._head(mv, pos)
                pos = self._resume(mv, body, end)
                run_stream = -1
                continue
            # By frequency in gRPC traffic: grpc-go pings (BDP estimation) and
            # window updates are as frequent as DATA and HEADERS.
            if ftype == DATA and not flags & FLAG_PADDED:
                if stream != run_stream:
                    if not stream:
                        raise H2Error("DATA on stream 0")
                    run_stream, run_target = stream, self._data_target(stream)
                if run_target is not None and length:
                    run_target(mv[body:stop])
                if flags & FLAG_END_STREAM:
                    run_stream = -1
                    self._on_data_end(stream)
                pos = stop
                continue
            run_stream = -1
            if ftype == PING:
                if length != 8 or stream:
                    raise H2Error("bad PING")
            elif ftype == HEADERS and flags & _BLOCK_FLAGS == FLAG_END_HEADERS:
                if not stream:
                    raise H2Error("HEADERS on stream 0")
                self._on_headers(stream, bytes(mv[body:stop]), bool(flags & FLAG_END_STREAM))
            elif ftype == WINDOW_UPDATE:
                if length != 4:
                    raise H2Error("bad WINDOW_UPDATE")
            else:
                self._frame(ftype, flags, stream, mv[body:stop])
            pos = stop

    def _resume(self, mv: memoryview, pos: int, end: int) -> int:
        """Carry the frame in progress on with mv[pos:end]; returns where it ended
        (end when it still is not complete)."""
        while pos < end:
            state = self._state
            if state == _PASS:
                take = min(self._left, end - pos)
                target = self._target
                if target is not None:
                    target(mv[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._passed()
                    return pos
                continue
            buf = self._buf
            if state == _HEAD and not buf:
                return pos
            take = min(self._need - len(buf), end - pos)
            buf += mv[pos : pos + take]
            pos += take
            if len(buf) < self._need:
                return pos
            # Hand the buffer over instead of copying it out.
            self._buf = bytearray()
            if state == _HEAD:
                self._head(memoryview(buf), 0)
            else:
                self._state = _HEAD
                self._need = 9
                self._frame(self._type, self._flags, self._stream, memoryview(buf))
                return pos
        return pos

    def _check_preface(self, mv: memoryview) -> int:
        seen = self._preface_seen
        take = min(len(PREFACE) - seen, len(mv))
        if mv[:take] != PREFACE[seen : seen + take]:
            raise H2Error("missing client preface")
        self._preface_seen = seen + take
        return take

    def _head(self, chunk: memoryview, start: int) -> None:
        hi, lo, ftype, flags, stream = _FRAME_HEADER.unpack_from(chunk, start)
        length = (hi << 16) | lo
        stream &= 0x7FFFFFFF
        self._type, self._flags, self._stream = ftype, flags, stream
        if self._block is not None and (ftype != CONTINUATION or stream != self._block_stream):
            raise H2Error("header block interrupted")
        if ftype == DATA and not flags & FLAG_PADDED:
            if not stream:
                raise H2Error("DATA on stream 0")
            self._target = self._data_target(stream)
            if length:
                self._state, self._left = _PASS, length
            else:
                self._passed()
        elif ftype > CONTINUATION:
            # Unknown frame types are ignored (RFC 9113 section 5.5): skip unbuffered.
            self._target = None
            if length:
                self._state, self._left = _PASS, length
        elif length:
            self._state, self._need = _BODY, length
        else:
            self._frame(ftype, flags, stream, memoryview(b""))

    def _passed(self) -> None:
        self._state = _HEAD
        self._need = 9
        self._target = None
        if self._type == DATA and self._flags & FLAG_END_STREAM:
            self._on_data_end(self._stream)

    def _frame(self, ftype: int, flags: int, stream: int, payload: memoryview) -> None:
        if ftype == HEADERS:
            if not stream:
                raise H2Error("HEADERS on stream 0")
            fragment = _unpad(payload, flags)
            if flags & FLAG_PRIORITY:
                if len(fragment) < 5:
                    raise H2Error("HEADERS priority truncated")
                fragment = fragment[5:]
            self._start_block(fragment, stream, flags, push=False)
        elif ftype == CONTINUATION:
            block = self._block
            if block is None:
                raise H2Error("CONTINUATION without HEADERS")
            block += payload
            if len(block) > MAX_HEADER_BLOCK:
                raise H2Error("header block too large")
            if flags & FLAG_END_HEADERS:
                self._block = None
                self._end_block(bytes(block))
        elif ftype == DATA:  # padded: buffered whole
            if not stream:
                raise H2Error("DATA on stream 0")
            data = _unpad(payload, flags)
            target = self._data_target(stream)
            if target is not None and data:
                target(data)
            if flags & FLAG_END_STREAM:
                self._on_data_end(stream)
        elif ftype == RST_STREAM:
            if len(payload) != 4 or not stream:
                raise H2Error("bad RST_STREAM")
            self._on_rst_stream(stream, _U32.unpack_from(payload)[0])
        elif ftype == SETTINGS:
            self._settings(payload, flags, stream)
        elif ftype == GOAWAY:
            if len(payload) < 8 or stream:
                raise H2Error("bad GOAWAY")
            last, code = _U32_PAIR.unpack_from(payload)
            self._on_goaway(last & 0x7FFFFFFF, code)
        elif ftype == PING:
            if len(payload) != 8 or stream:
                raise H2Error("bad PING")
        elif ftype == WINDOW_UPDATE:
            if len(payload) != 4:
                raise H2Error("bad WINDOW_UPDATE")
        elif ftype == PRIORITY:
            if len(payload) != 5 or not stream:
                raise H2Error("bad PRIORITY")
        elif ftype == PUSH_PROMISE:
            fragment = _unpad(payload, flags)
            if len(fragment) < 4 or not stream:
                raise H2Error("bad PUSH_PROMISE")
            self._start_block(fragment[4:], stream, flags & ~FLAG_END_STREAM, push=True)

    def _settings(self, payload: memoryview, flags: int, stream: int) -> None:
        if stream:
            raise H2Error("SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise H2Error("SETTINGS ACK with a payload")
            self._on_settings(True, [])
            return
        if len(payload) % 6:
            raise H2Error("SETTINGS length not a multiple of 6")
        self._on_settings(False, [s for s in _SETTING.iter_unpack(payload)])

    def _start_block(self, fragment: memoryview, stream: int, flags: int, *, push: bool) -> None:
        self._block_stream, self._block_push = stream, push
        self._block_end_stream = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            self._end_block(bytes(fragment))
        else:
            self._block = bytearray(fragment)

    def _end_block(self, block: bytes) -> None:
        if self._block_push:
            self._on_push_promise(block)
        else:
            self._on_headers(self._block_stream, block, self._block_end_stream)


def _unpad(payload: memoryview, flags: int) -> memoryview:
    if not flags & FLAG_PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise H2Error("bad padding")
    return payload[1 : len(payload) - payload[0]]
