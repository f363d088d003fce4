"""The passive gRPC observer of one connection: bytes in, call events out.

It knows nothing of sockets. The splice hands it a copy of what each side sent; it
walks the HTTP/2 frames (exporter.h2), keeps both HPACK decoders in sync, reassembles
gRPC messages and reports every call to an `events.ObserverSink`: `call_started` at
the request HEADERS, exactly one `call_ended` when the client sees the call end
(trailers, a reset, GOAWAY, or the connection's end).

Decisions worth knowing:

- FollowLogs responses (every CI log byte) are not buffered. A Go-marshalled
  FollowLogsResponse is exactly `0a <varint n> <n bytes>`; the first few bytes of each
  message prove that shape, and only a message that does not have it (schema drift,
  garbage, compression) is buffered and decoded like any other.
- When observation stops on input it cannot parse, the calls open at that moment are
  dropped without `call_ended`: their outcome was not observed and guessing a code
  would forge job failures. The `decode_errors_total{message="http2"}` count says so.
- Observation also stops for good at `connection_lost`: the splice calls it once the
  connection is over, so nothing that arrives later can belong to an open call.
- HPACK blocks are decoded by the `hpack` library, through a memo shared by the
  connections of the process (exporter.hpack_cache): GitLab Runner opens a
  connection per job, so the same blocks come again from the same table states, and
  the memo hands back exactly what the library decoded the first times.
- Codes are what a current grpc-go client reports: first response HEADERS that are
  not gRPC's (`:status` other than 200, no gRPC content-type) end the call at once
  with grpc-go's HTTP mapping, a server RST_STREAM maps like http2ErrConvTab, a
  CANCEL (from either side) at or after the deadline is DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import functools
import logging
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from google.protobuf.message import Message
from hpack import Decoder, HPACKError

from .events import (
    STEP_RUNNER_METHODS,
    UNKNOWN_METHOD,
    CallEnded,
    Code,
    JobStatus,
    Method,
    ObserverSink,
    normalize_code,
)
from .h2 import MAX_HEADER_BLOCK, SETTINGS_HEADER_TABLE_SIZE, DataFeed, FrameReader, H2Error
from .hpack_cache import BlockCache, CachedDecoder
from .proto import step_pb2

log = logging.getLogger(__name__)


def _memoize_huffman() -> None:
    """Let hpack decode each short Huffman string once.

    GitLab Runner opens a connection per job, so every job's header blocks start from
    an empty HPACK table and Huffman-code the same few dozen strings (paths, header
    names, user agent) again; hpack decodes them in pure Python every time, which was
    the largest share of the observer's CPU per job. Decoding is a pure function of
    the bytes, so a bounded cache of short strings returns the same results for less.
    """
    import hpack.hpack as impl
    from hpack.huffman_table import decode_huffman as decode

    cached = functools.lru_cache(maxsize=4096)(decode)

    def decode_huffman(huffman_string: bytes | bytearray | memoryview | None) -> bytes:
        if huffman_string is not None and len(huffman_string) <= 128:
            return cached(bytes(huffman_string))
        return decode(huffman_string)

    # hpack's decoder calls the name it imported into its own module.
    impl.decode_huffman = decode_huffman  # type: ignore[attr-defined]


_memoize_huffman()

# Header blocks repeat from one job's connection to the next (the client's but for
# their grpc-timeout values), so each direction decodes through one memo shared by
# every connection of the process.
CLIENT_BLOCKS = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
SERVER_BLOCKS = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)

# The largest HPACK table a peer may make us keep (the Go encoders never use more
# than 4096 bytes); a bigger table size update stops observation instead.
MAX_HPACK_TABLE = 1 << 20

# grpc-go ends a call whose first response HEADERS carry another HTTP status than 200
# with this code, whatever grpc-status says.
_HTTP_CODES: dict[bytes, int] = {
    b"400": Code.INTERNAL,
    b"401": Code.UNAUTHENTICATED,
    b"403": Code.PERMISSION_DENIED,
    b"404": Code.UNIMPLEMENTED,
    b"429": Code.UNAVAILABLE,
    b"502": Code.UNAVAILABLE,
    b"503": Code.UNAVAILABLE,
    b"504": Code.UNAVAILABLE,
}

# grpc-go's mapping of a server's RST_STREAM error code (http2ErrConvTab); codes
# outside it are reported as UNKNOWN.
_REFUSED_STREAM = 0x7
_RST_CODES: dict[int, int] = {
    0x0: Code.INTERNAL,  # NO_ERROR
    0x1: Code.INTERNAL,  # PROTOCOL_ERROR
    0x2: Code.INTERNAL,  # INTERNAL_ERROR
    0x3: Code.RESOURCE_EXHAUSTED,  # FLOW_CONTROL_ERROR
    0x4: Code.INTERNAL,  # SETTINGS_TIMEOUT
    0x5: Code.INTERNAL,  # STREAM_CLOSED
    0x6: Code.INTERNAL,  # FRAME_SIZE_ERROR
    0x7: Code.UNAVAILABLE,  # REFUSED_STREAM
    0x8: Code.CANCELLED,  # CANCEL
    0x9: Code.INTERNAL,  # COMPRESSION_ERROR
    0xA: Code.INTERNAL,  # CONNECT_ERROR
    0xB: Code.RESOURCE_EXHAUSTED,  # ENHANCE_YOUR_CALM
    0xC: Code.PERMISSION_DENIED,  # INADEQUATE_SECURITY
    0xD: Code.INTERNAL,  # HTTP_1_1_REQUIRED
}

_TIMEOUT_UNITS: dict[int, float] = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}

# zlib wbits per grpc-encoding we can undo.
_DECOMPRESSORS: dict[bytes, int] = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


@dataclass(frozen=True, slots=True)
class _Rpc:
    request: type[Message]
    response: type[Message]


_RPCS: dict[str, _Rpc] = {
    "Run": _Rpc(step_pb2.RunRequest, step_pb2.RunResponse),
    "FollowLogs": _Rpc(step_pb2.FollowLogsRequest, step_pb2.FollowLogsResponse),
    "Status": _Rpc(step_pb2.StatusRequest, step_pb2.StatusResponse),
    "Close": _Rpc(step_pb2.CloseRequest, step_pb2.CloseResponse),
    "Cancel": _Rpc(step_pb2.CancelRequest, step_pb2.CancelResponse),
}

# What a message assembler keeps of each message.
KEEP_NONE = 0  # count only
KEEP_ALL = 1  # buffer it (up to the size limit) and hand it on
KEEP_LOG = 2  # FollowLogsResponse: buffer only if it is not the plain one-field shape

_PEEK = 11  # tag byte + the longest varint
_PREFIX = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length

# (stream id, message bytes or None when over the size limit, compressed flag). By
# stream id, not by call, so that a finished call is not kept alive by its buffers.
OnMessage = Callable[[int, bytes | None, int], None]


class _Budget:
    """Bytes one connection's observer may hold in partly received messages, across all
    its streams: without it, N open streams could each hold max_message_bytes."""

    __slots__ = ("left",)

    def __init__(self, total: int) -> None:
        self.left = total


class _Messages:
    """Reassembles the length-prefixed gRPC messages of one direction of one stream."""

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
        self, keep: int, max_bytes: int, stream_id: int, on_message: OnMessage, budget: _Budget
    ) -> None:
        self.keep = keep
        self._budget = budget
        self._reserved = 0
        self._stream_id = stream_id
        self.count = 0
        self._max = max_bytes
        self._on_message = on_message
        self._hdr = bytearray()
        self._left = -1  # body bytes still to come; -1 while reading a length prefix
        self._length = 0
        self._flag = 0
        self._store: bytearray | None = None
        self._peek = 0  # KEEP_LOG: bytes to look at before deciding to keep the message
        self._oversize = False

    def feed(self, mv: memoryview) -> None:
        pos, end = 0, len(mv)
        while pos < end:
            left = self._left
            if left < 0:
                hdr = self._hdr
                if not hdr and end - pos >= 5:
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
                            or (length and not _plain_bytes_field(mv, pos, stop, length))
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
                take = min(5 - len(hdr), end - pos)
                hdr += mv[pos : pos + take]
                pos += take
                if len(hdr) == 5:
                    self._begin(hdr[0], int.from_bytes(hdr[1:5]))
                    hdr.clear()
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
        return not length or _plain_bytes_field(mv, start, stop, length)

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
        if _plain_bytes_field(store, 0, len(store), self._length):
            self._store = None  # a well-formed log message: nothing to decode
        elif self._length > self._max or not self._reserve(self._length):
            self._store = None
            self._oversize = True
        else:
            store += piece[want:]

    def _reserve(self, length: int) -> bool:
        """Take `length` bytes of the connection's budget for the message being stored."""
        budget = self._budget
        if budget.left < length:
            return False
        budget.left -= length
        self._reserved = length
        return True

    def release(self) -> None:
        """Give back what a partly stored message holds (its stream ended or it did)."""
        if self._reserved:
            self._budget.left += self._reserved
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


