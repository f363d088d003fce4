"""Hand-built HTTP/2 for what the recorded captures lack: padding, priority,
CONTINUATION, table size changes, GOAWAY, resets, odd trailers, bad messages and
bytes that are not HTTP/2 at all."""

from __future__ import annotations

import gzip
import itertools
import logging
import struct
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from exporter.accounting import Accounting
from exporter.events import UNKNOWN_METHOD, CallEnded, Code, Method
from exporter.h2 import PREFACE
from exporter.metrics import Metrics
from exporter.observer import PROTOCOL_ERRORS, ConnectionObserver
from exporter.proto import step_pb2
from tests.unit.twin import TwinObserver
from tests.wire import frame, grpc_message

from .captures import RecordingSink

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
CANCEL, REFUSED_STREAM = 0x8, 0x7

Headers = Sequence[tuple[str, str]]


def settings_frame(*pairs: tuple[int, int], ack: bool = False) -> bytes:
    return frame(SETTINGS, 1 if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def padded(payload: bytes, pad: int) -> bytes:
    return bytes([pad]) + payload + b"\0" * pad


def request_headers(method: str, timeout: str | None = None, **extra: str) -> list[tuple[str, str]]:
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method if method.startswith("/") else f"/proto.StepRunner/{method}"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if timeout is not None:
        headers.append(("grpc-timeout", timeout))
    headers.extend((k.replace("_", "-"), v) for k, v in extra.items())
    return headers


RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]


def trailers(code: int | str) -> list[tuple[str, str]]:
    return [("grpc-status", str(code)), ("grpc-message", "")]


class Wire:
    """Both ends of one connection, writing into an observer."""

    def __init__(self, **options: Any) -> None:
        self.sink = RecordingSink()
        self.observer: TwinObserver | ConnectionObserver = TwinObserver(self.sink, **options)
        self.client_hpack = hpack.Encoder()
        self.server_hpack = hpack.Encoder()
        self.now = 100.0

    def client(self, *chunks: bytes, at: float | None = None) -> None:
        self._at(at)
        for chunk in chunks:
            self.observer.client_data(chunk, self.now)

    def server(self, *chunks: bytes, at: float | None = None) -> None:
        self._at(at)
        for chunk in chunks:
            self.observer.server_data(chunk, self.now)

    def _at(self, at: float | None) -> None:
        if at is not None:
            self.now = at
        self.sink.now = self.now

    def start(self) -> Wire:
        self.client(PREFACE + settings_frame())
        self.server(settings_frame(), settings_frame(ack=True))
        self.client(settings_frame(ack=True))
        return self

    def request_block(self, headers: Headers) -> bytes:
        return bytes(self.client_hpack.encode(headers))

    def response_block(self, headers: Headers) -> bytes:
        return bytes(self.server_hpack.encode(headers))

    def request(self, stream: int, method: str, message: bytes, timeout: str | None = None) -> None:
        block = self.request_block(request_headers(method, timeout))
        self.client(
            frame(HEADERS, END_HEADERS, stream, block),
            frame(DATA, END_STREAM, stream, grpc_message(message)),
        )

    def respond(self, stream: int, *messages: bytes, code: int = 0) -> None:
        self.server(frame(HEADERS, END_HEADERS, stream, self.response_block(RESPONSE)))
        for message in messages:
            self.server(frame(DATA, 0, stream, grpc_message(message)))
        self.trailers(stream, trailers(code))

    def trailers(self, stream: int, headers: Headers) -> None:
        self.server(frame(HEADERS, END_HEADERS | END_STREAM, stream, self.response_block(headers)))

    def ended(self) -> list[CallEnded]:
        return self.sink.calls


def run_request(job_id: str = "job-1") -> bytes:
    return step_pb2.RunRequest(
        id=job_id, work_dir="/builds/x", steps="- name: a"
    ).SerializeToString()


def status_response(job_id: str = "job-1", state: int = 2, kind: int | None = None) -> bytes:
    # Any number, known to the schema or not: the generated types only admit its enums.
    status = step_pb2.Status(id=job_id, status=cast(Any, state))
    status.start_time.FromNanoseconds(1_000_000_000)
    status.end_time.FromNanoseconds(3_250_000_001)
    if kind is not None:
        status.error.kind = cast(Any, kind)
    return step_pb2.StatusResponse(jobs=[status]).SerializeToString()


def status_request(job_id: str = "job-1") -> bytes:
    return step_pb2.StatusRequest(id=job_id).SerializeToString()


def only(wire: Wire) -> CallEnded:
    (call,) = wire.ended()
    return call


# -- the basics ---------------------------------------------------------------------


def test_a_unary_call_reports_start_and_end_once() -> None:
    wire = Wire().start()
    wire.request(1, "Status", status_request(), timeout="10S")
    assert wire.sink.started == [Method("proto.StepRunner", "Status", "unary")]
    assert not wire.ended()
    wire.now += 0.25
    wire.respond(1, status_response(kind=1, state=3))
    call = only(wire)
    assert call.method.name == "Status"
    assert call.job_id == "job-1"
    assert call.code == Code.OK
    assert call.duration_seconds == pytest.approx(0.25)
    assert (call.messages_received, call.messages_sent) == (1, 1)
    (status,) = call.statuses
    assert (status.job_id, status.state, status.error_kind) == ("job-1", 3, 1)
    assert status.duration_seconds == pytest.approx(2.250000001, abs=1e-12)
    assert not call.response_undecodable
    assert not wire.sink.decode_errors and not wire.sink.unknown and not wire.observer.failed


def test_status_without_error_or_times() -> None:
    wire = Wire().start()
    wire.request(1, "Status", status_request())
    body = step_pb2.StatusResponse(
        jobs=[step_pb2.Status(id="job-1", status="running")]
    ).SerializeToString()
    wire.respond(1, body)
    (status,) = only(wire).statuses
    assert (status.state, status.error_kind, status.duration_seconds) == (1, None, None)


