"""gRPC's message layer over HTTP/2 DATA: length-prefixed messages reassembled per
stream and direction, decompressed and decoded as the StepRunner protobuf messages.

Nothing here knows HTTP/2 framing or HPACK (exporter.h2, exporter.observer) or what a
call's outcome is: it turns DATA bytes into messages and reports what it could not
read to the `ObserverSink` it is given.

FollowLogs responses (every CI log byte) are not buffered. A Go-marshalled
FollowLogsResponse is exactly `0a <varint n> <n bytes>`; the first few bytes of each
message prove that shape, and only a message that does not have it (schema drift,
garbage, compression) is buffered and decoded like any other.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from .events import JobStatus, ObserverSink
from .h2 import Budget
from .proto import step_pb2


@dataclass(frozen=True, slots=True)
class Rpc:
    request: type[Message]
    response: type[Message]


RPCS: dict[str, Rpc] = {
    "Run": Rpc(step_pb2.RunRequest, step_pb2.RunResponse),
    "FollowLogs": Rpc(step_pb2.FollowLogsRequest, step_pb2.FollowLogsResponse),
    "Status": Rpc(step_pb2.StatusRequest, step_pb2.StatusResponse),
    "Close": Rpc(step_pb2.CloseRequest, step_pb2.CloseResponse),
    "Cancel": Rpc(step_pb2.CancelRequest, step_pb2.CancelResponse),
}


def _is_flat(cls: type[Message]) -> bool:
    """Whether no field of `cls` is a message (a map's entries are messages too)."""
    return all(field.message_type is None for field in cls.DESCRIPTOR.fields)


# The StepRunner message types whose unknown fields can only be at their top level.
_FLAT: frozenset[type[Message]] = frozenset(
    cls for rpc in RPCS.values() for cls in (rpc.request, rpc.response) if _is_flat(cls)
)

# What a message assembler keeps of each message.
KEEP_NONE = 0  # count only
KEEP_ALL = 1  # buffer it (up to the size limit) and hand it on
KEEP_LOG = 2  # FollowLogsResponse: buffer only if it is not the plain one-field shape

_PEEK = 11  # tag byte + the longest varint
_PREFIX = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length

# zlib wbits per grpc-encoding we can undo.
_DECOMPRESSORS: dict[bytes, int] = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}

# (stream id, message bytes or None when over the size limit, compressed flag). By
# stream id, not by call, so that a finished call is not kept alive by its buffers.
OnMessage = Callable[[int, bytes | None, int], None]


class Messages:
    """Reassembles the length-prefixed gRPC messages of one direction of one stream.

    A message being stored holds its length of the connection's `Budget` until it
    is complete or `release()` is called; one that does not fit is skipped and
    handed on as None.
    """

    __slots__ = (
        "_budget",
        "_flag",
        "_hdr",
        "_left",
        "_length",
        "_max",
        "_on_message",
        "_oversize",
        "_peek",
        "_reserved",
        "_store",
        "_stream_id",
        "count",
        "keep",
    )

    def __init__(
        self, keep: int, max_bytes: int, stream_id: int, on_message: OnMessage, budget: Budget
    ) -> None:
        self.keep = keep
        self._budget = budget
        self._reserved = 0
        self._stream_id = stream_id
        self.count = 0
        self._max = max_bytes
        self._on_message = on_message
        self._hdr: bytearray | None = None  # a length prefix split over DATA frames
        self._left = -1  # body bytes still to come; -1 while reading a length prefix
        # Set for each message that does not come whole in one piece, before any read:
        # most do come whole, and the streams of a job are many.
        self._length: int
        self._flag: int
        self._store: bytearray | None
        self._peek: int  # KEEP_LOG: bytes to look at before deciding to keep the message
        self._oversize: bool

    def feed(self, mv: memoryview) -> None:
        pos, end = 0, len(mv)
        while pos < end:
            left = self._left
            if left < 0:
                hdr = self._hdr
                if hdr is None and end - pos >= 5:
                    flag, length = _PREFIX.unpack_from(mv, pos)
                    pos += 5
                    stop = pos + length
                    if stop <= end:  # the hot path: the whole message is at hand
                        self.count += 1
                        keep = self.keep
                        # _countable, inline: this runs for every CI log message.
                        if keep != KEEP_NONE and (
                            keep != KEEP_LOG
                            or flag
                            or (length and not plain_bytes_field(mv, pos, stop, length))
                        ):
                            message = bytes(mv[pos:stop]) if length <= self._max else None
                            self._on_message(self._stream_id, message, flag)
                        pos = stop
                    elif not self._countable(flag, length, mv, pos, end):
                        self._begin(flag, length)
                    else:
                        self._flag, self._length = flag, length
                        self._left = length - (end - pos)
                        self._store, self._peek, self._oversize = None, 0, False
                        return
                    continue
                if hdr is None:
                    hdr = self._hdr = bytearray()
                take = min(5 - len(hdr), end - pos)
                hdr += mv[pos : pos + take]
                pos += take
                if len(hdr) == 5:
                    self._hdr = None
                    self._begin(hdr[0], int.from_bytes(hdr[1:5]))
                continue
            take = min(left, end - pos)
            store = self._store
            if store is not None:
                if self._peek:
                    self._peek_at(mv[pos : pos + take])
                else:
                    store += mv[pos : pos + take]
            pos += take
            self._left = left - take
            if take == left:
                self._complete()

    def _countable(self, flag: int, length: int, mv: memoryview, start: int, stop: int) -> bool:
        """Whether the message starting at mv[start] needs nothing but counting,
        judged from the bytes at hand (False when they are too few to tell)."""
        keep = self.keep
        if keep == KEEP_NONE:
            return True
        if keep != KEEP_LOG or flag:
            return False
        return not length or plain_bytes_field(mv, start, stop, length)

    def _begin(self, flag: int, length: int) -> None:
        self._flag, self._length, self._left = flag, length, length
        keep = self.keep
        self._peek = 0
        self._oversize = False
        self._store = None
        if keep == KEEP_LOG and flag == 0:
            if length:
                self._store = bytearray()
                self._peek = min(length, _PEEK)
        elif keep != KEEP_NONE:
            if length > self._max or not self._reserve(length):
                self._oversize = True
            else:
                self._store = bytearray()
        if not length:
            self._complete()

    def _peek_at(self, piece: memoryview) -> None:
        store = self._store
        assert store is not None
        want = self._peek - len(store)
        store += piece[:want]
        if len(store) < self._peek:
            return
        self._peek = 0
        if plain_bytes_field(store, 0, len(store), self._length):
            self._store = None  # a well-formed log message: nothing to decode
        elif self._length > self._max or not self._reserve(self._length):
            self._store = None
            self._oversize = True
        else:
            store += piece[want:]

    def _reserve(self, length: int) -> bool:
        """Take `length` bytes of the connection's budget for the message being stored."""
        if not self._budget.take(length):
            return False
        self._reserved = length
        return True

    def release(self) -> None:
        """Give back what a partly stored message holds (its stream ended or it did)."""
        if self._reserved:
            self._budget.give(self._reserved)
            self._reserved = 0

    def _complete(self) -> None:
        self.count += 1
        self._left = -1
        self.release()
        store, self._store = self._store, None
        if store is not None:
            self._on_message(self._stream_id, bytes(store), self._flag)
        elif self._oversize:
            self._on_message(self._stream_id, None, self._flag)