def _plain_bytes_field(buf: bytearray | memoryview, start: int, stop: int, length: int) -> bool:
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


class _Call:
    """One HTTP/2 stream carrying a gRPC call."""

    __slots__ = (
        "deadline",
        "job_id",
        "method",
        "req",
        "req_encoding",
        "resp",
        "resp_encoding",
        "responded",
        "rpc",
        "start",
        "statuses",
        "undecodable",
    )

    def __init__(self, method: Method, rpc: _Rpc | None, start: float) -> None:
        self.method = method
        self.rpc = rpc
        self.start = start
        self.deadline: float | None = None
        self.job_id: str | None = None
        self.req_encoding: bytes | None = None
        self.resp_encoding: bytes | None = None
        self.responded = False  # the first response HEADERS was seen
        self.statuses: tuple[JobStatus, ...] = ()
        self.undecodable = False
        self.req: _Messages
        self.resp: _Messages


class ConnectionObserver:
    """Observes one client connection. Never raises out of its three entry points."""

    __slots__ = (
        "_budget",
        "_calls",
        "_client",
        "_client_decode",
        "_client_hpack",
        "_closed",
        "_failed",
        "_last_client_stream",
        "_max_message",
        "_methods",
        "_now",
        "_server",
        "_server_decode",
        "_server_hpack",
        "_sink",
        "_tolerance",
    )

    def __init__(
        self,
        sink: ObserverSink,
        *,
        package: str = "proto",
        max_message_bytes: int = 4 * 1024 * 1024,
        max_connection_bytes: int = 16 * 1024 * 1024,
        deadline_tolerance: float = 0.020,
        client_blocks: BlockCache | None = CLIENT_BLOCKS,
        server_blocks: BlockCache | None = SERVER_BLOCKS,
    ) -> None:
        self._sink = sink
        self._max_message = max_message_bytes
        self._budget = _Budget(max_connection_bytes)
        self._tolerance = deadline_tolerance
        self._methods = _service_methods(package)
        self._calls: dict[int, _Call] = {}
        self._last_client_stream = 0
        self._now = 0.0
        self._failed = False
        self._closed = False
        # Each decoder reads the blocks one side's encoder wrote.
        self._client_hpack, self._client_decode = _hpack_decoder(client_blocks)
        self._server_hpack, self._server_decode = _hpack_decoder(server_blocks)
        self._client = FrameReader(
            preface=True,
            on_headers=self._request_headers,
            data_target=self._request_data,
            on_data_end=_ignore_stream,
            on_rst_stream=self._client_reset,
            on_settings=self._client_settings,
            on_push_promise=self._client_hpack_only,
        )
        self._server = FrameReader(
            preface=False,
            on_headers=self._response_headers,
            data_target=self._response_data,
            on_data_end=self._response_data_end,
            on_rst_stream=self._server_reset,
            on_settings=self._server_settings,
            on_goaway=self._server_goaway,
            on_push_promise=self._server_hpack_only,
        )

    @property
    def failed(self) -> bool:
        return self._failed

    # -- entry points -------------------------------------------------------------

    def client_data(self, data: bytes, now: float) -> None:
        if self._failed or self._closed:
            return
        self._now = now
        try:
            self._client.feed(data)
        except Exception as exc:
            self._fail(exc)

    def server_data(self, data: bytes, now: float) -> None:
        if self._failed or self._closed:
            return
        self._now = now
        try:
            self._server.feed(data)
        except Exception as exc:
            self._fail(exc)

    def connection_lost(self, now: float) -> None:
        if self._closed:
            return
        self._closed = True
        if self._failed:
            return
        self._now = now
        try:
            self._end_all(lambda _stream: True, Code.UNAVAILABLE)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if isinstance(exc, H2Error | HPACKError):
            log.debug("stopped observing a connection: %s", exc)
        else:  # a bug here or in the sink: worth a traceback
            log.warning("stopped observing a connection", exc_info=exc)
        self._failed = True
        self._calls.clear()
        try:
            self._sink.decode_error("http2")
        except Exception:
            log.exception("observer sink failed")

    # -- client to server ---------------------------------------------------------

    def _request_headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        headers = self._client_decode(block)
        # Only a new client stream starts a call; trailers or a reused id do not.
        if stream_id <= self._last_client_stream or not stream_id & 1:
            return
        self._last_client_stream = stream_id
        path = timeout = encoding = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
        method = self._methods.get(path, UNKNOWN_METHOD) if path else UNKNOWN_METHOD
        rpc = _RPCS[method.name] if method.known else None
        call = _Call(method, rpc, self._now)
        if timeout is not None:
            seconds = _parse_timeout(timeout)
            if seconds is not None:
                call.deadline = self._now + seconds
        call.req_encoding = encoding
        max_bytes = self._max_message
        keep = KEEP_ALL if rpc else KEEP_NONE
        budget = self._budget
        call.req = _Messages(keep, max_bytes, stream_id, self._request_message, budget)
        if method.name == "FollowLogs":
            keep = KEEP_LOG
        call.resp = _Messages(keep, max_bytes, stream_id, self._response_message, budget)
        self._calls[stream_id] = call
        self._sink.call_started(method)

    def _request_data(self, stream_id: int) -> DataFeed | None:
        call = self._calls.get(stream_id)
        return call.req.feed if call is not None else None

    def _client_reset(self, stream_id: int, _error_code: int) -> None:
        call = self._calls.get(stream_id)
        if call is None:
            return
        # The client gave up: at its deadline (DEADLINE_EXCEEDED) or before (CANCELLED).
        code = Code.DEADLINE_EXCEEDED if self._deadline_passed(call) else Code.CANCELLED
        self._end(stream_id, call, code)

    def _client_settings(self, ack: bool, settings: list[tuple[int, int]]) -> None:
        # The client's table size limits the server's encoder.
        _raise_table_limit(self._server_hpack, settings)

    def _client_hpack_only(self, block: bytes) -> None:
        self._client_decode(block)

    def _request_message(self, stream_id: int, data: bytes | None, flag: int) -> None:
        call = self._calls.get(stream_id)
        if call is None or call.rpc is None:
            return
        call.req.keep = KEEP_NONE  # only the first request names the job
        if data is None:
            self._sink.decode_error("grpc_frame")
            return
        payload, _client_fails = self._unwrap(data, flag, call.req_encoding)
        if payload is None:
            return
        message = self._parse(call.rpc.request, payload)
        if message is not None:
            call.job_id = getattr(message, "id", None)

    # -- server to client ---------------------------------------------------------

    def _response_headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        headers = self._server_decode(block)
        call = self._calls.get(stream_id)
        if call is None:
            return
        first = not call.responded
        call.responded = True
        grpc_status = http_status = content_type = None
        for name, value in headers:
            if name == b"grpc-status":
                grpc_status = value
            elif name == b":status":
                http_status = value
            elif name == b"content-type":
                content_type = value
            elif first and name == b"grpc-encoding":
                call.resp_encoding = value
        code = _response_code(http_status, content_type) if first else None
        if code is None and grpc_status is not None and not _valid_grpc_status(grpc_status):
            code = Code.INTERNAL  # grpc-go: "malformed grpc-status", even before END_STREAM
        if code is None and end_stream:
            # grpc-go's default when the trailers carry no grpc-status is UNKNOWN.
            code = normalize_code(int(grpc_status)) if grpc_status else Code.UNKNOWN
        if code is not None:
            self._end(stream_id, call, code)

    def _response_data(self, stream_id: int) -> DataFeed | None:
        call = self._calls.get(stream_id)
        return call.resp.feed if call is not None else None

    def _response_data_end(self, stream_id: int) -> None:
        call = self._calls.get(stream_id)
        if call is not None:
            # grpc-go: "server closed the stream without sending trailers".
            self._end(stream_id, call, Code.INTERNAL)

    def _server_reset(self, stream_id: int, error_code: int) -> None:
        call = self._calls.get(stream_id)
        if call is None:
            return
        if error_code == _REFUSED_STREAM:
            self._end(stream_id, call, Code.UNAVAILABLE, refused=True)
            return
        code = _RST_CODES.get(error_code, Code.UNKNOWN)
        # grpc-go reports a CANCEL that arrives after its deadline as DEADLINE_EXCEEDED.
        if code == Code.CANCELLED and self._deadline_passed(call):
            code = Code.DEADLINE_EXCEEDED
        self._end(stream_id, call, code)

    def _server_settings(self, ack: bool, settings: list[tuple[int, int]]) -> None:
        _raise_table_limit(self._client_hpack, settings)

    def _server_goaway(self, last_stream_id: int, _error_code: int) -> None:
        # Streams the server never processed: UNAVAILABLE on the wire, and retried
        # transparently by a grpc-go client.
        self._end_all(lambda stream: stream > last_stream_id, Code.UNAVAILABLE, refused=True)

    def _server_hpack_only(self, block: bytes) -> None:
        self._server_decode(block)

    def _response_message(self, stream_id: int, data: bytes | None, flag: int) -> None:
        call = self._calls.get(stream_id)
        if call is None or call.rpc is None:
            return
        rpc = call.rpc
        if data is None:
            self._sink.decode_error("grpc_frame")
            return
        payload, client_fails = self._unwrap(data, flag, call.resp_encoding)
        if payload is None:
            call.undecodable = call.undecodable or client_fails
            return
        message = self._parse(rpc.response, payload)
        if message is None:
            call.undecodable = True
        elif isinstance(message, step_pb2.StatusResponse):
            call.statuses = tuple(_job_status(status) for status in message.jobs)

    # -- shared -------------------------------------------------------------------

    def _unwrap(self, data: bytes, flag: int, encoding: bytes | None) -> tuple[bytes | None, bool]:
        """The message bytes, or None and whether a Go peer fails to read it too."""
        if flag == 0:
            return data, False
        if flag != 1 or encoding is None or encoding == b"identity":
            self._sink.decode_error("grpc_frame")
            return None, True
        wbits = _DECOMPRESSORS.get(encoding)
        if wbits is None:  # the peer may know it; this build does not
            self._sink.decode_error("grpc_frame")
            return None, False
        try:
            payload = _decompress(data, wbits, self._max_message)
        except zlib.error:
            self._sink.decode_error("grpc_frame")
            return None, True
        if payload is None:
            self._sink.decode_error("grpc_frame")
            return None, False
        return payload, False

    def _parse(self, cls: type[Message], payload: bytes) -> Message | None:
        message = cls()
        name = cls.DESCRIPTOR.name
        try:
            message.ParseFromString(payload)
        except Exception:
            self._sink.decode_error(name)
            return None
        if payload:
            size = message.ByteSize()
            # Recursive: drops unknown fields of nested messages too.
            message.DiscardUnknownFields()
            if message.ByteSize() != size:
                self._sink.unknown_fields(name)
        return message

    def _deadline_passed(self, call: _Call) -> bool:
        return call.deadline is not None and self._now >= call.deadline - self._tolerance

    def _end(self, stream_id: int, call: _Call, code: int, *, refused: bool = False) -> None:
        del self._calls[stream_id]
        call.req.release()
        call.resp.release()
        self._sink.call_ended(
            CallEnded(
                method=call.method,
                job_id=call.job_id,
                code=int(code),
                duration_seconds=self._now - call.start,
                messages_received=call.req.count,
                messages_sent=call.resp.count,
                statuses=call.statuses,
                response_undecodable=call.undecodable,
                refused=refused,
            )
        )

    def _end_all(self, which: Callable[[int], bool], code: int, *, refused: bool = False) -> None:
        for stream_id in sorted(s for s in self._calls if which(s)):
            self._end(stream_id, self._calls[stream_id], code, refused=refused)


