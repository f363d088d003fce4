"""The passive gRPC observer of one connection: bytes in, call events out.

It knows nothing of sockets. The splice hands it a copy of what each side sent; it
walks the HTTP/2 frames (exporter.h2), keeps both HPACK decoders in sync, follows each
stream's gRPC messages (exporter.grpc_messages) and reports every call to an
`events.ObserverSink`: `call_started` at the request HEADERS, exactly one `call_ended`
when the client sees the call end (trailers, a reset, GOAWAY, or the connection's end).

Decisions worth knowing:

- When observation stops on input it cannot parse, the calls open at that moment are
  dropped without `call_ended`: their outcome was not observed and guessing a code
  would forge job failures. The `decode_errors_total{message="http2"}` count says so.
- Observation also stops for good at `connection_lost`: the splice calls it once the
  connection is over, so nothing that arrives later can belong to an open call.
- Everything the observer holds for a connection (partial frames and header blocks,
  partial messages, HPACK tables beyond their default size, open calls) comes out of
  one budget, `max_connection_bytes`: a message that does not fit is skipped and
  counted (`grpc_frame`), a call that does not fit is not followed (`grpc_frame`), and
  framing that does not fit stops observation (`http2`). Forwarding never changes.
- Where the compiled core was built (exporter.native), its C frame walker and HPACK
  decoder do the per-byte work; this module's logic is the same either way. Without
  it, HPACK blocks are decoded by the `hpack` library, through a memo shared by the
  connections of the process (exporter.hpack_cache): GitLab Runner opens a
  connection per job, so the same blocks come again from the same table states, and
  the memo hands back exactly what the library decoded the first times.
- Codes are what a current grpc-go client reports: first response HEADERS that are
  not gRPC's (`:status` other than 200, no gRPC content-type) end the call at once
  with grpc-go's HTTP mapping, a server RST_STREAM maps like http2ErrConvTab, a
  CANCEL (from either side) at or after the deadline is DEADLINE_EXCEEDED.
- A stream above the `last_stream_id` of a GOAWAY the server sent was never processed
  (RFC 9113 section 6.8), also when its HEADERS pass after that GOAWAY: it ends at
  once, refused (UNAVAILABLE, retried by grpc-go), and decides nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable

from hpack import Decoder, HPACKError

from . import hpack_cache, native
from .events import (
    GO_CODE_NAMES,
    UNKNOWN_METHOD,
    CallEnded,
    Code,
    JobStatus,
    Method,
    ObserverSink,
    normalize_code,
)
from .grpc_messages import (
    KEEP_ALL,
    KEEP_LOG,
    KEEP_NONE,
    RPCS,
    Messages,
    Rpc,
    job_statuses,
    parse,
    unwrap,
)
from .h2 import (
    MAX_HEADER_BLOCK,
    SETTINGS_HEADER_TABLE_SIZE,
    Budget,
    DataFeed,
    FrameReader,
    H2Error,
)
from .hpack_cache import BlockCache, CachedDecoder
from .methods import method_lookup, resolve
from .proto import step_pb2

log = logging.getLogger(__name__)

# What stops observation as input it cannot follow; any other exception is a bug.
PROTOCOL_ERRORS = (H2Error, HPACKError)

hpack_cache.memoize_huffman()

# Header blocks repeat from one job's connection to the next (the client's but for
# their grpc-timeout values), so each direction decodes through one memo shared by
# every connection of the process.
CLIENT_BLOCKS = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
SERVER_BLOCKS = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)

# The largest HPACK table a peer may make us keep (the Go encoders never use more
# than 4096 bytes); a bigger table size update stops observation instead.
MAX_HPACK_TABLE = 1 << 20
# What one open call costs its connection's budget: the call and its two message
# assemblers, measured with tracemalloc and rounded up.
CALL_COST = 1024

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

    def __init__(self, method: Method, rpc: Rpc | None, start: float) -> None:
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
        self.req: Messages
        self.resp: Messages


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
        "_goaway_last",
        "_last_client_stream",
        "_max_message",
        "_methods",
        "_now",
        "_package",
        "_request_feeds",
        "_response_feeds",
        "_server",
        "_server_decode",
        "_server_hpack",
        "_sink",
        "_stopped_by",
        "_tolerance",
    )

    def __init__(
        self,
        sink: ObserverSink,
        *,
        package: str | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_connection_bytes: int = 16 * 1024 * 1024,
        deadline_tolerance: float = 0.020,
        client_blocks: BlockCache | None = CLIENT_BLOCKS,
        server_blocks: BlockCache | None = SERVER_BLOCKS,
        core: native.Core | None = native.CORE,
    ) -> None:
        self._sink = sink
        self._max_message = max_message_bytes
        self._budget = budget = Budget(max_connection_bytes)
        self._tolerance = deadline_tolerance
        self._package = package
        self._methods = method_lookup(package)
        self._calls: dict[int, _Call] = {}
        self._request_feeds: dict[int, DataFeed] = {}
        self._response_feeds: dict[int, DataFeed] = {}
        self._last_client_stream = 0
        # The lowest last_stream_id of the server's GOAWAYs (it may only go down).
        self._goaway_last: int | None = None
        self._now = 0.0
        self._failed = False
        self._closed = False
        self._stopped_by: Exception | None = None
        # Each decoder reads the blocks one side's encoder wrote.
        self._client_hpack, self._client_decode = _hpack_decoder(client_blocks, core)
        self._server_hpack, self._server_decode = _hpack_decoder(server_blocks, core)
        reader = FrameReader if core is None else core.frame_reader
        self._client = reader(
            preface=True,
            on_headers=self._request_headers,
            data_target=self._request_feeds.get,
            on_data_end=_ignore_stream,
            on_rst_stream=self._client_reset,
            on_settings=self._client_settings,
            on_push_promise=self._client_hpack_only,
            budget=budget,
        )
        self._server = reader(
            preface=False,
            on_headers=self._response_headers,
            data_target=self._response_feeds.get,
            on_data_end=self._response_data_end,
            on_rst_stream=self._server_reset,
            on_settings=self._server_settings,
            on_goaway=self._server_goaway,
            on_push_promise=self._server_hpack_only,
            budget=budget,
        )

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def stopped_by(self) -> Exception | None:
        """What stopped observation: input that is not HTTP/2 or HPACK it can follow
        (a PROTOCOL_ERRORS instance), or anything else, a bug (swallowed, so that
        forwarding never depends on the observer, and logged as a warning)."""
        return self._stopped_by

    @property
    def held_bytes(self) -> int:
        """What the connection's budget has handed out and not got back."""
        return self._budget.held

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
        try:
            if self._failed:
                return
            self._now = now
            try:
                if self._calls:  # most connections end with none open
                    self._end_all(lambda _stream: True, Code.UNAVAILABLE)
            except Exception as exc:
                self._fail(exc)
        finally:
            # The readers hold this observer's bound methods: dropping them, now that
            # nothing reads again, lets reference counting free the connection's
            # observer at once, not the cyclic GC (about 20 us per job in jobs_c16).
            del self._client, self._server

    def _fail(self, exc: Exception) -> None:
        if isinstance(exc, PROTOCOL_ERRORS):
            log.debug("stopped observing a connection: %s", exc)
        else:  # a bug here or in the sink: worth a traceback
            log.warning("stopped observing a connection", exc_info=exc)
        self._failed = True
        self._stopped_by = exc
        for call in self._calls.values():
            call.req.release()
            call.resp.release()
        self._calls.clear()
        self._request_feeds.clear()
        self._response_feeds.clear()
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
        # One dict, built in C, instead of comparing every name in Python; the last of
        # a repeated name counts, as before.
        fields = dict(headers)
        path = fields.get(b":path")
        timeout = fields.get(b"grpc-timeout")
        if path is None:
            method = UNKNOWN_METHOD
        else:
            method = self._methods.get(path) or resolve(path, self._package)
        last = self._goaway_last
        if last is not None and stream_id > last:
            # The server said it will not process this stream before the client
            # opened it: the client retries it, whatever else comes for it.
            self._sink.call_started(method)
            self._sink.call_ended(_refused(method))
            return
        budget = self._budget
        if budget.left < CALL_COST:  # Budget.take, inline: once per call
            self._sink.decode_error("grpc_frame")  # not followed: over the budget
            return
        budget.left -= CALL_COST
        rpc = RPCS.get(method.name)  # None when not a StepRunner method
        call = _Call(method, rpc, self._now)
        if timeout is not None:
            seconds = _parse_timeout(timeout)
            if seconds is not None:
                call.deadline = self._now + seconds
        call.req_encoding = fields.get(b"grpc-encoding")
        max_bytes = self._max_message
        keep = KEEP_ALL if rpc else KEEP_NONE
        call.req = req = Messages(keep, max_bytes, stream_id, self._request_message, budget)
        if method.name == "FollowLogs":
            keep = KEEP_LOG
        call.resp = resp = Messages(keep, max_bytes, stream_id, self._response_message, budget)
        self._calls[stream_id] = call
        # The frame readers look a stream's DATA target up in these (in C, no Python
        # call per DATA frame); they hold what _calls holds.
        self._request_feeds[stream_id] = req.feed
        self._response_feeds[stream_id] = resp.feed
        self._sink.call_started(method)

    def _client_reset(self, stream_id: int, _error_code: int) -> None:
        call = self._calls.get(stream_id)
        if call is None:
            return
        # The client gave up: at its deadline (DEADLINE_EXCEEDED) or before (CANCELLED).
        code = Code.DEADLINE_EXCEEDED if self._deadline_passed(call) else Code.CANCELLED
        self._end(stream_id, call, code)

    def _client_settings(self, ack: bool, settings: list[tuple[int, int]]) -> None:
        # The client's table size limits the server's encoder.
        _raise_table_limit(self._server_hpack, settings, self._budget)

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
        payload, _fails = unwrap(data, flag, call.req_encoding, self._max_message, self._sink)
        if payload is None:
            return
        message = parse(call.rpc.request, payload, self._sink)
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
        # A loop, not a dict as for requests: response blocks have two or three fields.
        for name, value in headers:
            if name == b"grpc-status":
                grpc_status = value
            elif name == b":status":
                http_status = value
            elif name == b"content-type":
                content_type = value
            elif first and name == b"grpc-encoding":
                call.resp_encoding = value
        code = None
        # The usual gRPC response needs no look at the other spellings.
        if first and (http_status != b"200" or content_type != b"application/grpc"):
            code = _response_code(http_status, content_type)
        if code is None and grpc_status is not None:
            status = _grpc_status_code(grpc_status)
            if status is None:
                code = Code.INTERNAL  # grpc-go: "malformed grpc-status", even before END_STREAM
            elif end_stream:
                code = status
        if code is None and end_stream:
            code = Code.UNKNOWN  # grpc-go's default when the trailers carry no grpc-status
        if code is not None:
            self._end(stream_id, call, code)

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
        _raise_table_limit(self._client_hpack, settings, self._budget)

    def _server_goaway(self, last_stream_id: int, _error_code: int) -> None:
        last = self._goaway_last
        if last is None or last_stream_id < last:
            self._goaway_last = last_stream_id
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
        payload, client_fails = unwrap(
            data, flag, call.resp_encoding, self._max_message, self._sink
        )
        if payload is None:
            call.undecodable = call.undecodable or client_fails
            return
        if not payload and rpc.response is not step_pb2.StatusResponse:
            # Run's, Close's and Cancel's usual answer: an empty message decodes as any
            # type and carries nothing; only a StatusResponse's says something (no jobs).
            return
        message = parse(rpc.response, payload, self._sink)
        if message is None:
            call.undecodable = True
        elif isinstance(message, step_pb2.StatusResponse):
            call.statuses = job_statuses(message)

    # -- shared -------------------------------------------------------------------

    def _deadline_passed(self, call: _Call) -> bool:
        return call.deadline is not None and self._now >= call.deadline - self._tolerance

    def _end(self, stream_id: int, call: _Call, code: int, *, refused: bool = False) -> None:
        del self._calls[stream_id]
        del self._request_feeds[stream_id]
        del self._response_feeds[stream_id]
        call.req.release()
        call.resp.release()
        self._budget.left += CALL_COST
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


