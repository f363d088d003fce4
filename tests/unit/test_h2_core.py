"""The compiled frame walker (exporter._h2_core.FrameReader) against its reference,
exporter.h2.FrameReader: fed the same bytes in the same pieces, both must make the
same callbacks with the same arguments, ask for the same DATA targets, feed them the
same chunks, take and give the same budget amounts at the same moments, and raise the
same H2Error at the same feed."""

from __future__ import annotations

import gc
import itertools
import struct
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from random import Random
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter import h2, native
from exporter.h2 import PREFACE, Budget, H2Error
from tests.compiled import compiled_part
from tests.wire import frame

from .captures import (
    CLIENT,
    SERVER,
    RecordingSink,
    capture_files,
    load_manifest,
    observe,
    read_h2cap,
    rechunked,
)

core = compiled_part("_h2_core")

Event = tuple[Any, ...]
Reader = Callable[..., Any]
READERS: tuple[Reader, Reader] = (h2.FrameReader, core.FrameReader)

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
BIG_BUDGET = 1 << 62


class CallbackError(Exception):
    """What a recorder raises at a chosen callback: it must come out of feed."""


class LoggedBudget(Budget):
    """A Budget whose take and give calls go into the shared log, in order."""

    __slots__ = ("log",)

    def __init__(self, total: int, log: list[Event]) -> None:
        super().__init__(total)
        self.log = log

    def take(self, size: int) -> bool:
        taken = super().take(size)
        self.log.append(("take", size, taken, self.left))
        return taken

    def give(self, size: int) -> None:
        super().give(size)
        self.log.append(("give", size, self.left))


class Recorder:
    """Logs every callback of one reader, with its arguments (their exact types too)
    and the budget's `left` at that moment; raises CallbackError at event `raise_at`."""

    def __init__(
        self, log: list[Event], budget: Budget, none_streams: frozenset[int], raise_at: int
    ) -> None:
        self.log = log
        self.budget = budget
        self.none_streams = none_streams
        self.raise_at = raise_at
        self.events = 0
        self.targets: dict[int, Callable[[memoryview], None]] = {}

    def event(self, *what: Any) -> None:
        self.log.append((*what, self.budget.left))
        self.events += 1
        if self.events == self.raise_at:
            raise CallbackError(f"raised at event {self.events}")

    def on_headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        self.event("headers", stream_id, type(block), block, type(end_stream), end_stream)

    def data_target(self, stream_id: int) -> Callable[[memoryview], None] | None:
        self.event("target", stream_id)
        if stream_id in self.none_streams:
            return None
        if stream_id not in self.targets:

            def feed(chunk: memoryview) -> None:
                self.event("data", stream_id, type(chunk), bytes(chunk))

            self.targets[stream_id] = feed
        return self.targets[stream_id]

    def on_data_end(self, stream_id: int) -> None:
        self.event("data_end", stream_id)

    def on_rst_stream(self, stream_id: int, code: int) -> None:
        self.event("rst_stream", stream_id, code)

    def on_settings(self, ack: bool, values: list[tuple[int, int]]) -> None:
        self.event("settings", type(ack), ack, type(values), [tuple(v) for v in values])

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        self.event("goaway", last_stream_id, code)

    def on_push_promise(self, block: bytes) -> None:
        self.event("push_promise", type(block), block)


def walk(
    reader_type: Reader,
    chunks: Sequence[bytes | bytearray | memoryview],
    *,
    preface: bool,
    total: int = BIG_BUDGET,
    none_streams: frozenset[int] = frozenset(),
    raise_at: int = 0,
    defaults: bool = False,
) -> list[Event]:
    """Everything one reader did with `chunks`, fed one by one: its callbacks, its
    budget traffic, and after each feed the budget's left and its `held`, or the
    exception that feed raised (then nothing more is fed)."""
    log: list[Event] = []
    budget = LoggedBudget(total, log)
    rec = Recorder(log, budget, none_streams, raise_at)
    required: dict[str, Any] = {
        "preface": preface,
        "on_headers": rec.on_headers,
        "data_target": rec.data_target,
        "on_data_end": rec.on_data_end,
    }
    optional: dict[str, Any] = {
        "on_rst_stream": rec.on_rst_stream,
        "on_settings": rec.on_settings,
        "on_goaway": rec.on_goaway,
        "on_push_promise": rec.on_push_promise,
        "budget": budget,
    }
    reader = reader_type(**required) if defaults else reader_type(**required, **optional)
    for index, chunk in enumerate(chunks):
        try:
            reader.feed(chunk)
        except (H2Error, CallbackError) as exc:
            log.append(("raised", index, type(exc), str(exc)))
            break
        log.append(("fed", index, budget.left, reader.held))
    return log


