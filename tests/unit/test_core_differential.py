"""The compiled observer core against its pure-Python reference (issue 11): the same
bytes in, the same call events out, on every capture cut anywhere and on generated
streams of frames, well-formed and hostile. (Every other observer unit test compares
the two as well, through tests/unit/twin.py.)"""

from __future__ import annotations

import random
from typing import Any

import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.events import STEP_RUNNER_METHODS
from exporter.h2 import PREFACE
from exporter.proto import step_pb2
from tests.unit.captures import CLIENT, SERVER, Record, capture_files, read_h2cap, rechunked, replay
from tests.unit.twin import EventLog, TwinObserver, compiled_core
from tests.wire import frame, grpc_message, request_headers

CAPTURED = {path.name: read_h2cap(path) for path in capture_files()}
METHODS = sorted(STEP_RUNNER_METHODS)
PAYLOADS = [
    step_pb2.RunRequest(id="job-1").SerializeToString(),
    step_pb2.StatusRequest(id="job-1").SerializeToString(),
    step_pb2.StatusResponse(
        jobs=[step_pb2.Status(id="job-1", status=step_pb2.StepResult.failure)]
    ).SerializeToString(),
    b"\xff\xff\xff",
    b"",
]
# Big enough to cover every frame type, flag and split many times over, small enough
# for a few seconds a test.
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def twin(**options: Any) -> TwinObserver:
    observer = TwinObserver(EventLog(), **options)
    if compiled_core() is not None:
        assert observer.twin is not None  # there is something to compare
    return observer


@EXAMPLES
@given(name=st.sampled_from(sorted(CAPTURED)), seed=st.integers(0, 2**32), piece=st.integers(1, 64))
def test_every_capture_cut_anywhere(name: str, seed: int, piece: int) -> None:
    observer = twin()
    replay(rechunked(CAPTURED[name], random.Random(seed), piece), observer)
    observer.assert_same()


def timeout_value(draw: st.DrawFn) -> str | None:
    return draw(st.sampled_from([None, "50m", "1S", "99999999n", "100u", "x", "1", "123456789S"]))


def headers_frames(draw: st.DrawFn, stream: int, block: bytes, end_stream: bool) -> bytes:
    """A header block as HEADERS (padded, with priority, or not) and CONTINUATIONs."""
    flags = 0x1 if end_stream else 0
    head = block
    if draw(st.booleans()):
        if draw(st.booleans()):
            flags |= 0x20
            head = bytes(5) + head  # the priority fields come before the block
        if draw(st.booleans()):
            pad = draw(st.integers(0, 3))
            flags |= 0x8
            head = bytes([pad]) + head + bytes(pad)
    pieces = draw(st.integers(1, 3))
    if pieces == 1 or len(block) < pieces:
        return frame(1, flags | 0x4, stream, head)
    # Only unpadded, unprioritized blocks are cut: the cut is in the block itself.
    cut = [len(block) * i // pieces for i in range(pieces + 1)]
    out = frame(1, 0x1 if end_stream else 0, stream, block[: cut[1]])
    for i in range(1, pieces):
        out += frame(9, 0x4 if i == pieces - 1 else 0, stream, block[cut[i] : cut[i + 1]])
    return out


@st.composite
def one_step(
    draw: st.DrawFn, encoders: dict[int, hpack.Encoder], streams: list[int], responded: set[int]
) -> tuple[int, bytes]:
    """One thing a client or a server does on a gRPC connection, as frames."""
    kind = draw(
        st.sampled_from(
            ["request", "request", "response", "message", "message", "trailers", "trailers",
             "reset", "settings", "ping", "window", "goaway", "priority", "unknown", "push"]
        )
    )  # fmt: skip
    stream = draw(st.sampled_from(streams)) if streams else 1
    if kind == "request":
        stream = streams[-1] + 2 if streams else 1
        streams.append(stream)
        path = "/proto.StepRunner/" + draw(st.sampled_from([*METHODS, "Nope"]))
        encoder = encoders[CLIENT]
        if draw(st.integers(0, 9)) == 3:
            encoder.header_table_size = draw(st.sampled_from([0, 64, 4096]))
        block = bytes(
            encoder.encode(request_headers(path, timeout_value(draw)), huffman=draw(st.booleans()))
        )
        body = frame(0, 0x1, stream, grpc_message(draw(st.sampled_from(PAYLOADS))))
        return CLIENT, headers_frames(draw, stream, block, False) + body
    if kind in ("response", "trailers"):
        if kind == "trailers" and responded and draw(st.integers(0, 3)):
            stream = draw(st.sampled_from(sorted(responded)))
        if kind == "response":
            responded.add(stream)
            status = draw(st.sampled_from(["200", "200", "404", "503", "abc"]))
            ctype = draw(st.sampled_from(["application/grpc", "application/grpc", "text/html"]))
            headers = [(":status", status), ("content-type", ctype)]
        else:
            code = draw(st.sampled_from(["0", "0", "1", "4", "13", "14", "99", "2147483648", "x"]))
            headers = [("grpc-status", code), ("grpc-message", draw(st.text(max_size=8)))]
        encoder = encoders[SERVER]
        if draw(st.integers(0, 9)) == 3:
            encoder.header_table_size = draw(st.sampled_from([0, 64, 4096]))
        block = bytes(encoder.encode(headers, huffman=draw(st.booleans())))
        return SERVER, headers_frames(draw, stream, block, kind == "trailers")
    if kind == "message":
        payload = b"".join(
            grpc_message(m) for m in draw(st.lists(st.sampled_from(PAYLOADS), max_size=3))
        )
        flags = 0x1 if draw(st.integers(0, 9)) == 3 else 0
        if draw(st.booleans()):
            pad = draw(st.integers(0, 4))
            flags |= 0x8
            payload = bytes([pad]) + payload + bytes(pad)
        return SERVER, frame(0, flags, stream, payload)
    side = draw(st.sampled_from([CLIENT, SERVER]))
    if kind == "reset":
        return side, frame(3, 0, stream, draw(st.integers(0, 14)).to_bytes(4, "big"))
    if kind == "settings":
        pairs = draw(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**32 - 1)), max_size=3))
        if draw(st.booleans()):
            return side, frame(4, 0x1, 0)
        return side, frame(
            4, 0, 0, b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs)
        )
    if kind == "ping":
        return side, frame(6, draw(st.sampled_from([0, 1])), 0, bytes(8))
    if kind == "window":
        return side, frame(8, 0, draw(st.sampled_from([0, stream])), (65535).to_bytes(4, "big"))
    if kind == "goaway":
        last = draw(st.sampled_from([0, stream, 2**31 - 1]))
        debug = draw(st.binary(max_size=4))
        return SERVER, frame(
            7, 0, 0, last.to_bytes(4, "big") + draw(st.integers(0, 14)).to_bytes(4, "big") + debug
        )
    if kind == "priority":
        return side, frame(2, 0, stream, bytes(5))
    if kind == "push":
        block = bytes(encoders[SERVER].encode([(":path", "/x")]))
        return SERVER, frame(5, 0x4, stream, (stream + 1).to_bytes(4, "big") + block)
    return side, frame(
        draw(st.integers(10, 255)), draw(st.integers(0, 255)), stream, draw(st.binary(max_size=12))
    )