def test_an_error_kind_zero_is_present_not_absent() -> None:
    wire = Wire().start()
    wire.request(1, "Status", status_request())
    wire.respond(1, status_response(state=3, kind=0))
    (status,) = only(wire).statuses
    assert status.error_kind == 0


def test_list_all_status_has_an_empty_job_id() -> None:
    wire = Wire().start()
    wire.request(1, "Status", b"")
    wire.respond(1, status_response("a"))
    assert only(wire).job_id == ""


# -- frame layer ---------------------------------------------------------------------


def test_padded_and_priority_headers_and_padded_data() -> None:
    wire = Wire().start()
    block = wire.request_block(request_headers("Run"))
    priority = struct.pack(">IB", 0x80000000 | 0, 15)
    wire.client(
        frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, padded(priority + block, 7))
    )
    message = grpc_message(run_request())
    wire.client(frame(DATA, PADDED, 1, padded(message[:10], 3)))
    wire.client(frame(DATA, PADDED | END_STREAM, 1, padded(message[10:], 0)))
    wire.server(frame(HEADERS, END_HEADERS | PADDED, 1, padded(wire.response_block(RESPONSE), 200)))
    wire.server(frame(DATA, PADDED, 1, padded(grpc_message(b""), 1)))
    wire.server(
        frame(
            HEADERS,
            END_HEADERS | END_STREAM | PRIORITY_FLAG,
            1,
            priority + wire.response_block(trailers(0)),
        )
    )
    call = only(wire)
    assert (call.job_id, call.code, call.messages_received, call.messages_sent) == (
        "job-1",
        0,
        1,
        1,
    )
    assert not wire.observer.failed


def test_continuation_frames_complete_a_header_block() -> None:
    wire = Wire().start()
    block = wire.request_block(request_headers("Run", x_big="v" * 3000))
    wire.client(
        frame(HEADERS, 0, 1, block[:5]),
        frame(CONTINUATION, 0, 1, block[5:1000]),
        frame(CONTINUATION, END_HEADERS, 1, block[1000:]),
        frame(DATA, END_STREAM, 1, grpc_message(run_request())),
    )
    assert wire.sink.started == [Method("proto.StepRunner", "Run", "unary")]
    tail = wire.response_block(trailers(13))
    wire.server(frame(HEADERS, END_HEADERS, 1, wire.response_block(RESPONSE)))
    wire.server(
        frame(HEADERS, END_STREAM, 1, tail[:2]), frame(CONTINUATION, END_HEADERS, 1, tail[2:])
    )
    call = only(wire)
    assert (call.job_id, call.code) == ("job-1", Code.INTERNAL)


@pytest.mark.parametrize(
    "interloper",
    [
        frame(PING, 0, 0, b"\0" * 8),
        frame(CONTINUATION, END_HEADERS, 3, b"\x82"),
        frame(DATA, 0, 1, b"x"),
    ],
)
def test_a_header_block_must_not_be_interrupted(interloper: bytes) -> None:
    wire = Wire().start()
    block = wire.request_block(request_headers("Run"))
    wire.client(frame(HEADERS, 0, 1, block[:3]), interloper)
    assert wire.observer.failed
    assert wire.sink.decode_errors == Counter({"http2": 1})


def test_client_header_table_size_lets_the_server_encoder_grow() -> None:
    wire = Wire()
    wire.client(PREFACE + settings_frame((1, 8192)))
    wire.server(settings_frame(), settings_frame(ack=True))
    wire.server_hpack.header_table_size = 8192  # emits a dynamic table size update
    wire.request(1, "Run", run_request())
    big = [(f"x-meta-{i}", "v" * 900) for i in range(8)]  # ~7.5 KiB: only fits in 8192
    wire.server(frame(HEADERS, END_HEADERS, 1, wire.response_block([*RESPONSE, *big])))
    wire.trailers(1, trailers(0))
    wire.request(3, "Run", run_request("job-2"))
    # All indexed from the dynamic table: only decodable if the table really grew.
    wire.server(frame(HEADERS, END_HEADERS, 3, wire.response_block([*RESPONSE, *big])))
    wire.trailers(3, trailers(0))
    assert [(c.job_id, c.code) for c in wire.ended()] == [("job-1", 0), ("job-2", 0)]
    assert not wire.observer.failed


def test_a_table_size_update_beyond_the_settings_stops_observation() -> None:
    wire = Wire().start()
    wire.server_hpack.header_table_size = 8192  # never allowed by the client
    wire.request(1, "Run", run_request())
    wire.respond(1, b"")
    assert wire.observer.failed
    assert wire.sink.decode_errors == Counter({"http2": 1})
    assert not wire.ended()


def test_server_header_table_size_applies_to_the_client_encoder_and_shrinks() -> None:
    wire = Wire()
    wire.client(PREFACE + settings_frame())
    wire.server(settings_frame((1, 0)), settings_frame(ack=True))
    wire.client(settings_frame(ack=True))
    wire.client_hpack.header_table_size = 0
    wire.server_hpack.header_table_size = 100  # shrinking is always allowed
    for stream in (1, 3):
        wire.request(stream, "Close", step_pb2.CloseRequest(id=f"j{stream}").SerializeToString())
        wire.respond(stream, b"")
    assert [c.job_id for c in wire.ended()] == ["j1", "j3"]
    assert not wire.observer.failed


