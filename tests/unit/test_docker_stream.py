"""The stdcopy demultiplexer of the docker tap (exporter/taps/docker_stream.py)."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.taps.docker_stream import StdcopyDemultiplexer, StreamError


def stdcopy(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


class Out:
    def __init__(self) -> None:
        self.pieces: list[memoryview] = []
        self.errors: list[StreamError] = []

    def __call__(self, piece: memoryview, now: float) -> None:
        assert isinstance(piece, memoryview)
        self.pieces.append(piece)

    def error(self, exc: StreamError) -> None:
        self.errors.append(exc)

    @property
    def data(self) -> bytes:
        return b"".join(bytes(p) for p in self.pieces)


def demux() -> tuple[StdcopyDemultiplexer, Out]:
    out = Out()
    return StdcopyDemultiplexer(out, out.error), out


# stdout frames of the size the daemon writes (32 KiB), stderr between them, an empty
# frame, a stdin-type and a systemerr-type frame: only stdout comes out.
STDOUT = bytes(range(256)) * 300
STREAM = (
    stdcopy(1, STDOUT[:32768])
    + stdcopy(2, b"warning: on stderr\n")
    + stdcopy(1, b"")
    + stdcopy(1, STDOUT[32768:40000])
    + stdcopy(0, b"stdin?")
    + stdcopy(3, b"exec failed")
    + stdcopy(1, STDOUT[40000:])
)


def test_stdout_payloads_come_out_as_one_continuous_stream() -> None:
    d, out = demux()
    d.feed(STREAM, 1.0)
    assert out.data == STDOUT
    assert not out.errors


def test_split_at_every_byte_boundary() -> None:
    small = stdcopy(1, b"abc") + stdcopy(2, b"err") + stdcopy(1, b"defgh")
    for cut in range(len(small) + 1):
        d, out = demux()
        d.feed(small[:cut], 1.0)
        d.feed(small[cut:], 2.0)
        assert out.data == b"abcdefgh", cut
        assert not out.errors


def test_one_byte_at_a_time() -> None:
    d, out = demux()
    for i in range(len(STREAM[:50000])):
        d.feed(STREAM[i : i + 1], 0.0)
    d.feed(STREAM[50000:], 0.0)
    assert out.data == STDOUT


def test_one_piece_per_chunk_a_view_when_it_holds_one_payload() -> None:
    d, out = demux()
    frame = stdcopy(1, b"x" * 1000)
    d.feed(frame[:500], 0.0)
    d.feed(frame[500:], 0.0)
    assert [p.obj for p in out.pieces] == [frame[:500], frame[500:]]  # no copies
    # Several payloads in one read are handed on joined: each piece boundary would cut
    # an HTTP/2 frame the observer must reassemble.
    chunk = stdcopy(1, b"y" * 10) + stdcopy(2, b"e") + stdcopy(1, b"z" * 5)
    d.feed(chunk, 0.0)
    assert len(out.pieces) == 3 and bytes(out.pieces[2]) == b"y" * 10 + b"z" * 5


def test_a_frame_cut_anywhere_is_handed_on_as_it_arrives() -> None:
    d, out = demux()
    frame = stdcopy(1, b"0123456789")
    d.feed(frame[:12], 0.0)
    assert out.data == b"0123"  # no waiting for the frame's end
    d.feed(frame[12:], 0.0)
    assert out.data == b"0123456789"


def test_not_stdcopy_is_reported_once_and_nothing_after_it_comes_out() -> None:
    for bad in (b"\x05\x00\x00\x00\x00\x00\x00\x01x", b"\x01\x00\x01\x00\x00\x00\x00\x01x"):
        d, out = demux()
        d.feed(stdcopy(1, b"ok") + bad, 0.0)
        d.feed(stdcopy(1, b"after"), 0.0)
        assert out.data == b"ok"
        assert len(out.errors) == 1


def test_http2_bytes_without_stdcopy_headers_are_an_error() -> None:
    d, out = demux()
    d.feed(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00" * 6, 0.0)
    assert len(out.errors) == 1 and out.data == b""
    d2, out2 = demux()
    d2.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0.0)
    assert len(out2.errors) == 1 and out2.data == b""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_random_splits(cuts: list[int]) -> None:
    d, out = demux()
    points = [0, *sorted(cuts), len(STREAM)]
    for start, stop in itertools.pairwise(points):
        d.feed(STREAM[start:stop], 0.0)
    assert out.data == STDOUT
    assert not out.errors


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_bytes_never_raise(data: bytes) -> None:
    d, out = demux()
    d.feed(data, 0.0)
    d.feed(data, 0.0)
    assert len(out.errors) <= 1