@functools.lru_cache(maxsize=8)
def _service_methods(package: str) -> dict[bytes, Method]:
    """The StepRunner methods by request path: built once, shared read-only by
    every connection."""
    service = f"{package}.StepRunner"
    return {
        f"/{service}/{name}".encode(): Method(service, name, grpc_type)
        for name, grpc_type in STEP_RUNNER_METHODS.items()
    }


_Decode = Callable[[bytes], Iterable[tuple[bytes, bytes]]]


def _hpack_decoder(memo: BlockCache | None) -> tuple[Decoder | CachedDecoder, _Decode]:
    """One direction's decoder (for its table allowance) and its decode(block)."""
    if memo is not None:
        decoder = CachedDecoder(memo)
        return decoder, decoder.decode
    # As large as grpc-go accepts, so that metadata a peer takes never stops us.
    plain = Decoder(max_header_list_size=MAX_HEADER_BLOCK)
    return plain, functools.partial(plain.decode, raw=True)


def _raise_table_limit(decoder: Decoder | CachedDecoder, settings: list[tuple[int, int]]) -> None:
    """Apply SETTINGS_HEADER_TABLE_SIZE to the decoder of the other side's encoder.

    The limit only bounds the size updates the encoder may send; the table itself
    changes only by those updates. A lowered limit applies once ACKed, and blocks
    written before that may still use the old one, so the allowance only grows:
    decoding stays exact either way.
    """
    for identifier, value in settings:
        if identifier == SETTINGS_HEADER_TABLE_SIZE:
            limit = min(value, MAX_HPACK_TABLE)
            decoder.max_allowed_table_size = max(decoder.max_allowed_table_size, limit)