def test_push_promise_blocks_keep_the_table_in_sync() -> None:
    wire = Wire().start()
    wire.request(1, "Run", run_request())
    wire.server(frame(HEADERS, END_HEADERS, 1, wire.response_block(RESPONSE)))
    # The promise puts grpc-status 0 in the server's table; the trailers only index it.
    pushed = wire.response_block([(":method", "GET"), (":path", "/p"), ("grpc-status", "0")])
    wire.server(frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">I", 2) + pushed))
    wire.trailers(1, trailers(0))
    assert only(wire).code == Code.OK
    assert not wire.observer.failed


def test_control_and_unknown_frames_are_walked_over() -> None:
    wire = Wire().start()
    wire.client(frame(0xFA, 0xFF, 1, b"?" * 70000), frame(PING, 0, 0, b"12345678"))
    wire.request(1, "Run", run_request())
    wire.client(frame(WINDOW_UPDATE, 0, 0, b"\0\0\x10\0"), frame(PRIORITY, 0, 1, b"\0\0\0\0\x10"))
    wire.server(
        frame(WINDOW_UPDATE, 0, 1, b"\0\0\x10\0"),
        frame(0x20, 0, 0, b""),
        frame(PING, 1, 0, b"12345678"),
    )
    wire.respond(1, b"")
    assert only(wire).job_id == "job-1"
    assert not wire.observer.failed


# -- how calls end -------------------------------------------------------------------


def test_goaway_ends_the_streams_the_server_never_processed() -> None:
    wire = Wire().start()
    for stream in (1, 3, 5):
        wire.request(stream, "Run", run_request(f"job-{stream}"))
    wire.server(frame(GOAWAY, 0, 0, struct.pack(">II", 3, 0)))
    assert [(c.job_id, c.code, c.refused) for c in wire.ended()] == [
        ("job-5", Code.UNAVAILABLE, True)  # a grpc-go client retries it transparently
    ]
    wire.respond(1, b"")
    wire.respond(3, b"", code=5)
    wire.server(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
    wire.observer.connection_lost(wire.now)
    assert [(c.job_id, c.code) for c in wire.ended()] == [
        ("job-5", Code.UNAVAILABLE),
        ("job-1", Code.OK),
        ("job-3", Code.NOT_FOUND),
    ]


def goaway(last_stream_id: int, error_code: int = 0) -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, error_code))


ENHANCE_YOUR_CALM = 0xB


@pytest.mark.parametrize("goaway_first", [True, False])
def test_headers_that_pass_after_the_servers_goaway_are_refused(goaway_first: bool) -> None:
    """grpc-go may send one GOAWAY (ENHANCE_YOUR_CALM, or without the grace ping)
    while the client is writing HEADERS for a new stream: the splice can forward those
    HEADERS after the GOAWAY. The server never processes that stream and the client
    retries it, in either order of the two on the splice."""
    wire = Wire().start()
    wire.request(1, "Run", run_request("job-1"))
    if goaway_first:
        wire.server(goaway(1, ENHANCE_YOUR_CALM))
        wire.request(3, "Status", status_request("job-3"))
    else:
        wire.request(3, "Status", status_request("job-3"))
        wire.server(goaway(1, ENHANCE_YOUR_CALM))
    wire.request(5, "Close", status_request("job-3"))  # later still: refused as well
    assert [(c.method.name, c.code, c.refused) for c in wire.ended()] == [
        ("Status", Code.UNAVAILABLE, True),
        ("Close", Code.UNAVAILABLE, True),
    ]
    # A lower last_stream_id in a later GOAWAY refuses more; a higher one none back.
    wire.server(goaway(3))
    wire.respond(1, b"")
    wire.observer.connection_lost(wire.now + 1)
    assert [(c.method.name, c.code, c.refused) for c in wire.ended()][2:] == [
        ("Run", Code.OK, False)
    ]
    assert len(wire.sink.started) == 3
    assert not wire.observer.failed


def test_the_connections_end_closes_processed_streams_only_after_a_goaway() -> None:
    wire = Wire().start()
    wire.request(1, "FollowLogs", step_pb2.FollowLogsRequest(id="j").SerializeToString())
    wire.server(goaway(1))
    wire.request(3, "Status", status_request("j"))
    wire.observer.connection_lost(wire.now + 1)
    assert [(c.method.name, c.code, c.refused) for c in wire.ended()] == [
        ("Status", Code.UNAVAILABLE, True),
        ("FollowLogs", Code.UNAVAILABLE, False),  # processed, then the connection died
    ]


def test_a_refused_stream_after_a_goaway_is_counted_and_decides_nothing() -> None:
    registry = CollectorRegistry()
    accounting = Accounting(Metrics(registry), upstream="u")
    wire = Wire()
    wire.observer = ConnectionObserver(accounting)
    wire.start()
    wire.server(goaway(0))
    wire.request(1, "Status", status_request("job-9"))
    wire.server(frame(HEADERS, END_HEADERS | END_STREAM, 1, wire.response_block(trailers(14))))
    wire.observer.connection_lost(wire.now)
    labels = {"grpc_type": "unary", "grpc_service": "proto.StepRunner", "grpc_method": "Status"}
    handled = registry.get_sample_value(
        "grpc_server_handled_total", {**labels, "grpc_code": "Unavailable"}
    )
    assert handled == 1
    for result in ("success", "failed", "cancelled"):
        assert registry.get_sample_value("step_runner_jobs_total", {"result": result}) == 0
    assert len(accounting.tracker) == 0