def assert_same(chunks: Sequence[bytes | bytearray | memoryview], **options: Any) -> list[Event]:
    python, compiled = (walk(reader, chunks, **options) for reader in READERS)
    assert compiled == python
    return python


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def directions() -> Iterator[tuple[str, bool, bytes, list[bytes]]]:
    """(name, preface, all bytes, as recorded) of both directions of every capture."""
    for path in capture_files():
        records = read_h2cap(path)
        for direction, preface in ((CLIENT, True), (SERVER, False)):
            pieces = [r.data for r in records if r.direction == direction]
            yield f"{path.name}:{direction}", preface, b"".join(pieces), pieces


DIRECTIONS = list(directions())


# -- the recorded captures ----------------------------------------------------------


def test_the_corpus_is_all_there() -> None:
    assert len(DIRECTIONS) == 2 * len(load_manifest()["files"]) >= 60


@pytest.mark.parametrize(
    ("name", "preface", "data", "pieces"), [pytest.param(*d, id=d[0]) for d in DIRECTIONS]
)
def test_captures_as_recorded(name: str, preface: bool, data: bytes, pieces: list[bytes]) -> None:
    log = assert_same(pieces, preface=preface)
    assert log[-1][0] == "fed", name  # every capture is HTTP/2 the walker follows
    assert any(event[0] == "headers" for event in log)
    # The small ones one byte at a time: every frame split at every point.
    if len(data) <= 8192:
        assert_same([data[i : i + 1] for i in range(len(data))], preface=preface)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.sampled_from(range(len(DIRECTIONS))),
    cuts=st.lists(st.integers(min_value=0), max_size=40),
    total=st.sampled_from([BIG_BUDGET, 0, 8, 64, 200, 1 << 12]),
    none_streams=st.frozensets(st.sampled_from([1, 3, 5, 7, 9, 11])),
    as_type=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_captures_split_anywhere(
    which: int,
    cuts: list[int],
    total: int,
    none_streams: frozenset[int],
    as_type: Callable[[bytes], bytes | bytearray | memoryview],
) -> None:
    _name, preface, data, _pieces = DIRECTIONS[which]
    chunks = [as_type(c) for c in split(data, cuts)]
    assert_same(chunks, preface=preface, total=total, none_streams=none_streams)


def test_default_callbacks_and_budget() -> None:
    for _name, preface, data, pieces in DIRECTIONS:
        assert_same(pieces, preface=preface, defaults=True)
        assert_same(split(data, [7, 100, 1000]), preface=preface, defaults=True)


class PlainDecoder:
    """hpack.Decoder called as the observer calls its core's decoder, so that the
    frame walker is the only part that differs between the two observers below."""

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)

    @property
    def max_allowed_table_size(self) -> int:
        return int(self._decoder.max_allowed_table_size)

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self._decoder.max_allowed_table_size = value

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        return [(bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True)]


def sink_record(sink: RecordingSink) -> tuple[Any, ...]:
    return sink.started, sink.ended, sink.decode_errors, sink.unknown


@pytest.mark.parametrize("path", capture_files(), ids=lambda p: p.name)
def test_the_observer_concludes_the_same_with_either_walker(path: Any) -> None:
    """The whole observer (its bound methods as callbacks, its message assemblers as
    DATA targets, its budget) gives the same events with the compiled walker."""
    records = read_h2cap(path)
    for limit, pieces in ((16 << 20, records), (3000, list(rechunked(records, Random(7), 300)))):
        results = []
        for reader in READERS:
            core = native.Core(decoder=PlainDecoder, frame_reader=reader)
            observer, sink = observe(pieces, core=core, max_connection_bytes=limit)
            results.append((sink_record(sink), observer.failed, observer.held_bytes))
        assert results[1] == results[0]
        assert results[0][0][1], "every capture has calls"


# -- generated frame streams ---------------------------------------------------------

