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
_GOAWAY_FIXED = 8  # last stream id and error code; any debug data after it is skipped

# The shape of each frame type (RFC 9113 section 6), the one definition both paths of
# the walker apply: its name, its fixed payload length (None: any), and whether it
# belongs to a stream (True), to the connection (False) or to either (None).
_SHAPES: dict[int, tuple[str, int | None, bool | None]] = {
    DATA: ("DATA", None, True),
    HEADERS: ("HEADERS", None, True),
    PRIORITY: ("PRIORITY", 5, True),
    RST_STREAM: ("RST_STREAM", 4, True),
    SETTINGS: ("SETTINGS", None, False),
    PUSH_PROMISE: ("PUSH_PROMISE", None, True),
    PING: ("PING", 8, False),
    GOAWAY: ("GOAWAY", None, False),
    WINDOW_UPDATE: ("WINDOW_UPDATE", 4, None),
    CONTINUATION: ("CONTINUATION", None, True),
}
# (type, length, on the connection) of the frames that carry nothing the observer
# needs: the fast path skips them when their header has exactly this shape, and
# leaves any other header of their type to _check.
_SKIP_WHEN = frozenset(
    (ftype, size, on_connection)
    for ftype in (PING, WINDOW_UPDATE)
    for _name, size, on_stream in [_SHAPES[ftype]]
    for on_connection in (True, False)
    if on_stream is None or on_stream is not on_connection
)

# Walker states.
_HEAD = 0  # collecting the 9-byte frame header
_BODY = 1  # collecting a frame payload (or its first bytes) to handle it whole
_PASS = 2  # passing a DATA payload on (or skipping an unknown frame, padding, debug data)

DataFeed = Callable[[memoryview], None]


class H2Error(Exception):
    """The bytes are not an HTTP/2 stream this walker can follow."""