@pytest.mark.parametrize(
    ("error_code", "expected"),
    [
        (0x0, Code.INTERNAL),  # NO_ERROR
        (0x1, Code.INTERNAL),  # PROTOCOL_ERROR
        (0x2, Code.INTERNAL),
        (0x3, Code.RESOURCE_EXHAUSTED),  # FLOW_CONTROL_ERROR, as grpc-go maps it
        (REFUSED_STREAM, Code.UNAVAILABLE),
        (CANCEL, Code.CANCELLED),
        (0xB, Code.RESOURCE_EXHAUSTED),  # ENHANCE_YOUR_CALM
        (0xC, Code.PERMISSION_DENIED),  # INADEQUATE_SECURITY
        (0xD, Code.INTERNAL),
        (0x99, Code.UNKNOWN),
    ],
)
def test_server_reset_codes(error_code: int, expected: Code) -> None:
    wire = Wire().start()
    wire.request(1, "Run", run_request(), timeout="1S")
    wire.server(frame(RST_STREAM, 0, 1, struct.pack(">I", error_code)))
    ended = only(wire)
    assert ended.code == expected
    assert ended.refused == (error_code == REFUSED_STREAM)


def test_server_cancel_after_the_deadline_is_deadline_exceeded() -> None:
    wire = Wire().start()
    wire.request(1, "Run", run_request(), timeout="1S")
    wire.server(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)), at=wire.now + 1.0)
    assert only(wire).code == Code.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("timeout", "after", "tolerance", "expected"),
    [
        (None, 1000.0, 0.020, Code.CANCELLED),
        ("100m", 0.0, 0.020, Code.CANCELLED),
        ("100m", 0.079, 0.020, Code.CANCELLED),  # just before the tolerance window
        ("100m", 0.0805, 0.020, Code.DEADLINE_EXCEEDED),  # inside it
        ("1S", 0.7499, 0.25, Code.CANCELLED),
        ("1S", 0.75, 0.25, Code.DEADLINE_EXCEEDED),  # exactly deadline - tolerance
        ("125m", 0.1249, 0.0, Code.CANCELLED),
        ("125m", 0.125, 0.0, Code.DEADLINE_EXCEEDED),
        ("100m", 5.0, 0.020, Code.DEADLINE_EXCEEDED),
        ("1H", 3599.0, 0.020, Code.CANCELLED),
        ("1H", 3600.0, 0.020, Code.DEADLINE_EXCEEDED),
        ("2M", 120.0, 0.0, Code.DEADLINE_EXCEEDED),
        ("2M", 119.9, 0.0, Code.CANCELLED),
        ("3S", 3.0, 0.0, Code.DEADLINE_EXCEEDED),
        ("250000u", 0.2501, 0.0, Code.DEADLINE_EXCEEDED),
        ("250000u", 0.2499, 0.0, Code.CANCELLED),
        ("99999999n", 0.1, 0.0, Code.DEADLINE_EXCEEDED),
        ("1000000000n", 5.0, 0.0, Code.CANCELLED),  # 10 digits: not a valid timeout
        ("10x", 50.0, 0.0, Code.CANCELLED),
    ],
)
def test_client_reset_before_and_after_grpc_timeout(
    timeout: str | None, after: float, tolerance: float, expected: Code
) -> None:
    wire = Wire(deadline_tolerance=tolerance)
    wire.now = 10.0  # with binary-exact offsets the boundary rows compare exactly
    wire.start()
    wire.request(1, "Status", status_request(), timeout=timeout)
    wire.client(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)), at=10.0 + after)
    call = only(wire)
    assert call.code == expected
    assert call.duration_seconds == pytest.approx(after)


GRPC = ("content-type", "application/grpc")


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        ([*RESPONSE, *trailers(13)], Code.INTERNAL),
        ([*RESPONSE, *trailers(0)], Code.OK),
        ([*RESPONSE, ("grpc-status", "99")], Code.UNKNOWN),
        ([*RESPONSE, ("grpc-status", "x1")], Code.INTERNAL),
        ([*RESPONSE, ("grpc-status", "4294967296")], Code.INTERNAL),
        (RESPONSE, Code.UNKNOWN),
        (
            [(":status", "200"), ("content-type", "application/grpc+proto"), *trailers(5)],
            Code.NOT_FOUND,
        ),
        ([(":status", "200"), *trailers(0)], Code.UNKNOWN),  # not gRPC without content-type
        ([(":status", "200"), ("content-type", "text/html"), *trailers(0)], Code.UNKNOWN),
        ([GRPC, *trailers(0)], Code.INTERNAL),  # no :status
        ([(":status", "abc"), GRPC], Code.INTERNAL),
        ([(":status", "400")], Code.INTERNAL),
        ([(":status", "401")], Code.UNAUTHENTICATED),
        ([(":status", "403")], Code.PERMISSION_DENIED),
        ([(":status", "404")], Code.UNIMPLEMENTED),
        ([(":status", "429")], Code.UNAVAILABLE),
        ([(":status", "502")], Code.UNAVAILABLE),
        ([(":status", "503")], Code.UNAVAILABLE),
        ([(":status", "504")], Code.UNAVAILABLE),
        ([(":status", "500")], Code.UNKNOWN),
        ([(":status", "503"), GRPC, ("grpc-status", "5")], Code.UNAVAILABLE),  # HTTP wins
    ],
)
def test_trailers_only_responses(first: Headers, expected: Code) -> None:
    wire = Wire().start()
    wire.request(1, "Run", run_request())
    wire.trailers(1, first)
    call = only(wire)
    assert (call.code, call.messages_sent) == (expected, 0)


def test_a_non_200_response_ends_the_call_at_once() -> None:
    # grpc-go fails the call on such response HEADERS and resets the stream itself.
    wire = Wire().start()
    wire.request(1, "Run", run_request())
    wire.server(frame(HEADERS, END_HEADERS, 1, wire.response_block([(":status", "502"), GRPC])))
    assert only(wire).code == Code.UNAVAILABLE
    wire.client(frame(RST_STREAM, 0, 1, struct.pack(">I", 1)))
    wire.server(frame(DATA, 0, 1, b"<html>"))
    wire.trailers(1, trailers(0))
    assert only(wire).code == Code.UNAVAILABLE