def plain_bytes_field(buf: bytearray | memoryview, start: int, stop: int, length: int) -> bool:
    """Whether the `length`-byte message at buf[start:] is exactly one length-delimited
    field 1 (`0a <varint n> <n bytes>`), judged from buf[start:stop]."""
    if start >= stop or buf[start] != 0x0A:
        return False
    # Lengths below 16 KiB (one or two varint bytes) without the general loop.
    if start + 2 < stop:
        first, second = buf[start + 1], buf[start + 2]
        if first < 0x80:
            return 2 + first == length
        if second < 0x80:
            return 3 + ((first & 0x7F) | (second << 7)) == length
    value = shift = 0
    i = start + 1
    while i < stop and shift < 70:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return i - start + value == length
        shift += 7
    return False


def unwrap(
    data: bytes, flag: int, encoding: bytes | None, limit: int, sink: ObserverSink
) -> tuple[bytes | None, bool]:
    """The message bytes (decompressed, at most `limit` of them), or None and whether
    a Go peer fails to read the message too."""
    if flag == 0:
        return data, False
    if flag != 1 or encoding is None or encoding == b"identity":
        sink.decode_error("grpc_frame")
        return None, True
    wbits = _DECOMPRESSORS.get(encoding)
    if wbits is None:  # the peer may know it; this build does not
        sink.decode_error("grpc_frame")
        return None, False
    try:
        payload = _decompress(data, wbits, limit)
    except zlib.error:
        sink.decode_error("grpc_frame")
        return None, True
    if payload is None:
        sink.decode_error("grpc_frame")
        return None, False
    return payload, False


def parse(cls: type[Message], payload: bytes, sink: ObserverSink) -> Message | None:
    """The decoded message, or None (counted) when it does not decode as `cls`;
    unknown fields are counted as schema drift."""
    try:
        message = cls.FromString(payload)
    except Exception:
        sink.decode_error(cls.DESCRIPTOR.name)
        return None
    if not payload:
        return message
    if cls in _FLAT:
        # Without nested messages unknown fields can only be at the top: one look,
        # not the two measurements of the general check (every request is flat but Run).
        drifted = len(UnknownFieldSet(message)) > 0
    else:
        size = message.ByteSize()
        # Recursive: drops unknown fields of nested messages too.
        message.DiscardUnknownFields()
        drifted = message.ByteSize() != size
    if drifted:
        sink.unknown_fields(cls.DESCRIPTOR.name)
    return message


def _decompress(data: bytes, wbits: int, limit: int) -> bytes | None:
    """Undo the compression, or None if the result would exceed `limit` bytes."""
    out = bytearray()
    while True:
        inflater = zlib.decompressobj(wbits)
        out += inflater.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            return None
        if not inflater.eof:
            raise zlib.error("truncated compressed message")
        data = inflater.unused_data
        # gzip allows several members back to back; deflate is one stream.
        if not data or wbits != _DECOMPRESSORS[b"gzip"]:
            if data:
                raise zlib.error("trailing bytes after compressed message")
            return bytes(out)


def job_statuses(response: step_pb2.StatusResponse) -> tuple[JobStatus, ...]:
    return tuple(map(_job_status, response.jobs))


def _job_status(status: step_pb2.Status) -> JobStatus:
    error_kind = status.error.kind if status.HasField("error") else None
    duration = None
    if status.HasField("start_time") and status.HasField("end_time"):
        start, end = status.start_time, status.end_time
        nanos = (end.seconds - start.seconds) * 1_000_000_000 + end.nanos - start.nanos
        duration = nanos / 1e9
    return JobStatus(status.id, status.status, error_kind, duration)