class Budget:
    """The bytes one connection's observer may hold, shared by everything that holds
    some: both frame walkers, the message assemblers of every stream, the HPACK
    tables, the open calls. Without it, each part's own limit would multiply."""

    __slots__ = ("left", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self.left = total

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True

    def give(self, size: int) -> None:
        self.left += size

    @property
    def held(self) -> int:
        return self.total - self.left


def _noop(*_: object) -> None:
    return None


def _check(ftype: int, flags: int, length: int, stream: int) -> None:
    """Raise H2Error unless a frame header has its type's shape (unknown types pass:
    they are ignored, RFC 9113 section 5.5)."""
    shape = _SHAPES.get(ftype)
    if shape is None:
        return
    name, size, on_stream = shape
    if size is not None and length != size:
        raise H2Error(f"bad {name} length {length}")
    if on_stream is True and not stream:
        raise H2Error(f"{name} on stream 0")
    if on_stream is False and stream:
        raise H2Error(f"{name} on a stream")
    if ftype == SETTINGS and (length % 6 or (flags & FLAG_ACK and length)):
        raise H2Error("bad SETTINGS length")
    if ftype == GOAWAY and length < _GOAWAY_FIXED:
        raise H2Error("GOAWAY truncated")


def _check_padding(pad: int, length: int) -> None:
    """Raise H2Error unless the pad length byte and `pad` bytes of padding fit in a
    padded frame of `length` bytes."""
    if pad >= length:
        raise H2Error("bad padding")


def _check_block(block_stream: int, ftype: int, stream: int) -> None:
    """While a header block waits for CONTINUATIONs, nothing else may come between."""
    if ftype != CONTINUATION or stream != block_stream:
        raise H2Error("header block interrupted")


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

    What it holds, a frame split over reads (DATA excepted: it is passed on as it
    comes, padding skipped) and a header block waiting for its CONTINUATIONs, comes
    out of `budget`; what does not fit raises H2Error.
    """

    __slots__ = (
        "_block",
        "_block_end_stream",
        "_block_push",
        "_block_stream",
        "_budget",
        "_buf",
        "_data_target",
        "_flags",
        "_held",
        "_left",
        "_length",
        "_need",
        "_on_data_end",
        "_on_goaway",
        "_on_headers",
        "_on_push_promise",
        "_on_rst_stream",
        "_on_settings",
        "_pad",
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
        budget: Budget | None = None,
    ) -> None:
        self._on_headers = on_headers
        self._data_target = data_target
        self._on_data_end = on_data_end
        self._on_rst_stream = on_rst_stream
        self._on_settings = on_settings
        self._on_goaway = on_goaway
        self._on_push_promise = on_push_promise
        self._budget = budget if budget is not None else Budget(1 << 62)
        self._preface_seen = 0 if preface else len(PREFACE)
        self._buf = bytearray()
        self._state = _HEAD
        self._need = 9
        self._held = 0  # budget taken for the frame being collected
        self._left = 0
        self._pad = 0  # padding to skip after the DATA payload being passed on
        self._target: DataFeed | None = None
        self._type = self._flags = self._stream = self._length = 0
        # A header block waiting for its CONTINUATION frames.
        self._block: bytearray | None = None
        self._block_stream = 0
        self._block_end_stream = False
        self._block_push = False

    @property
    def held(self) -> int:
        """Bytes of the budget this walker holds (a split frame, a header block)."""
        return self._held + (len(self._block) if self._block is not None else 0)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        end = len(mv)
        pos = 0
        if self._preface_seen < _PREFACE_LEN:
            pos = self._check_preface(mv)
        if self._state != _HEAD or self._buf:
            pos = self._resume(mv, pos, end)
        # The common case, frames that arrive whole, is dispatched here with as little
        # per-frame work as possible; anything split over reads goes through _resume,
        # and any frame these few tests do not prove well-formed through _check.
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
            if self._block is not None:
                _check_block(self._block_stream, ftype, stream)
            if stop > end or ftype > CONTINUATION:
                self._head(mv, pos)
                pos = self._resume(mv, body, end)
                run_stream = -1
                continue
            # By frequency in gRPC traffic: grpc-go pings (BDP estimation) and
            # window updates are as frequent as DATA and HEADERS.
            if ftype == DATA and not flags & FLAG_PADDED and stream:
                if stream != run_stream:
                    run_stream, run_target = stream, self._data_target(stream)
                if run_target is not None and length:
                    run_target(mv[body:stop])
                if flags & FLAG_END_STREAM:
                    run_stream = -1
                    self._on_data_end(stream)
                pos = stop
                continue
            run_stream = -1
            if ftype == HEADERS and flags & _BLOCK_FLAGS == FLAG_END_HEADERS and stream:
                self._on_headers(stream, bytes(mv[body:stop]), bool(flags & FLAG_END_STREAM))
            elif (ftype, length, not stream) in _SKIP_WHEN:
                pass
            else:
                _check(ftype, flags, length, stream)
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
                    if self._state == _HEAD:
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
                continue
            self._state = _HEAD
            self._need = 9
            self._collected(memoryview(buf))
            self._budget.give(self._held)
            self._held = 0
            if self._state == _HEAD:
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
        self._type, self._flags, self._stream, self._length = ftype, flags, stream, length
        if self._block is not None:
            _check_block(self._block_stream, ftype, stream)
        _check(ftype, flags, length, stream)
        if ftype == DATA and not flags & FLAG_PADDED:
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
            # Padded DATA: only the pad length, the rest is streamed. GOAWAY: only
            # what precedes its debug data.
            need = length
            if ftype == DATA:
                need = 1
            elif ftype == GOAWAY:
                need = _GOAWAY_FIXED
            if not self._budget.take(need):
                raise H2Error(f"a {need}-byte frame is over the connection's memory budget")
            self._held = need
            self._state, self._need = _BODY, need
        else:
            self._frame(ftype, flags, stream, memoryview(b""))

    def _collected(self, payload: memoryview) -> None:
        """The collected start or whole of a frame whose header _head read."""
        ftype, length = self._type, self._length
        if ftype == DATA:  # padded: pass the data on, then skip the padding
            pad = payload[0]
            _check_padding(pad, length)
            self._target = self._data_target(self._stream)
            self._pad = pad
            self._state, self._left = _PASS, length - 1 - pad
            if not self._left:
                self._passed()
        elif ftype == GOAWAY:
            self._frame(ftype, self._flags, self._stream, payload)
            if length > _GOAWAY_FIXED:
                self._target = None
                self._state, self._left = _PASS, length - _GOAWAY_FIXED
        else:
            self._frame(ftype, self._flags, self._stream, payload)

    def _passed(self) -> None:
        if self._pad:
            self._state, self._left, self._pad = _PASS, self._pad, 0
            self._target = None
            return
        self._state = _HEAD
        self._need = 9
        self._target = None
        if self._type == DATA and self._flags & FLAG_END_STREAM:
            self._on_data_end(self._stream)

    def _frame(self, ftype: int, flags: int, stream: int, payload: memoryview) -> None:
        """A frame whose header _check accepted, with all its payload at hand (all
        that matters of it for GOAWAY)."""
        if ftype == HEADERS:
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
            if len(block) + len(payload) > MAX_HEADER_BLOCK:
                raise H2Error("header block too large")
            if not self._budget.take(len(payload)):
                raise H2Error("header block over the connection's memory budget")
            block += payload
            if flags & FLAG_END_HEADERS:
                self._block = None
                self._budget.give(len(block))
                self._end_block(bytes(block))
        elif ftype == DATA:  # padded, whole at hand
            data = _unpad(payload, flags)
            target = self._data_target(stream)
            if target is not None and data:
                target(data)
            if flags & FLAG_END_STREAM:
                self._on_data_end(stream)
        elif ftype == RST_STREAM:
            self._on_rst_stream(stream, _U32.unpack_from(payload)[0])
        elif ftype == SETTINGS:
            if flags & FLAG_ACK:
                self._on_settings(True, [])
            else:
                self._on_settings(False, [s for s in _SETTING.iter_unpack(payload)])
        elif ftype == GOAWAY:
            last, code = _U32_PAIR.unpack_from(payload)
            self._on_goaway(last & 0x7FFFFFFF, code)
        elif ftype == PUSH_PROMISE:
            fragment = _unpad(payload, flags)
            if len(fragment) < 4:
                raise H2Error("bad PUSH_PROMISE")
            self._start_block(fragment[4:], stream, flags & ~FLAG_END_STREAM, push=True)
        # PRIORITY, PING, WINDOW_UPDATE: nothing to follow beyond their shape.

    def _start_block(self, fragment: memoryview, stream: int, flags: int, *, push: bool) -> None:
        self._block_stream, self._block_push = stream, push
        self._block_end_stream = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            self._end_block(bytes(fragment))
            return
        if not self._budget.take(len(fragment)):
            raise H2Error("header block over the connection's memory budget")
        self._block = bytearray(fragment)

    def _end_block(self, block: bytes) -> None:
        if self._block_push:
            self._on_push_promise(block)
        else:
            self._on_headers(self._block_stream, block, self._block_end_stream)


def _unpad(payload: memoryview, flags: int) -> memoryview:
    if not flags & FLAG_PADDED:
        return payload
    pad = payload[0] if payload else 0
    _check_padding(pad, len(payload))
    return payload[1 : len(payload) - pad]