def test_grpc_status_in_response_headers_waits_for_the_trailers_unless_malformed() -> None:
    wire = Wire().start()
    wire.request(1, "Run", run_request())
    wire.server(frame(HEADERS, END_HEADERS, 1, wire.response_block([*RESPONSE, *trailers(13)])))
    assert not wire.ended()
    wire.trailers(1, trailers(0))
    wire.request(3, "Run", run_request())
    wire.server(
        frame(HEADERS, END_HEADERS, 3, wire.response_block([*RESPONSE, ("grpc-status", "")]))
    )
    assert [c.code for c in wire.ended()] == [Code.OK, Code.INTERNAL]


def test_server_data_end_stream_without_trailers_is_internal() -> None:
    wire = Wire().start()
    wire.request(1, "Run", run_request())
    wire.server(frame(HEADERS, END_HEADERS, 1, wire.response_block(RESPONSE)))
    wire.server(frame(DATA, END_STREAM, 1, grpc_message(b"")))
    call = only(wire)
    assert (call.code, call.messages_sent) == (Code.INTERNAL, 1)


def test_exactly_one_end_per_stream() -> None:
    wire = Wire().start()
    wire.request(1, "Run", run_request())
    wire.respond(1, b"")
    # Late frames for the finished stream change nothing.
    wire.client(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
    wire.server(
        frame(RST_STREAM, 0, 1, struct.pack(">I", 0)), frame(DATA, END_STREAM, 1, grpc_message(b""))
    )
    wire.trailers(1, trailers(13))
    wire.server(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
    # A reused stream id is not a new call.
    wire.request(1, "Run", run_request("again"))
    wire.observer.connection_lost(wire.now)
    wire.observer.connection_lost(wire.now)
    assert [(c.job_id, c.code) for c in wire.ended()] == [("job-1", Code.OK)]
    assert len(wire.sink.started) == 1


def test_connection_lost_ends_open_calls_unavailable_once() -> None:
    wire = Wire().start()
    wire.request(1, "Run", run_request("a"))
    wire.request(3, "FollowLogs", step_pb2.FollowLogsRequest(id="a").SerializeToString())
    wire.server(frame(HEADERS, END_HEADERS, 3, wire.response_block(RESPONSE)))
    wire.server(
        frame(
            DATA,
            0,
            3,
            grpc_message(step_pb2.FollowLogsResponse(data=b"x" * 100).SerializeToString()),
        )
    )
    wire.respond(1, b"")
    wire.observer.connection_lost(wire.now + 2)
    wire.observer.connection_lost(wire.now + 3)
    wire.server(frame(DATA, 0, 3, grpc_message(b"")))  # after the end: ignored
    ended = wire.ended()
    assert [(c.method.name, c.code, c.messages_sent) for c in ended] == [
        ("Run", Code.OK, 1),
        ("FollowLogs", Code.UNAVAILABLE, 1),
    ]
    assert ended[1].duration_seconds == pytest.approx(2.0)
    assert not wire.observer.failed


# -- methods and messages -------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/grpc.health.v1.Health/Check",
        "/proto.StepRunner/Explode",
        "/proto.StepRunnerX/Run",
        "/StepRunner/Run",  # no package
        "/.StepRunner/Run",
        "/1proto.StepRunner/Run",  # not protobuf package identifiers
        "/a..b.StepRunner/Run",
        "/a b.StepRunner/Run",
        "/x/y.StepRunner/Run",
        "/caf\u00e9.StepRunner/Run",
        "proto.StepRunner/Run",
        "/proto.StepRunner/Run/",
    ],
)
def test_other_paths_are_unknown_but_counted(path: str) -> None:
    wire = Wire().start()
    wire.request(1, path, b"\x0a\x01x")
    wire.client(frame(DATA, 0, 1, b""))
    wire.respond(1, b"\xff\xff garbage", b"")
    call = only(wire)
    assert wire.sink.started == [UNKNOWN_METHOD]
    assert (call.method, call.job_id, call.messages_received, call.messages_sent) == (
        UNKNOWN_METHOD,
        None,
        1,
        2,
    )
    assert not wire.sink.decode_errors and not call.response_undecodable


@pytest.mark.parametrize("package", ["proto", "step", "gitlab.step.v1", "_x9"])
def test_any_package_is_classified_by_default(package: str) -> None:
    wire = Wire().start()
    wire.request(1, f"/{package}.StepRunner/Status", status_request("j"))
    wire.respond(1, status_response("j"))
    call = only(wire)
    assert wire.sink.started == [Method(f"{package}.StepRunner", "Status", "unary")]
    assert (call.method, call.job_id, call.statuses[0].state) == (
        Method(f"{package}.StepRunner", "Status", "unary"),
        "j",
        2,
    )


def test_the_package_is_configurable() -> None:
    wire = Wire(package="acme.v2").start()
    wire.request(
        1, "/acme.v2.StepRunner/FollowLogs", step_pb2.FollowLogsRequest(id="j").SerializeToString()
    )
    wire.request(3, "/proto.StepRunner/Run", run_request())
    wire.respond(1)
    wire.respond(3, b"")
    first, second = wire.ended()
    assert (first.method, first.job_id) == (
        Method("acme.v2.StepRunner", "FollowLogs", "server_stream"),
        "j",
    )
    assert (second.method, second.job_id) == (UNKNOWN_METHOD, None)


def test_messages_split_across_frames_and_many_per_frame() -> None:
    wire = Wire().start()
    wire.request(1, "FollowLogs", step_pb2.FollowLogsRequest(id="j", offset=5).SerializeToString())
    logs = [
        step_pb2.FollowLogsResponse(data=bytes([i]) * (i * 37)).SerializeToString()
        for i in range(20)
    ]
    stream = b"".join(grpc_message(m) for m in logs)
    wire.server(frame(HEADERS, END_HEADERS, 1, wire.response_block(RESPONSE)))
    for start in range(0, len(stream), 333):
        wire.server(frame(DATA, 0, 1, stream[start : start + 333]))
    wire.trailers(1, trailers(0))
    call = only(wire)
    assert (call.job_id, call.messages_sent) == ("j", 20)
    assert not wire.sink.decode_errors and not wire.sink.unknown