def spoiled(draw: st.DrawFn, data: bytes) -> bytes:
    """The frames of a step, wrong in one way."""
    how = draw(st.sampled_from(["cut", "flip", "random", "length", "flags"]))
    if how == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    if how == "random":
        return draw(st.binary(min_size=1, max_size=32))
    if how == "length":
        return bytes([0, 0, draw(st.integers(0, 255))]) + data[3:]
    return data[:4] + bytes([draw(st.integers(0, 255))]) + data[5:]


@st.composite
def connection(draw: st.DrawFn) -> list[Record]:
    """A connection's records: mostly what gRPC peers write, spoiled now and then."""
    encoders = {CLIENT: hpack.Encoder(), SERVER: hpack.Encoder()}
    streams: list[int] = []
    responded: set[int] = set()
    records = [Record(CLIENT, 0.0, PREFACE + frame(4, 0, 0)), Record(SERVER, 0.0, frame(4, 0, 0))]
    for i in range(draw(st.integers(0, 24))):
        direction, data = draw(one_step(encoders, streams, responded))
        if draw(st.integers(0, 29)) == 7:
            data = spoiled(draw, data)
        records.append(Record(direction, 0.01 * i, data))
    if draw(st.booleans()):
        records.append(Record(2, 1.0, b""))
    seed, piece = draw(st.integers(0, 2**32)), draw(st.integers(1, 96))
    return list(rechunked(records, random.Random(seed), piece))


@EXAMPLES
@given(
    records=connection(),
    limits=st.sampled_from([{}, {"max_connection_bytes": 3000}, {"max_message_bytes": 8}]),
)
def test_generated_frame_streams(records: list[Record], limits: dict[str, int]) -> None:
    observer = twin(**limits)
    replay(records, observer)
    observer.assert_same()


@EXAMPLES
@given(
    chunks=st.lists(
        st.tuples(st.sampled_from([CLIENT, SERVER]), st.binary(max_size=64)), max_size=12
    )
)
def test_arbitrary_bytes_after_a_valid_start(chunks: list[tuple[int, bytes]]) -> None:
    observer = twin()
    observer.client_data(PREFACE + frame(4, 0, 0), 0.0)
    for direction, data in chunks:
        (observer.client_data if direction == CLIENT else observer.server_data)(data, 0.5)
    observer.connection_lost(1.0)
    observer.assert_same()
