"""Hostile and malformed input into the observer and the accounting behind it.

Property-based: whatever a peer or a job sends (arbitrary bytes, well-framed HTTP/2
with garbage inside, any sequence of call results), nothing raises, no label value
outside the fixed sets of SPEC section 4 appears, the set of exported series never
changes, no job is counted twice, and `failure_reason="runner_system_failure"` is
never produced. Plus the specific cases of issue 6: unknown numbers and fields,
missing fields, huge `jobs` lists, a 64 MiB message, hostile job ids in the exposition.
"""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from exporter.accounting import Accounting
from exporter.classifier import (
    ALL_FAILURES,
    FAILURE_REASONS,
    RESULTS,
    Outcome,
)
from exporter.events import (
    STEP_RUNNER_METHODS,
    UNKNOWN_LABEL,
    CallEnded,
    JobStatus,
    Method,
)
from exporter.h2 import PREFACE
from exporter.metrics import Metrics
from exporter.observer import CALL_COST, PROTOCOL_ERRORS, ConnectionObserver
from exporter.tracker import Decision, JobTracker
from tests.labels import ALLOWED as SHARED_ALLOWED
from tests.labels import SERVICE
from tests.unit.twin import TwinObserver
from tests.wire import frame, grpc_message, request_headers, varint

METHODS = [Method(SERVICE, name, kind) for name, kind in STEP_RUNNER_METHODS.items()]
FORBIDDEN_REASON = "runner_system_failure"

# Every value each label may take; the build_info version is the test's own.
ALLOWED: dict[str, frozenset[str]] = {**SHARED_ALLOWED, "version": frozenset({"test"})}

SeriesKey = tuple[str, frozenset[tuple[str, str]]]


def series(registry: CollectorRegistry) -> dict[SeriesKey, float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for metric in registry.collect()
        for s in metric.samples
    }


def assert_labels_fixed(values: dict[SeriesKey, float]) -> None:
    for name, labels in values:
        for label, value in labels:
            assert value != FORBIDDEN_REASON, (name, labels)
            if label == "le":
                continue
            assert value in ALLOWED[label], (name, label, value)