def test_only_the_first_request_message_names_the_job() -> None:
    wire = Wire().start()
    block = wire.request_block(request_headers("Run"))
    two = grpc_message(run_request("first")) + grpc_message(run_request("second"))
    wire.client(frame(HEADERS, END_HEADERS, 1, block), frame(DATA, END_STREAM, 1, two))
    wire.respond(1, b"")
    call = only(wire)
    assert (call.job_id, call.messages_received) == ("first", 2)


def test_unknown_fields_are_counted_once_per_message() -> None:
    wire = Wire().start()
    wire.request(1, "Status", status_request())
    top = status_response() + b"\xfa\x06\x03abc" + b"\x80\x07\x01"  # fields 111 and 112
    # field 9 inside start_time (jobs[0].start_time = field 5 of Status)
    stamp = b"\x08\x01\x48\x07"
    status_bytes = b"\x0a\x05job-1\x18\x2a\x2a" + bytes([len(stamp)]) + stamp
    deep = b"\x0a" + bytes([len(status_bytes)]) + status_bytes
    wire.respond(1, top, deep)
    call = only(wire)
    assert wire.sink.unknown == Counter({"StatusResponse": 2})
    # An enum number this build does not know is kept, and is not an unknown field.
    assert [s.state for s in call.statuses] == [42]
    assert not wire.sink.decode_errors and not call.response_undecodable


def test_a_drifted_log_message_is_decoded_and_counted() -> None:
    wire = Wire().start()
    wire.request(1, "FollowLogs", step_pb2.FollowLogsRequest(id="j").SerializeToString())
    plain = step_pb2.FollowLogsResponse(data=b"log").SerializeToString()
    wire.respond(1, plain, plain + b"\x10\x01", b"")
    call = only(wire)
    assert call.messages_sent == 3
    assert wire.sink.unknown == Counter({"FollowLogsResponse": 1})


def test_a_garbage_log_message_makes_the_response_undecodable() -> None:
    wire = Wire().start()
    wire.request(1, "FollowLogs", step_pb2.FollowLogsRequest(id="j").SerializeToString())
    wire.respond(1, b"\x0a\x09short")
    call = only(wire)
    assert call.response_undecodable
    assert wire.sink.decode_errors == Counter({"FollowLogsResponse": 1})


def test_a_garbage_status_response_is_undecodable() -> None:
    wire = Wire().start()
    wire.request(1, "Status", status_request())
    wire.respond(1, b"\x0a\xff\xff\xff\x0f truncated")
    call = only(wire)
    assert (call.code, call.response_undecodable, call.statuses) == (Code.OK, True, ())
    assert wire.sink.decode_errors == Counter({"StatusResponse": 1})
    assert not wire.observer.failed


def test_a_garbage_request_leaves_the_job_unknown() -> None:
    wire = Wire().start()
    wire.request(1, "Run", b"\x0a\x20 too short")
    wire.respond(1, b"")
    call = only(wire)
    assert (call.job_id, call.response_undecodable) == (None, False)
    assert wire.sink.decode_errors == Counter({"RunRequest": 1})


def test_unknown_fields_in_a_request_and_empty_responses() -> None:
    wire = Wire().start()
    wire.request(1, "Close", step_pb2.CloseRequest(id="j").SerializeToString() + b"\x10\x01")
    wire.respond(1, b"\x08\x01")
    assert only(wire).job_id == "j"
    assert wire.sink.unknown == Counter({"CloseRequest": 1, "CloseResponse": 1})


def test_an_oversize_message_is_skipped_and_counted() -> None:
    wire = Wire(max_message_bytes=64).start()
    wire.request(1, "Run", run_request("x" * 100))  # the job id is in the skipped part
    big = status_response("y" * 100)
    assert len(big) > 64
    wire.request(3, "Status", status_request())
    wire.respond(1, b"")
    wire.respond(3, big)
    run, status = wire.ended()
    assert (run.job_id, run.messages_received) == (None, 1)
    assert (status.job_id, status.statuses, status.response_undecodable, status.messages_sent) == (
        "job-1",
        (),
        False,
        1,
    )
    assert wire.sink.decode_errors == Counter({"grpc_frame": 2})
    assert not wire.observer.failed


def test_an_oversize_drifted_log_message_is_counted() -> None:
    wire = Wire(max_message_bytes=64).start()
    wire.request(1, "FollowLogs", step_pb2.FollowLogsRequest(id="j").SerializeToString())
    wire.respond(
        1, b"x" * 100 * 8, step_pb2.FollowLogsResponse(data=b"z" * 1000).SerializeToString()
    )
    call = only(wire)
    assert (call.messages_sent, call.response_undecodable) == (2, False)
    assert wire.sink.decode_errors == Counter({"grpc_frame": 1})


# -- compression ----------------------------------------------------------------------


def compressed_call(wire: Wire, encoding: str, response: bytes, flag: int = 1) -> CallEnded:
    block = wire.request_block([*request_headers("Status"), ("grpc-encoding", "gzip")])
    request = gzip.compress(status_request("zip"))
    wire.client(
        frame(HEADERS, END_HEADERS, 1, block), frame(DATA, END_STREAM, 1, grpc_message(request, 1))
    )
    headers = [*RESPONSE, ("grpc-encoding", encoding)] if encoding else RESPONSE
    wire.server(frame(HEADERS, END_HEADERS, 1, wire.response_block(headers)))
    wire.server(frame(DATA, 0, 1, grpc_message(response, flag)))
    wire.trailers(1, trailers(0))
    return only(wire)