def _ignore_stream(_stream_id: int) -> None:
    return None


def _parse_timeout(value: bytes) -> float | None:
    digits = value[:-1]
    unit = _TIMEOUT_UNITS.get(value[-1]) if value else None
    if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def _response_code(http_status: bytes | None, content_type: bytes | None) -> int | None:
    """The code grpc-go ends a call with when the response HEADERS are not gRPC's, or
    None when they are: it checks `:status` and `content-type` before anything else."""
    if http_status is None:
        return Code.INTERNAL  # "malformed header: missing HTTP status"
    if http_status != b"200":
        if not http_status.isdigit():
            return Code.INTERNAL  # "malformed http-status"
        return _HTTP_CODES.get(http_status, Code.UNKNOWN)
    if content_type is None or not _is_grpc_content_type(content_type):
        return Code.UNKNOWN  # HTTP 200 has no entry in grpc-go's table
    return None


def _is_grpc_content_type(value: bytes) -> bool:
    return value == b"application/grpc" or value[:17] in (
        b"application/grpc+",
        b"application/grpc;",
    )


def _valid_grpc_status(value: bytes) -> bool:
    # grpc-go parses it as a 32-bit integer; a longer digit string does not parse.
    return value.isdigit() and len(value) <= 10 and int(value) < 1 << 31


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


def _job_status(status: step_pb2.Status) -> JobStatus:
    error_kind = status.error.kind if status.HasField("error") else None
    duration = None
    if status.HasField("start_time") and status.HasField("end_time"):
        start, end = status.start_time, status.end_time
        nanos = (end.seconds - start.seconds) * 1_000_000_000 + end.nanos - start.nanos
        duration = nanos / 1e9
    return JobStatus(status.id, status.status, error_kind, duration)