STREAMS = st.sampled_from([0, 1, 3, 5, 0x7FFFFFFF, 0x80000003])
FLAGS = st.one_of(
    st.sampled_from([0, END_STREAM, END_HEADERS, END_STREAM | END_HEADERS, PADDED]),
    st.sampled_from([PADDED | END_HEADERS, PRIORITY_FLAG | END_HEADERS, 0x2D, 0x29, 0x25]),
    st.integers(min_value=0, max_value=255),
)
FIXED = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}


@st.composite
def payloads(draw: st.DrawFn, ftype: int, flags: int) -> bytes:
    """A payload of the type's shape (most of the time) or any bytes."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=30))
    body = draw(st.binary(max_size=24))
    if ftype in FIXED:
        size = FIXED[ftype] if draw(st.booleans()) else draw(st.integers(0, 10))
        return draw(st.binary(min_size=size, max_size=size))
    if ftype == SETTINGS:
        if flags & ACK:
            return b""
        count = draw(st.integers(0, 4))
        return b"".join(
            struct.pack(">HI", draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFFFFFF)))
            for _ in range(count)
        )
    if ftype == GOAWAY:
        fixed = struct.pack(">II", draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 20)))
        return fixed + draw(st.binary(max_size=12))
    if ftype == HEADERS and flags & PRIORITY_FLAG:
        body = draw(st.binary(min_size=0, max_size=7)) + body
    if ftype == PUSH_PROMISE:
        body = draw(st.binary(min_size=0, max_size=6)) + body
    if flags & PADDED and ftype in (DATA, HEADERS, PUSH_PROMISE):
        pad = draw(st.integers(0, 8))
        body = bytes([pad]) + body + bytes(pad if draw(st.booleans()) else 0)
    return body


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    ftype = draw(st.one_of(st.integers(0, 9), st.sampled_from([0x0A, 0x10, 0xFF])))
    flags = draw(FLAGS)
    payload = draw(payloads(ftype, flags))
    raw = frame(ftype, flags, draw(STREAMS), payload)
    if draw(st.integers(0, 15)) == 0:  # a declared length that is not the payload's
        declared = draw(st.one_of(st.integers(0, 40), st.just(0xFFFFFF)))
        raw = declared.to_bytes(3, "big") + raw[3:]
    return raw


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    """HEADERS or PUSH_PROMISE and CONTINUATIONs, ended or interrupted."""
    stream = draw(st.sampled_from([1, 3, 0]))
    push = draw(st.booleans())
    flags = draw(st.sampled_from([0, END_STREAM, PADDED, PRIORITY_FLAG, 0x29]))
    if push:
        first = frame(PUSH_PROMISE, flags & ~PRIORITY_FLAG, stream, draw(payloads(5, flags)))
    else:
        first = frame(HEADERS, flags, stream, draw(payloads(HEADERS, flags)))
    out = [first]
    for i in range(draw(st.integers(0, 4))):
        on = stream if draw(st.integers(0, 6)) else draw(STREAMS)
        last = draw(st.booleans())
        more = draw(st.binary(max_size=20))
        out.append(frame(CONTINUATION, END_HEADERS if last else 0, on, more))
        if draw(st.integers(0, 5)) == 0:
            out.append(draw(frames()))  # interrupts the block (or follows its end)
        if last and i:
            break
    return b"".join(out)


@st.composite
def data_runs(draw: st.DrawFn) -> bytes:
    """Runs of unpadded DATA on one stream (looked up once a run), END_STREAM anywhere."""
    stream = draw(st.sampled_from([1, 3, 5]))
    run = [
        frame(DATA, draw(st.sampled_from([0, 0, END_STREAM])), stream, draw(st.binary(max_size=30)))
        for _ in range(draw(st.integers(1, 5)))
    ]
    return b"".join(run)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bool, bytes]:
    parts = draw(st.lists(st.one_of(frames(), header_blocks(), data_runs()), max_size=12))
    preface = draw(st.booleans())
    start = b""
    if preface:
        wrong = [PREFACE[:10], b"GET / HTTP/1.1\r\n", PREFACE[:-1] + b"X"]
        start = draw(st.sampled_from([PREFACE, PREFACE, PREFACE, *wrong]))
    data = start + b"".join(parts)
    if draw(st.integers(0, 5)) == 0:  # truncated
        data = data[: draw(st.integers(0, len(data)))]
    return preface, data


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=streams(),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
    bytewise=st.integers(0, 9),
    total=st.one_of(st.just(BIG_BUDGET), st.integers(0, 80)),
    none_streams=st.frozensets(st.sampled_from([1, 3, 5, 0x7FFFFFFF])),
    raise_at=st.one_of(st.just(0), st.integers(1, 12)),
    as_type=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_generated_frames(
    stream: tuple[bool, bytes],
    cuts: list[int],
    bytewise: int,
    total: int,
    none_streams: frozenset[int],
    raise_at: int,
    as_type: Callable[[bytes], bytes | bytearray | memoryview],
) -> None:
    preface, data = stream
    pieces = [data[i : i + 1] for i in range(len(data))] if bytewise == 0 else split(data, cuts)
    assert_same(
        [as_type(p) for p in pieces],
        preface=preface,
        total=total,
        none_streams=none_streams,
        raise_at=raise_at,
    )


def test_each_h2error_of_the_reference_is_reached() -> None:
    """The generated cases above are only as good as the paths they reach: these
    hand-made ones hit every message the reference raises, on both readers."""
    settings_frame = frame(SETTINGS, 0, 0)
    cases = {
        "missing client preface": (True, b"PRI * HTTP/1.1"),
        "bad PING length 7": (False, frame(PING, 0, 0, bytes(7))),
        "DATA on stream 0": (False, frame(DATA, 0, 0, b"x")),
        "SETTINGS on a stream": (False, frame(SETTINGS, 0, 1)),
        "bad SETTINGS length": (False, frame(SETTINGS, ACK, 0, bytes(6))),
        "GOAWAY truncated": (False, frame(GOAWAY, 0, 0, bytes(7))),
        "bad padding": (False, frame(DATA, PADDED, 1, b"\x05abc")),
        "header block interrupted": (False, frame(HEADERS, 0, 1, b"a") + settings_frame),
        "CONTINUATION without HEADERS": (False, frame(CONTINUATION, END_HEADERS, 1, b"a")),
        "HEADERS priority truncated": (False, frame(HEADERS, 0x24, 1, b"abcd")),
        "bad PUSH_PROMISE": (False, frame(PUSH_PROMISE, END_HEADERS, 1, b"abc")),
        "header block over the connection's memory budget": (
            False,
            frame(HEADERS, 0, 1, bytes(50)),
        ),
        "a 20-byte frame is over the connection's memory budget": (
            False,
            frame(HEADERS, END_HEADERS, 1, bytes(20))[:15],
        ),
    }
    for message, (preface, data) in cases.items():
        log = assert_same([data], preface=preface, total=16)
        assert log[-1][0] == "raised" and log[-1][3] == message, (message, log)
        assert_same([data[:12], data[12:]], preface=preface, total=16)
    too_large = frame(HEADERS, 0, 1, bytes(1 << 23)) + frame(CONTINUATION, 0, 1, bytes(1 << 23))
    log = assert_same([too_large + frame(CONTINUATION, 0, 1, b"x")], preface=False)
    assert log[-1][3] == "header block too large"


# -- the C object itself -------------------------------------------------------------


def _noop(*_: object) -> None:
    return None


def test_constructor_is_keyword_only_with_the_same_required_arguments() -> None:
    required: dict[str, Any] = {
        "preface": False,
        "on_headers": _noop,
        "data_target": _noop,
        "on_data_end": _noop,
    }
    for reader in READERS:
        with pytest.raises(TypeError):
            reader(False, _noop, _noop, _noop)
        for name in required:
            with pytest.raises(TypeError):
                reader(**{k: v for k, v in required.items() if k != name})
        with pytest.raises(TypeError):
            reader(**required, on_anything=_noop)
        assert reader(**required, budget=None).held == 0


def test_held_counts_a_split_frame_and_a_waiting_block() -> None:
    for reader_type in READERS:
        budget = Budget(1000)
        reader = reader_type(
            preface=False, on_headers=_noop, data_target=_noop, on_data_end=_noop, budget=budget
        )
        tail = frame(CONTINUATION, END_HEADERS, 1, bytes(12))
        reader.feed(frame(HEADERS, 0, 1, bytes(30)) + tail[:15])
        assert (reader.held, budget.left) == (42, 958)
        reader.feed(tail[15:])
        assert (reader.held, budget.left) == (0, 1000)


def test_a_kept_chunk_keeps_its_bytes() -> None:
    """A target must not keep a chunk past its call; one that does still reads the
    bytes it was given, not freed memory."""
    kept: list[memoryview] = []
    reader = core.FrameReader(
        preface=False, on_headers=_noop, data_target=lambda _s: kept.append, on_data_end=_noop
    )
    reader.feed(bytearray(frame(DATA, 0, 1, b"hello") + frame(DATA, 0, 1, b"world")[:12]))
    reader.feed(b"ld")
    gc.collect()
    assert [bytes(chunk) for chunk in kept] == [b"hello", b"wor", b"ld"]


def test_feed_takes_bytes_like_objects_only() -> None:
    reader = core.FrameReader(preface=False, on_headers=_noop, data_target=_noop, on_data_end=_noop)
    with pytest.raises(TypeError):
        reader.feed("not bytes")
    # A memoryview of another format is walked as its bytes.
    reader.feed(memoryview(frame(PING, 0, 0, bytes(8)) + bytes(3)).cast("I"))
    assert reader.held == 0


def test_a_callback_cannot_feed_its_own_reader() -> None:
    """Two walks interleaved on one reader would be nonsense (the Python reader has no
    guard and gets it wrong); the compiled one refuses instead of corrupting itself."""
    seen: list[BaseException] = []

    def headers(_stream: int, _block: bytes, _end: bool) -> None:
        try:
            reader.feed(frame(PING, 0, 0, bytes(8)))
        except RuntimeError as exc:
            seen.append(exc)

    reader = core.FrameReader(
        preface=False, on_headers=headers, data_target=_noop, on_data_end=_noop
    )
    reader.feed(frame(HEADERS, END_HEADERS, 1, b"a") + frame(PING, 0, 0, bytes(8)))
    assert len(seen) == 1
    reader.feed(frame(HEADERS, END_HEADERS, 1, b"a"))  # still walking, from where it was
    assert len(seen) == 2


def test_a_reader_in_a_cycle_with_its_owner_is_collected() -> None:
    class Owner:
        def __init__(self) -> None:
            self.reader = core.FrameReader(
                preface=True,
                on_headers=self.headers,
                data_target=self.target,
                on_data_end=self.end,
                on_settings=self.settings,
            )

        def headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
            pass

        def target(self, stream_id: int) -> Callable[[memoryview], None]:
            return self.data

        def data(self, chunk: memoryview) -> None:
            pass

        def end(self, stream_id: int) -> None:
            pass

        def settings(self, ack: bool, values: list[tuple[int, int]]) -> None:
            pass

    owner = Owner()
    # Mid-frame, so the reader also holds a DATA target (a bound method of the owner).
    owner.reader.feed(PREFACE + frame(DATA, 0, 1, b"abcdef")[:12])
    alive = weakref.ref(owner)
    del owner
    gc.collect()
    assert alive() is None


def test_no_object_leaks_over_many_feeds() -> None:
    """Every path (whole and split frames, blocks, errors, callbacks that raise) run
    many times leaves the number of allocated objects where it was."""
    block = frame(HEADERS, PADDED | PRIORITY_FLAG, 1, b"\x02" + bytes(5) + b"abc\0\0")
    mixed = (
        PREFACE
        + frame(SETTINGS, 0, 0, bytes(12))
        + block
        + frame(CONTINUATION, END_HEADERS, 1, b"def")
        + frame(DATA, 0, 1, b"x" * 40)
        + frame(DATA, PADDED | END_STREAM, 1, b"\x03abc\0\0\0")
        + frame(PING, 0, 0, bytes(8))
        + frame(0x20, 0, 0, b"unknown")
        + frame(GOAWAY, 0, 0, bytes(8) + b"debug")
        + frame(RST_STREAM, 0, 3, bytes(4))
        + frame(PUSH_PROMISE, END_HEADERS, 1, bytes(4) + b"pp")
    )

    def once() -> None:
        for size in (1, 7, 64, len(mixed)):
            walk(core.FrameReader, split(mixed, list(range(size, len(mixed), size))), preface=True)
        walk(core.FrameReader, [mixed, frame(DATA, 0, 0, b"x")], preface=True)
        walk(core.FrameReader, [mixed], preface=True, raise_at=9)
        walk(core.FrameReader, [mixed[:40], mixed[40:]], preface=True, total=20)

    for _ in range(20):
        once()
    gc.collect()
    before = sys.getallocatedblocks()
    for _ in range(300):
        once()
    gc.collect()
    assert sys.getallocatedblocks() - before < 50