def test_gzip_both_ways() -> None:
    wire = Wire().start()
    call = compressed_call(wire, "gzip", gzip.compress(status_response("zip")))
    assert call.job_id == "zip"
    assert [s.job_id for s in call.statuses] == ["zip"]
    assert not wire.sink.decode_errors


def test_corrupt_gzip_is_undecodable() -> None:
    wire = Wire().start()
    call = compressed_call(wire, "gzip", gzip.compress(status_response())[:-9])
    assert call.response_undecodable
    assert wire.sink.decode_errors == Counter({"grpc_frame": 1})


def test_gzip_bomb_is_treated_as_oversize() -> None:
    wire = Wire(max_message_bytes=1000).start()
    call = compressed_call(wire, "gzip", gzip.compress(b"\0" * 100_000))
    assert not call.response_undecodable
    assert wire.sink.decode_errors == Counter({"grpc_frame": 1})


def test_an_encoding_this_build_lacks_is_counted_not_undecodable() -> None:
    wire = Wire().start()
    call = compressed_call(wire, "snappy", b"whatever")
    assert (call.response_undecodable, call.statuses) == (False, ())
    assert wire.sink.decode_errors == Counter({"grpc_frame": 1})


@pytest.mark.parametrize(("encoding", "flag"), [("", 1), ("identity", 1), ("gzip", 2)])
def test_a_bad_compressed_flag_is_undecodable(encoding: str, flag: int) -> None:
    wire = Wire().start()
    call = compressed_call(wire, encoding, status_response(), flag=flag)
    assert call.response_undecodable
    assert wire.sink.decode_errors == Counter({"grpc_frame": 1})


# -- what is not HTTP/2 -----------------------------------------------------------------


@pytest.mark.parametrize(
    "client_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        PREFACE + frame(SETTINGS, 0, 0, b"\0\0\0\0\0"),  # not a multiple of 6
        PREFACE + frame(SETTINGS, 0, 1, b""),
        PREFACE + frame(SETTINGS, 1, 0, b"\0" * 6),  # ACK with payload
        PREFACE + frame(PING, 0, 0, b"short"),
        PREFACE + frame(RST_STREAM, 0, 0, b"\0\0\0\x08"),
        PREFACE + frame(RST_STREAM, 0, 1, b"\0\0\x08"),
        PREFACE + frame(WINDOW_UPDATE, 0, 0, b"\0"),
        PREFACE + frame(PRIORITY, 0, 1, b"\0"),
        PREFACE + frame(DATA, 0, 0, b"x"),
        PREFACE + frame(DATA, PADDED, 1, b"\x05abc"),  # padding longer than the frame
        PREFACE + frame(HEADERS, END_HEADERS, 0, b"\x82"),
        PREFACE + frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\0\0"),
        PREFACE
        + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"),  # HPACK index out of range
        PREFACE + frame(CONTINUATION, END_HEADERS, 1, b"\x82"),
        PREFACE + frame(GOAWAY, 0, 0, b"\0\0"),
    ],
)
def test_garbage_stops_observation_once(client_bytes: bytes) -> None:
    wire = Wire()
    wire.client(client_bytes)
    assert wire.observer.failed
    wire.client(client_bytes, b"\0" * 100)
    wire.server(b"more garbage" * 10)
    wire.observer.connection_lost(wire.now)
    assert wire.sink.decode_errors == Counter({"http2": 1})
    assert not wire.ended()


def test_open_calls_are_dropped_unreported_when_observation_stops() -> None:
    wire = Wire().start()
    wire.request(1, "Run", run_request())
    wire.request(3, "Status", status_request())
    wire.respond(1, b"")
    wire.server(frame(PING, 0, 0, b"bad"))
    assert wire.observer.failed
    wire.respond(3, status_response())
    wire.observer.connection_lost(wire.now)
    assert [c.method.name for c in wire.ended()] == ["Run"]
    assert len(wire.sink.started) == 2
    assert wire.sink.decode_errors == Counter({"http2": 1})


class ExplodingSink(RecordingSink):
    def call_ended(self, call: CallEnded) -> None:
        raise RuntimeError("a bug downstream")


def test_a_failing_sink_never_breaks_the_caller() -> None:
    sink = ExplodingSink()
    observer = ConnectionObserver(sink)
    hp = hpack.Encoder()
    observer.client_data(
        PREFACE + frame(HEADERS, END_HEADERS, 1, hp.encode(request_headers("Run"))), 1.0
    )
    observer.connection_lost(2.0)
    assert observer.failed
    assert sink.decode_errors == Counter({"http2": 1})


# -- properties -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    client=st.lists(st.binary(max_size=64), max_size=8),
    server=st.lists(st.binary(max_size=64), max_size=8),
    preface=st.booleans(),
)
def test_arbitrary_bytes_never_raise(
    client: list[bytes], server: list[bytes], preface: bool
) -> None:
    sink = RecordingSink()
    observer = ConnectionObserver(sink, max_message_bytes=16)
    if preface:
        observer.client_data(PREFACE, 0.0)
    for i in range(max(len(client), len(server))):
        if i < len(client):
            observer.client_data(client[i], float(i))
        if i < len(server):
            observer.server_data(server[i], float(i))
    observer.connection_lost(99.0)
    # Nothing raises out of the observer, by design; a bug would show as what stopped it.
    assert observer.stopped_by is None or isinstance(observer.stopped_by, PROTOCOL_ERRORS)
    assert sink.decode_errors["http2"] == (1 if observer.failed else 0)
    assert len(sink.ended) <= len(sink.started)