@dataclass
class World:
    """Real Metrics + Accounting (tracker, classifier) on a fresh registry, with every
    decision recorded so exactly-once can be checked."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    decisions: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.registry, package="proto", version="test")
        self.accounting = _RecordingAccounting(self.metrics, upstream="u", decisions=self.decisions)
        self.initial = series(self.registry)

    def observer(self, **options: int | float) -> TwinObserver:
        return TwinObserver(self.accounting, package="proto", **options)

    def value(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        assert value is not None, (name, labels)
        return value

    def jobs(self) -> dict[str, float]:
        return {r: self.value("step_runner_jobs_total", result=r) for r in RESULTS}

    def failures(self) -> dict[tuple[str, ...], float]:
        found: dict[tuple[str, ...], float] = {}
        for (name, labels), value in series(self.registry).items():
            if name == "step_runner_job_failures_total" and value:
                d = dict(labels)
                key = (d["failure_reason"], d["source"], d["kind"], d["category"])
                found[key] = value
        return found

    def check_invariants(self) -> None:
        values = series(self.registry)
        assert_labels_fixed(values)
        # No series appears or disappears, whatever came in.
        assert values.keys() == self.initial.keys()
        assert all(count == 1 for count in self.decisions.values()), self.decisions
        assert sum(self.jobs().values()) == sum(self.decisions.values())
        started = sum(v for (n, _), v in values.items() if n == "grpc_server_started_total")
        handled = sum(v for (n, _), v in values.items() if n == "grpc_server_handled_total")
        assert handled <= started


class _RecordingAccounting(Accounting):
    def __init__(self, metrics: Metrics, *, upstream: str, decisions: Counter[str]) -> None:
        super().__init__(metrics, upstream=upstream, max_jobs=1_000_000)
        self._decisions = decisions

    def job_decided(self, decision: Decision) -> None:
        self._decisions[decision.job_id] += 1
        super().job_decided(decision)


# -- hand-made protobuf and HTTP/2 ------------------------------------------------------


def pb_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def pb_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def status_entry(
    job_id: bytes | None,
    state: int | None = None,
    kind: int | None = None,
    extra: bytes = b"",
    message: bytes = b"",
) -> bytes:
    """A `Status` written field by field, so any number (and any omission) is possible."""
    body = b""
    if job_id is not None:
        body += pb_bytes(1, job_id)
    if message:
        body += pb_bytes(2, message)
    if state is not None:
        body += pb_varint(3, state)
    if kind is not None:
        body += pb_bytes(7, pb_varint(2, kind) + pb_bytes(1, message))
    return body + extra


def status_response(*entries: bytes) -> bytes:
    return b"".join(pb_bytes(1, entry) for entry in entries)


def id_request(job_id: bytes) -> bytes:
    return pb_bytes(1, job_id)


DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7
END_STREAM, END_HEADERS = 0x1, 0x4


RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


class Conn:
    """Both ends of one connection as bytes, fed into an observer as they are written."""

    def __init__(self, observer: TwinObserver) -> None:
        self.observer = observer
        self.client_hpack = hpack.Encoder()
        self.server_hpack = hpack.Encoder()
        self.now = 10.0
        self.client(PREFACE + frame(SETTINGS, 0, 0))
        self.server(frame(SETTINGS, 0, 0) + frame(SETTINGS, 1, 0))

    def client(self, data: bytes) -> None:
        self.observer.client_data(data, self.now)

    def server(self, data: bytes) -> None:
        self.observer.server_data(data, self.now)

    def request(self, stream: int, path: str, message: bytes, timeout: str | None = None) -> None:
        block = self.client_hpack.encode(request_headers(path, timeout))
        self.client(
            frame(HEADERS, END_HEADERS, stream, block)
            + frame(DATA, END_STREAM, stream, grpc_message(message))
        )

    def response_headers(self, stream: int, headers: Sequence[tuple[str, str]], end: bool) -> None:
        flags = END_HEADERS | (END_STREAM if end else 0)
        self.server(frame(HEADERS, flags, stream, self.server_hpack.encode(headers)))

    def respond(self, stream: int, *messages: bytes, code: str = "0") -> None:
        self.response_headers(stream, RESPONSE_HEADERS, end=False)
        for message in messages:
            self.server(frame(DATA, 0, stream, grpc_message(message)))
        self.response_headers(stream, [("grpc-status", code), ("grpc-message", "")], end=True)

    def job(
        self, stream: int, method: str, job_id: bytes, *responses: bytes, code: str = "0"
    ) -> None:
        self.request(stream, f"/{SERVICE}/{method}", id_request(job_id), timeout="60S")
        self.respond(stream, *responses, code=code)


# -- the forgery property: call results straight into the tracker -----------------------

JOB_IDS = ["1", "2", "3-run", "", "4"]
any_int = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31 - 1), st.integers(min_value=-3, max_value=20)
)
job_statuses = st.builds(
    JobStatus,
    job_id=st.sampled_from([*JOB_IDS, "other"]),
    state=any_int,
    error_kind=st.none() | any_int,
    duration_seconds=st.none() | st.floats(allow_nan=True, allow_infinity=True),
)
unknown_methods = st.sampled_from(
    [Method(UNKNOWN_LABEL, UNKNOWN_LABEL, UNKNOWN_LABEL), Method("evil.Svc", "Run", "unary")]
)
call_events = st.builds(
    CallEnded,
    method=st.sampled_from(METHODS) | unknown_methods,
    job_id=st.none() | st.sampled_from(JOB_IDS),
    code=st.one_of(st.integers(min_value=0, max_value=16), any_int),
    duration_seconds=st.floats(min_value=0, max_value=1e6),
    messages_received=st.integers(min_value=0, max_value=3),
    messages_sent=st.integers(min_value=0, max_value=3),
    statuses=st.lists(job_statuses, max_size=4).map(tuple),
    response_undecodable=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(call_events, max_size=30))
def test_no_sequence_of_call_results_forges_a_runner_system_failure(
    events: list[CallEnded],
) -> None:
    world = World()
    for event in events:
        world.accounting.call_started(event.method)
        world.accounting.call_ended(event)
    world.check_invariants()
    assert set(world.decisions) <= {job for job in JOB_IDS if job}


@settings(max_examples=200, deadline=None)
@given(st.lists(call_events, max_size=40), st.integers(min_value=1, max_value=3))
def test_bounded_tracker_never_decides_a_job_twice_while_it_remembers_it(
    events: list[CallEnded], max_jobs: int
) -> None:
    decided: list[str] = []
    evicted: list[str] = []

    class Sink:
        def job_decided(self, decision: Decision) -> None:
            decided.append(decision.job_id)
            assert decision.outcome.failure is None or (
                decision.outcome.failure.failure_reason in FAILURE_REASONS
            )

        def job_evicted(self, upstream: str, job_id: str, reason: str) -> None:
            evicted.append(job_id)

    tracker = JobTracker(Sink(), max_jobs=max_jobs, ttl=3600)
    for event in events:
        tracker.call_ended("u", event)
        assert len(tracker) <= max_jobs
    # A job can only be decided again after it was forgotten (pushed out by newer ones).
    if max_jobs >= len({e.job_id for e in events if e.job_id}):
        assert all(count == 1 for count in Counter(decided).values()), decided


# -- the same, through the observer: any upstream behaviour on well-framed HTTP/2 --------

header_values = st.one_of(
    st.sampled_from(["0", "1", "2", "4", "13", "14", "16", "17", "-1", "99999999999", "", "x"]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
)
status_bodies = st.builds(
    status_entry,
    job_id=st.none() | st.sampled_from([b"1", b"2", b"3-run", b"", b"\xff\xfe"]),
    state=st.none() | any_int,
    kind=st.none() | any_int,
    extra=st.sampled_from([b"", pb_bytes(99, b"drift"), pb_varint(15, 7), b"\x80"]),
    message=st.sampled_from([b"", b'say "hi"\n\\', b"\xff\xfe", b"}\n# EOF"]),
).map(status_response)
message_bodies = st.one_of(status_bodies, st.binary(max_size=64), st.just(b""))


@st.composite
def server_behaviour(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """What the server does on one stream: a list of steps."""
    kind = draw(
        st.sampled_from(["normal", "trailers_only", "rst", "data_end", "silent", "odd_headers"])
    )
    code = draw(header_values)
    if kind == "trailers_only":
        return [("headers", ([*RESPONSE_HEADERS, ("grpc-status", code)], True))]
    if kind == "rst":
        return [("rst", draw(st.integers(min_value=0, max_value=2**32 - 1)))]
    if kind == "silent":
        return []
    steps: list[tuple[str, Any]] = []
    if kind == "odd_headers":
        status = draw(st.sampled_from(["200", "404", "503", "abc", "2000"]))
        ctype = draw(st.sampled_from(["application/grpc", "text/html", "application/grpc+proto"]))
        steps.append(("headers", ([(":status", status), ("content-type", ctype)], False)))
    else:
        steps.append(("headers", (RESPONSE_HEADERS, False)))
    for body in draw(st.lists(message_bodies, max_size=3)):
        steps.append(("data", grpc_message(body, draw(st.sampled_from([0, 0, 1, 2])))))
    if kind == "data_end":
        steps.append(("data_end", b""))
    else:
        steps.append(("headers", ([("grpc-status", code), ("grpc-message", "x")], True)))
    return steps


paths = st.sampled_from(
    [f"/{SERVICE}/{name}" for name in STEP_RUNNER_METHODS] + ["/other.Svc/Run", "/", "x"]
)
calls = st.tuples(
    paths,
    st.one_of(st.sampled_from([b"1", b"2", b"3-run", b""]).map(id_request), st.binary(max_size=32)),
    st.sampled_from([None, "60S", "1m", "0n", "999999999S", "bogus"]),
    server_behaviour(),
    st.booleans(),  # the client resets the stream afterwards
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(calls, min_size=1, max_size=8), st.booleans())
def test_no_upstream_behaviour_forges_a_runner_system_failure(
    script: list[tuple[str, bytes, str | None, list[tuple[str, Any]], bool]], goaway: bool
) -> None:
    world = World()
    conn = Conn(world.observer())
    for index, (path, request, timeout, steps, reset) in enumerate(script):
        stream = 2 * index + 1
        conn.now += 0.01
        conn.request(stream, path, request, timeout)
        for step, arg in steps:
            if step == "headers":
                headers, end = arg
                conn.response_headers(stream, headers, end)
            elif step == "data":
                conn.server(frame(DATA, 0, stream, arg))
            elif step == "data_end":
                conn.server(frame(DATA, END_STREAM, stream))
            else:
                conn.server(frame(RST_STREAM, 0, stream, struct.pack(">I", arg)))
        if reset:
            conn.client(frame(RST_STREAM, 0, stream, struct.pack(">I", 8)))
    if goaway:
        conn.server(frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0)))
    conn.observer.connection_lost(conn.now + 1)
    world.check_invariants()
    assert conn.observer.stopped_by is None
    assert world.value("step_runner_exporter_decode_errors_total", message="http2") == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=256)), max_size=12),
    st.booleans(),
)
def test_arbitrary_bytes_from_either_side_never_raise(
    chunks: list[tuple[bool, bytes]], with_preface: bool
) -> None:
    world, observer = _feed_arbitrary(chunks, with_preface)
    world.check_invariants()
    assert_nothing_swallowed(world, observer)


def _feed_arbitrary(
    chunks: list[tuple[bool, bytes]], with_preface: bool
) -> tuple[World, TwinObserver]:
    world = World()
    observer = world.observer()
    if with_preface:
        observer.client_data(PREFACE, 0.0)
    for now, (from_client, data) in enumerate(chunks):
        if from_client:
            observer.client_data(data, float(now))
        else:
            observer.server_data(data, float(now))
    observer.connection_lost(99.0)
    return world, observer


def assert_nothing_swallowed(world: World, observer: TwinObserver) -> None:
    """The observer never raises to its caller, by design: what shows a bug is what it
    swallowed. Only input it cannot follow may stop it, and only that is counted."""
    stopped_by = observer.stopped_by
    assert stopped_by is None or isinstance(stopped_by, PROTOCOL_ERRORS), repr(stopped_by)
    errors = world.value("step_runner_exporter_decode_errors_total", message="http2")
    assert errors == (1 if observer.failed else 0)


VALID_CONVERSATION = [
    (True, PREFACE + frame(SETTINGS, 0, 0)),
    (False, frame(SETTINGS, 0, 0) + frame(SETTINGS, 1, 0)),
    (True, frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(request_headers("/x/y")))),
    (True, frame(DATA, END_STREAM, 1, grpc_message(b""))),
]


def test_a_swallowed_bug_fails_the_never_raise_check(monkeypatch: pytest.MonkeyPatch) -> None:
    world, observer = _feed_arbitrary(VALID_CONVERSATION, False)
    assert_nothing_swallowed(world, observer)
    assert not observer.failed

    def bug(*_: object) -> None:
        raise KeyError("a bug in the observer")

    # In the logic both observer cores share: the frame walkers call back into it.
    monkeypatch.setattr(ConnectionObserver, "_request_headers", bug)
    world, observer = _feed_arbitrary(VALID_CONVERSATION, False)
    assert observer.failed  # swallowed: the caller saw nothing
    with pytest.raises(AssertionError, match="a bug in the observer"):
        assert_nothing_swallowed(world, observer)


# -- specific hostile messages ------------------------------------------------------------


def decided_by_status(*entries: bytes, job_id: bytes = b"7") -> World:
    world = World()
    conn = Conn(world.observer())
    conn.job(1, "Status", job_id, status_response(*entries))
    conn.job(3, "Close", job_id, b"")
    world.check_invariants()
    return world


UNKNOWN_FAILURE = ("unknown_failure", "status_error_kind", "unknown", "unknown")
UNRECOGNIZED = ("unknown_failure", "status_error_kind", "unrecognized", "unknown")


@pytest.mark.parametrize("kind", [5, 42, 2**31 - 1, -1, -(2**31)])
def test_unknown_error_kind_numbers_are_unrecognized(kind: int) -> None:
    world = decided_by_status(status_entry(b"7", state=3, kind=kind))
    assert world.failures() == {UNRECOGNIZED: 1}


@pytest.mark.parametrize("state", [5, 99, 2**31 - 1, -1])
def test_unknown_state_numbers_without_error_are_unknown_failures(state: int) -> None:
    world = decided_by_status(status_entry(b"7", state=state))
    assert world.failures() == {UNKNOWN_FAILURE: 1}


def test_unknown_fields_are_counted_as_drift_and_the_known_ones_still_decide() -> None:
    drift = (
        pb_bytes(99, b"new") + pb_varint(100, 1) + pb_bytes(7, pb_varint(9, 1) + pb_varint(2, 1))
    )
    world = decided_by_status(status_entry(b"7", state=3, extra=drift))
    assert world.value("step_runner_exporter_unknown_fields_total", message="StatusResponse") == 1
    # The extra StatusError (field 7 repeated) is merged by protobuf rules: kind=1 wins.
    assert world.failures() == {
        ("script_failure", "status_error_kind", "step_failure", "script"): 1
    }


def test_missing_fields() -> None:
    # No id in a one-entry answer: it is the job's own (step-runner answers one job).
    assert decided_by_status(status_entry(None, state=2)).jobs()["success"] == 1
    # No state and no error: unspecified, not terminal; Close then decides unknown_failure.
    assert decided_by_status(status_entry(b"7")).failures() == {UNKNOWN_FAILURE: 1}
    # An empty StatusResponse decides nothing: Close forgets the job (evicted).
    world = decided_by_status()
    assert sum(world.jobs().values()) == 0
    assert world.value("step_runner_exporter_evicted_jobs_total") == 1


def test_undecodable_status_response_falls_back_to_grpc_internal() -> None:
    world = decided_by_status(b"\xff\xff\xff")
    assert world.value("step_runner_exporter_decode_errors_total", message="StatusResponse") == 1
    assert world.failures() == {
        ("script_failure", "grpc_internal", "Internal", "infrastructure"): 1
    }


@pytest.mark.parametrize("method", ["Run", "Status", "Close", "FollowLogs", "Cancel"])
def test_undecodable_request_is_counted_and_names_no_job(method: str) -> None:
    world = World()
    conn = Conn(world.observer())
    conn.request(1, f"/{SERVICE}/{method}", b"\x0a\xff\x01", timeout="1S")  # truncated field 1
    conn.respond(1, code="13")
    world.check_invariants()
    assert world.value("step_runner_exporter_decode_errors_total", message=f"{method}Request") == 1
    assert sum(world.jobs().values()) == 0
    assert (
        world.value(
            "grpc_server_handled_total",
            grpc_type=STEP_RUNNER_METHODS[method],
            grpc_service=SERVICE,
            grpc_method=method,
            grpc_code="Internal",
        )
        == 1
    )


def test_invalid_utf8_job_id_is_a_decode_error_not_a_job() -> None:
    world = decided_by_status(status_entry(b"\xff", state=3), job_id=b"\xff\xfe")
    assert world.value("step_runner_exporter_decode_errors_total", message="StatusRequest") == 1
    assert sum(world.jobs().values()) == 0


def test_a_huge_jobs_list_is_decoded_within_the_limit() -> None:
    others = [status_entry(b"o%d" % i, state=3, kind=2) for i in range(200_000)]
    body = status_response(*others, status_entry(b"7", state=2))
    assert 1 << 20 < len(body) < 4 << 20
    world = World()
    conn = Conn(world.observer())
    conn.job(1, "Status", b"7", body)
    world.check_invariants()
    assert world.jobs() == {"success": 1, "failed": 0, "cancelled": 0}  # only its own entry


def test_a_jobs_list_over_the_limit_is_skipped_and_counted() -> None:
    body = status_response(*[status_entry(b"7", state=3, kind=2)] * 100_000)
    world = World()
    conn = Conn(world.observer(max_message_bytes=len(body) - 1))
    conn.job(1, "Status", b"7", body)
    conn.job(3, "Close", b"7", b"")
    world.check_invariants()
    assert world.value("step_runner_exporter_decode_errors_total", message="grpc_frame") == 1
    assert sum(world.jobs().values()) == 0  # not seen, so not decided: never guessed


def _feed_in_frames(conn: Conn, stream: int, payload: bytes, frame_size: int = 16384) -> None:
    view = memoryview(payload)
    for start in range(0, len(view), frame_size):
        piece = view[start : start + frame_size]
        conn.server(frame(DATA, 0, stream, bytes(piece)))


def test_a_64_mib_message_is_skipped_without_buffering_it() -> None:
    limit = 4 * 1024 * 1024
    huge = status_response(status_entry(b"7", state=2, message=b"x" * (64 << 20)))
    wire = grpc_message(huge)
    world = World()
    conn = Conn(world.observer(max_message_bytes=limit))
    conn.request(1, f"/{SERVICE}/Status", id_request(b"7"), timeout="60S")
    conn.response_headers(1, RESPONSE_HEADERS, end=False)
    frames = [frame(DATA, 0, 1, wire[i : i + 16384]) for i in range(0, len(wire), 16384)]
    del huge, wire
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for chunk in frames:
            conn.server(chunk)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    conn.response_headers(1, [("grpc-status", "0")], end=True)
    world.check_invariants()
    assert world.value("step_runner_exporter_decode_errors_total", message="grpc_frame") == 1
    assert peak < 1 << 20, f"the observer held {peak} bytes of a 64 MiB message"


def test_the_observer_never_buffers_more_than_its_limit_per_stream() -> None:
    """A message just over the limit, arriving slowly: nothing of it is kept."""
    limit = 1 << 20
    world = World()
    conn = Conn(world.observer(max_message_bytes=limit))
    conn.request(1, f"/{SERVICE}/Status", id_request(b"7"))
    conn.response_headers(1, RESPONSE_HEADERS, end=False)
    body = status_response(status_entry(b"7", state=2, message=b"y" * limit))
    wire = grpc_message(body)
    frames = [frame(DATA, 0, 1, wire[i : i + 1000]) for i in range(0, len(wire), 1000)]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for chunk in frames:
            conn.server(chunk)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < limit // 4
    assert world.value("step_runner_exporter_decode_errors_total", message="grpc_frame") == 1


def test_observer_memory_per_connection_is_bounded() -> None:
    """64 concurrent Status calls on one connection, each response message under the
    per-message limit and one byte short of complete. With a budget of two messages
    per connection the observer holds about that, skips the rest and counts them."""
    limit = 1 << 20
    streams = 64
    world = World()
    observer = world.observer(max_message_bytes=limit, max_connection_bytes=2 * limit)
    conn = Conn(observer)
    body = status_response(status_entry(b"7", state=2, message=b"z" * (limit - 64)))
    assert len(body) <= limit
    message = grpc_message(body)
    for index in range(streams):
        conn.request(2 * index + 1, f"/{SERVICE}/Status", id_request(str(index).encode()))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for index in range(streams):
            stream = 2 * index + 1
            conn.response_headers(stream, RESPONSE_HEADERS, end=False)
            _feed_in_frames(conn, stream, message[:-1])
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held < 4 * limit, f"one connection's observer holds {held >> 20} MiB"
    for index in range(streams):
        conn.server(frame(DATA, 0, 2 * index + 1, message[-1:]))
        conn.response_headers(2 * index + 1, [("grpc-status", "0")], end=True)
    world.check_invariants()
    skipped = world.value("step_runner_exporter_decode_errors_total", message="grpc_frame")
    assert skipped >= streams - 2


def test_compressed_garbage_and_zip_bombs_are_counted() -> None:
    world = World()
    conn = Conn(world.observer(max_message_bytes=1 << 20))
    block = conn.client_hpack.encode(
        [*request_headers(f"/{SERVICE}/Status", "60S"), ("grpc-encoding", "gzip")]
    )
    conn.client(frame(HEADERS, END_HEADERS, 1, block))
    conn.client(frame(DATA, END_STREAM, 1, grpc_message(gzip.compress(id_request(b"7")), 1)))
    conn.server(
        frame(
            HEADERS,
            END_HEADERS,
            1,
            conn.server_hpack.encode([*RESPONSE_HEADERS, ("grpc-encoding", "gzip")]),
        )
    )
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    conn.server(frame(DATA, 0, 1, grpc_message(bomb, 1)))
    conn.response_headers(1, [("grpc-status", "0")], end=True)
    conn.job(3, "Close", b"7", b"")
    world.check_invariants()
    assert world.value("step_runner_exporter_decode_errors_total", message="grpc_frame") == 1
    assert sum(world.jobs().values()) == 0


# -- job-controlled strings never reach a label or break the exposition -------------------

HOSTILE_IDS = [
    'quote"d',
    "new\nline",
    "back\\slash",
    '} 1\n# HELP evil x\nevil_metric{a="b"} 1',
    "é ü 日本",
    "\x00nul",
    "x" * 1000,
    "# EOF",
    "tab\there",
]


def _all_failure_kinds(world: World, job_ids: Iterable[str]) -> None:
    outcomes = [Outcome("failed", failure) for failure in ALL_FAILURES]
    for index, job_id in enumerate(job_ids):
        world.metrics.job_decided(job_id, outcomes[index % len(outcomes)], 1.0)


def test_hostile_job_ids_stay_out_of_labels_and_both_exposition_formats_parse() -> None:
    world = World()
    _all_failure_kinds(world, HOSTILE_IDS)
    text = generate_latest(world.registry).decode()
    families = list(text_string_to_metric_families(text))
    assert families
    om = generate_openmetrics(world.registry).decode()
    parsed = {f.name: f for f in parse_om(om)}
    exemplars = [s.exemplar for s in parsed["step_runner_job_failures"].samples if s.exemplar]
    assert len(exemplars) == len(HOSTILE_IDS)
    for exemplar in exemplars:
        assert set(exemplar.labels) == {"job_id"}
        assert len(exemplar.labels["job_id"]) <= 122
        assert "\n" not in exemplar.labels["job_id"] and '"' not in exemplar.labels["job_id"]
    for hostile in HOSTILE_IDS:
        if hostile != "# EOF":  # the OpenMetrics terminator itself
            assert hostile not in text and hostile not in om
    assert_labels_fixed(series(world.registry))
    assert series(world.registry).keys() == world.initial.keys()


def test_the_connection_budget_is_given_back_when_a_stream_ends() -> None:
    """A budget of one message and two calls: while one response is partly buffered a
    second is skipped; once the first stream ends, the next one is decoded again."""
    limit = 1 << 16
    world = World()
    budget = limit + 2 * CALL_COST
    conn = Conn(world.observer(max_message_bytes=limit, max_connection_bytes=budget))
    body = status_response(status_entry(b"7", state=2, message=b"z" * (limit - 64)))
    message = grpc_message(body)

    def partial(stream: int) -> None:
        conn.request(stream, f"/{SERVICE}/Status", id_request(str(stream).encode()))
        conn.response_headers(stream, RESPONSE_HEADERS, end=False)
        _feed_in_frames(conn, stream, message[:-1])

    def finish(stream: int) -> None:
        conn.server(frame(DATA, 0, stream, message[-1:]))
        conn.response_headers(stream, [("grpc-status", "0")], end=True)

    def skipped() -> float:
        return world.value("step_runner_exporter_decode_errors_total", message="grpc_frame")

    partial(1)
    partial(3)  # over budget while stream 1 holds it
    assert skipped() == 0  # counted when the skipped message completes
    finish(3)
    assert skipped() == 1
    finish(1)
    partial(5)  # stream 1 gave its share back
    finish(5)
    assert skipped() == 1
    world.check_invariants()


# -- everything held per connection is inside max_connection_bytes ------------------------

PING, CONTINUATION, PADDED, UNKNOWN_TYPE = 0x6, 0x9, 0x8, 0xFA
MAX_FRAME = (1 << 24) - 1


def _log_request(conn: Conn) -> None:
    conn.request(1, f"/{SERVICE}/FollowLogs", id_request(b"7"))
    conn.response_headers(1, RESPONSE_HEADERS, end=False)


def _hostile_settings(conn: Conn) -> Iterable[bytes]:
    yield frame(SETTINGS, 0, 0, b"\0\x01\0\0\x10\0" * (MAX_FRAME // 6))


def _hostile_unknown(conn: Conn) -> Iterable[bytes]:
    yield frame(UNKNOWN_TYPE, 0, 0, b"?" * MAX_FRAME)


def _hostile_ping(conn: Conn) -> Iterable[bytes]:
    yield frame(PING, 0, 0, b"p" * MAX_FRAME)


def _hostile_goaway(conn: Conn) -> Iterable[bytes]:
    yield frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0) + b"d" * (MAX_FRAME - 8))


LOG_MESSAGE = grpc_message(pb_bytes(1, b"L" * 4000))
PAD = 200
# Log messages filling one padded DATA frame of the largest size, the last one longer.
PADDED_LOG_MESSAGES = (MAX_FRAME - 1 - PAD) // len(LOG_MESSAGE)


def _hostile_padded_data(conn: Conn) -> Iterable[bytes]:
    _log_request(conn)
    rest = MAX_FRAME - 1 - PAD - (PADDED_LOG_MESSAGES - 1) * len(LOG_MESSAGE)
    last = grpc_message(pb_bytes(1, b"F" * (rest - 8)))
    log = LOG_MESSAGE * (PADDED_LOG_MESSAGES - 1) + last
    assert len(log) == MAX_FRAME - 1 - PAD
    yield frame(DATA, PADDED, 1, bytes([PAD]) + log + b"\0" * PAD)


def _hostile_continuation(conn: Conn) -> Iterable[bytes]:
    block = conn.client_hpack.encode(request_headers(f"/{SERVICE}/Run"))
    yield frame(HEADERS, 0, 1, block)
    for _ in range(40):
        yield frame(CONTINUATION, 0, 1, b"\x82" * (1 << 20))


HOSTILE_STREAMS = {
    # name: (the stream, who sends it, whether observation stops)
    "settings_16mib": (_hostile_settings, "server", True),
    "unknown_frame_16mib": (_hostile_unknown, "client", False),
    "ping_16mib": (_hostile_ping, "client", True),
    "goaway_16mib_debug_data": (_hostile_goaway, "server", False),
    "padded_data_16mib": (_hostile_padded_data, "server", False),
    "endless_continuation": (_hostile_continuation, "client", True),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_STREAMS))
def test_everything_the_observer_holds_is_inside_the_connection_budget(name: str) -> None:
    """Frames as large as HTTP/2 allows, fed in 16 KiB reads: what the observer holds,
    by its own account and by tracemalloc, stays inside max_connection_bytes; what
    does not fit stops observation (counted once), and the rest is walked over."""
    budget = 1 << 20
    world = World()
    observer = world.observer(max_message_bytes=budget // 4, max_connection_bytes=budget)
    conn = Conn(observer)
    make, side, stops = HOSTILE_STREAMS[name]
    feed = conn.client if side == "client" else conn.server
    wire = b"".join(make(conn))
    reads = [wire[i : i + 16384] for i in range(0, len(wire), 16384)]
    del wire
    most = peak = 0
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for data in reads:
            feed(data)
            most = max(most, observer.held_bytes)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert most <= budget
    assert peak < budget + (256 << 10), f"{name}: the observer held {peak >> 10} KiB"
    assert observer.failed is stops
    assert world.value("step_runner_exporter_decode_errors_total", message="http2") == stops
    assert world.value("step_runner_exporter_decode_errors_total", message="grpc_frame") == 0
    if name == "padded_data_16mib":
        conn.response_headers(1, [("grpc-status", "0")], end=True)
        handled = world.value(
            "grpc_server_msg_sent_total",
            grpc_type="server_stream",
            grpc_service=SERVICE,
            grpc_method="FollowLogs",
        )
        assert handled == PADDED_LOG_MESSAGES
    observer.connection_lost(conn.now)
    world.check_invariants()
    assert observer.held_bytes <= budget


def test_calls_beyond_the_budget_are_not_followed_and_are_counted() -> None:
    world = World()
    observer = world.observer(max_message_bytes=1024, max_connection_bytes=4 * CALL_COST)
    conn = Conn(observer)
    for index in range(10):
        conn.request(2 * index + 1, f"/{SERVICE}/Run", id_request(b"%d" % index))
    assert observer.held_bytes == 4 * CALL_COST
    assert world.value("step_runner_exporter_decode_errors_total", message="grpc_frame") == 6
    for index in range(10):
        conn.respond(2 * index + 1, b"")
    assert observer.held_bytes == 0
    started = world.value(
        "grpc_server_started_total", grpc_type="unary", grpc_service=SERVICE, grpc_method="Run"
    )
    assert started == 4
    conn.request(21, f"/{SERVICE}/Run", id_request(b"x"))  # room again
    assert observer.held_bytes == CALL_COST
    observer.connection_lost(conn.now)
    world.check_invariants()


def test_a_larger_hpack_table_comes_out_of_the_budget() -> None:
    world = World()
    observer = world.observer(max_message_bytes=1024, max_connection_bytes=64 << 10)
    conn = Conn(observer)
    conn.client(frame(SETTINGS, 0, 0, struct.pack(">HI", 1, 32 << 10)))
    assert (observer.held_bytes, observer.failed) == ((32 << 10) - 4096, False)
    conn.server(frame(SETTINGS, 0, 0, struct.pack(">HI", 1, 1 << 20)))
    assert observer.failed
    assert world.value("step_runner_exporter_decode_errors_total", message="http2") == 1