_Decode = Callable[[bytes], Iterable[tuple[bytes, bytes]]]


def _hpack_decoder(
    memo: BlockCache | None, core: native.Core | None
) -> tuple[Decoder | CachedDecoder, _Decode]:
    """One direction's decoder (for its table allowance) and its decode(block)."""
    if core is not None:
        # Compiled, it decodes faster than the memo can look a block up.
        compiled = core.decoder(max_header_list_size=MAX_HEADER_BLOCK)
        return compiled, compiled.decode
    if memo is not None:
        decoder = CachedDecoder(memo)
        return decoder, decoder.decode
    # As large as grpc-go accepts, so that metadata a peer takes never stops us.
    plain = Decoder(max_header_list_size=MAX_HEADER_BLOCK)
    return plain, functools.partial(plain.decode, raw=True)


def _raise_table_limit(
    decoder: Decoder | CachedDecoder, settings: list[tuple[int, int]], budget: Budget
) -> None:
    """Apply SETTINGS_HEADER_TABLE_SIZE to the decoder of the other side's encoder.

    The limit only bounds the size updates the encoder may send; the table itself
    changes only by those updates. A lowered limit applies once ACKed, and blocks
    written before that may still use the old one, so the allowance only grows:
    decoding stays exact either way. What it grows by comes out of the budget.
    """
    for identifier, value in settings:
        if identifier == SETTINGS_HEADER_TABLE_SIZE:
            limit = min(value, MAX_HPACK_TABLE)
            allowed = decoder.max_allowed_table_size
            if limit > allowed:
                if not budget.take(limit - allowed):
                    raise H2Error("HPACK table over the connection's memory budget")
                decoder.max_allowed_table_size = limit


def _refused(method: Method) -> CallEnded:
    return CallEnded(
        method=method,
        job_id=None,
        code=Code.UNAVAILABLE,
        duration_seconds=0.0,
        messages_received=0,
        messages_sent=0,
        refused=True,
    )


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


# grpc-status as servers write it: looked up, not parsed, on every call's trailers.
_GRPC_STATUS_CODES: dict[bytes, int] = {b"%d" % code: int(code) for code in GO_CODE_NAMES}


def _grpc_status_code(value: bytes) -> int | None:
    """The code a grpc-go client reports for this grpc-status, or None when it is
    malformed: grpc-go parses it as a 32-bit integer (a longer digit string does not
    parse) and reports a number it does not know as UNKNOWN."""
    code = _GRPC_STATUS_CODES.get(value)
    if code is None and value.isdigit() and len(value) <= 10 and int(value) < 1 << 31:
        code = normalize_code(int(value))
    return code