def scripted_bytes() -> list[tuple[int, float, bytes]]:
    """(direction, time, bytes) of a connection that uses padding, CONTINUATION, a
    table size update, gzip, split messages, resets and a trailers-only response."""
    client_hp, server_hp = hpack.Encoder(), hpack.Encoder()
    out: list[tuple[int, float, bytes]] = []

    def add(direction: int, at: float, *frames: bytes) -> None:
        out.append((direction, at, b"".join(frames)))

    add(0, 0.0, PREFACE, settings_frame((1, 8192)))
    add(1, 0.0, settings_frame(), settings_frame(ack=True))
    server_hp.header_table_size = 8192
    run = client_hp.encode(request_headers("Run", "1S", x_pad="p" * 100))
    add(
        0,
        1.0,
        frame(HEADERS, PADDED, 1, padded(run[:20], 4)),
        frame(CONTINUATION, END_HEADERS, 1, run[20:]),
        frame(DATA, END_STREAM | PADDED, 1, padded(grpc_message(run_request("p")), 2)),
    )
    follow = client_hp.encode(request_headers("FollowLogs"))
    add(0, 2.0, frame(HEADERS, END_HEADERS, 3, follow))
    add(0, 2.0, frame(DATA, END_STREAM, 3, grpc_message(b"\x0a\x01p")))
    add(1, 2.5, frame(HEADERS, END_HEADERS, 1, server_hp.encode(RESPONSE)))
    add(1, 2.5, frame(DATA, 0, 1, grpc_message(b"")))
    add(1, 2.5, frame(HEADERS, END_HEADERS | END_STREAM, 1, server_hp.encode(trailers(0))))
    logs = b"".join(
        grpc_message(step_pb2.FollowLogsResponse(data=b"L" * n).SerializeToString())
        for n in (0, 1, 500, 4000)
    )
    add(1, 3.0, frame(HEADERS, END_HEADERS, 3, server_hp.encode(RESPONSE)))
    add(1, 3.0, frame(DATA, 0, 3, logs[:777]), frame(DATA, 0, 3, logs[777:]))
    listing = client_hp.encode(request_headers("Status", "100m"))
    add(
        0,
        4.0,
        frame(HEADERS, END_HEADERS, 5, listing),
        frame(DATA, END_STREAM, 5, grpc_message(b"")),
    )
    cancel = struct.pack(">I", CANCEL)
    add(0, 4.2, frame(RST_STREAM, 0, 5, cancel), frame(RST_STREAM, 0, 3, cancel))
    close = client_hp.encode([*request_headers("Close"), ("grpc-encoding", "gzip")])
    message = grpc_message(gzip.compress(b"\x0a\x01p"), flag=1)
    add(0, 5.0, frame(HEADERS, END_HEADERS, 7, close), frame(DATA, END_STREAM, 7, message))
    not_found = server_hp.encode([*RESPONSE, *trailers(5)])
    add(1, 5.5, frame(HEADERS, END_HEADERS | END_STREAM, 7, not_found))
    return out


SCRIPT = scripted_bytes()
SCRIPT_RESULT = [
    ("Run", "p", Code.OK, 1, 1),
    ("Status", "", Code.DEADLINE_EXCEEDED, 1, 0),
    ("FollowLogs", "p", Code.CANCELLED, 1, 4),
    ("Close", "p", Code.NOT_FOUND, 1, 0),
]


def play(script: list[tuple[int, float, bytes]], cuts: set[int]) -> RecordingSink:
    sink = RecordingSink()
    observer = ConnectionObserver(sink)
    offset = 0
    for direction, at, data in script:
        sink.now = at
        bounds = [
            0,
            *sorted(p - offset for p in cuts if offset < p < offset + len(data)),
            len(data),
        ]
        for a, b in itertools.pairwise(bounds):
            feed = observer.client_data if direction == 0 else observer.server_data
            feed(data[a:b], at)
        offset += len(data)
    observer.connection_lost(9.0)
    assert not observer.failed
    return sink


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@settings(max_examples=150, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from([0, 1]), st.integers(min_value=0), st.integers(0, 255)),
        max_size=6,
    ),
    cut=st.integers(min_value=0, max_value=6),
)
def test_corrupted_conversations_fail_cleanly(
    changes: list[tuple[int, int, int]], cut: int
) -> None:
    """Damaged real-looking input stops observation as unparseable input, never by a
    bug (which would log a warning with a traceback)."""
    damaged = []
    for direction, at, data in SCRIPT:
        raw = bytearray(data)
        for side, position, value in changes:
            if side == direction:
                raw[position % len(raw)] = value
        damaged.append((direction, at, bytes(raw[: max(1, len(raw) - cut)])))
    handler = _Warnings()
    observer_log = logging.getLogger("exporter.observer")
    observer_log.addHandler(handler)
    try:
        sink = RecordingSink()
        observer = ConnectionObserver(sink)
        for direction, at, data in damaged:
            sink.now = at
            (observer.client_data if direction == 0 else observer.server_data)(data, at)
        observer.connection_lost(9.0)
    finally:
        observer_log.removeHandler(handler)
    assert not handler.records
    assert sink.decode_errors["http2"] == (1 if observer.failed else 0)
    assert len(sink.ended) <= len(sink.started)


def test_the_scripted_connection() -> None:
    sink = play(SCRIPT, set())
    got = [
        (c.method.name, c.job_id, c.code, c.messages_received, c.messages_sent) for c in sink.calls
    ]
    assert got == SCRIPT_RESULT
    assert not sink.decode_errors and not sink.unknown


@settings(max_examples=100, deadline=None)
@given(cuts=st.sets(st.integers(min_value=0, max_value=sum(len(d) for _, _, d in SCRIPT))))
def test_any_chunking_gives_the_same_events(cuts: set[int]) -> None:
    whole = play(SCRIPT, set())
    assert play(SCRIPT, cuts).calls == whole.calls
