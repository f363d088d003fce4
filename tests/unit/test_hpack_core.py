"""The compiled HPACK decoder (exporter._hpack_core) against hpack's, its reference.

Step by step over generated sequences of blocks (written by hpack's encoder, mangled
or hostile) and of changes to the decoders' limits, both decoders must return the same
headers and hold the same table, or raise the same exception class; and so over every
header block of every recorded capture.
"""

from __future__ import annotations

import copy
import gc
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import hpack
import pytest
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter import _hpack_huffman
from exporter.h2 import MAX_HEADER_BLOCK, SETTINGS_HEADER_TABLE_SIZE, FrameReader
from tests.compiled import compiled_part

from .captures import CLIENT, SERVER, capture_files, read_h2cap

Headers = list[tuple[bytes, bytes]]


@pytest.fixture(scope="module")
def core() -> Any:
    return compiled_part("_hpack_core")


class Pair:
    """hpack's decoder and the compiled one, fed the same."""

    def __init__(self, core: Any, max_header_list_size: int = 65536) -> None:
        self.ref = hpack.Decoder(max_header_list_size=max_header_list_size)
        self.mine = core.Decoder(max_header_list_size=max_header_list_size)
        self.check_state()

    def decode(self, block: bytes) -> Headers | type[Exception]:
        """The headers both decode, or the exception class both raise."""
        want: Headers | type[Exception]
        got: Headers | type[Exception]
        try:
            want = [tuple(h) for h in self.ref.decode(block, raw=True)]  # type: ignore[misc]
        except Exception as exc:
            want = type(exc)
        try:
            got = self.mine.decode(block)
        except Exception as exc:
            got = type(exc)
        assert got == want, block
        if isinstance(got, list):
            assert all(type(h) is tuple and len(h) == 2 for h in got)
            assert all(type(n) is bytes and type(v) is bytes for n, v in got)
            self.check_state()
        else:
            assert issubclass(got, hpack.HPACKError)
        return got

    def set(self, attribute: str, value: int) -> None:
        setattr(self.ref, attribute, value)
        setattr(self.mine, attribute, value)
        self.check_state()

    def check_state(self) -> None:
        ref, mine = self.ref, self.mine
        assert mine.dynamic_entries == tuple(ref.header_table.dynamic_entries)
        assert mine.header_table_size == ref.header_table_size
        assert mine.max_allowed_table_size == ref.max_allowed_table_size
        assert mine.max_header_list_size == ref.max_header_list_size


# -- generated sequences -----------------------------------------------------------------

_NAMES = st.one_of(
    st.sampled_from(
        [b":path", b":method", b":authority", b"grpc-timeout", b"content-type", b"te", b"x-y"]
    ),
    st.binary(max_size=12),
    st.binary(min_size=60, max_size=400),
)
_VALUES = st.one_of(
    st.sampled_from([b"", b"POST", b"/gitlab.step.Runner/Run", b"99m", b"application/grpc"]),
    st.binary(max_size=16),
    st.binary(min_size=100, max_size=2000),
)
_HEADER = st.builds(
    lambda name, value, never: (
        hpack.NeverIndexedHeaderTuple(name, value) if never else (name, value)
    ),
    _NAMES,
    _VALUES,
    st.booleans(),
)
_HEADERS = st.lists(_HEADER, max_size=8)


def _varint(prefix: int, bits: int, value: int) -> bytes:
    encoded = encode_integer(value, bits)
    encoded[0] |= prefix
    return bytes(encoded)


# A prefix byte with its integer's prefix all ones: continuation octets follow.
_FULL_PREFIXES = [0xFF, 0x7F, 0x3F | 0x40, 0x1F | 0x20, 0x0F, 0x1F]
_crafted_integer = st.builds(
    lambda first, low_bits, stop, tail: (
        bytes([first])
        + bytes((b & 0x7F) | 0x80 for b in low_bits[:-1])
        + bytes([(low_bits[-1] & 0x7F) | (0 if stop else 0x80)])
        + tail
    ),
    st.sampled_from(_FULL_PREFIXES),
    st.lists(st.integers(0, 255), min_size=1, max_size=8),
    st.booleans(),
    st.binary(max_size=6),
)
_bad_index = st.one_of(
    st.just(b"\x80"),
    st.integers(55, 400).map(lambda i: _varint(0x80, 7, i)),
    st.integers(55, 400).map(lambda i: _varint(0x40, 6, i) + b"\x01v"),
    st.integers(10, 400).map(lambda i: _varint(0x00, 4, i) + b"\x00"),
)
_random_huffman = st.one_of(
    st.binary(max_size=126).map(lambda s: b"\x00" + bytes([0x80 | len(s)]) + s + b"\x00"),
    st.binary(max_size=126).map(lambda s: b"\x44" + bytes([0x80 | len(s)]) + s),
    st.binary(max_size=126).map(lambda s: b"\x10\x01n" + bytes([0x80 | len(s)]) + s),
)
_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
# Valid Huffman strings made invalid at their end: padding of 8 bits or more, not all
# ones, or cut.
_bad_padding = st.builds(
    lambda s, how: b"\x00\x01n" + _string(how(_HUFFMAN.encode(s))),
    st.binary(min_size=1, max_size=20),
    st.sampled_from(
        [
            lambda h: h + b"\xff",
            lambda h: h + b"\xff\xff\xff\xfc",
            lambda h: h[:-1] + bytes([h[-1] & 0xFE]),
            lambda h: h[:-1] + bytes([h[-1] ^ 0x80]),
            lambda h: h[:-1],
            lambda h: h,
        ]
    ),
)
# A size update after a header (an error), or before one (not).
_late_update = st.builds(
    lambda header, update, late: header + update if late else update + header,
    st.sampled_from([b"\x82", b"\x40\x01a\x01b", b"\x00\x01a\x00", b"\x10\x01a\x00"]),
    st.integers(0, 31).map(lambda n: bytes([0x20 | n])),
    st.booleans(),
)
_HOSTILE = st.one_of(
    st.binary(max_size=40),
    _crafted_integer,
    _bad_index,
    _random_huffman,
    _bad_padding,
    _late_update,
)
_STEP = st.one_of(
    st.tuples(st.just("block"), _HEADERS, st.booleans()),
    st.tuples(st.just("block"), _HEADERS, st.booleans()),
    st.tuples(st.just("block"), _HEADERS, st.booleans()),
    st.tuples(st.just("encoder_size"), st.sampled_from([0, 1, 40, 100, 300, 4096, 8192, 70000])),
    st.tuples(st.just("max_allowed_table_size"), st.sampled_from([0, 64, 4096, 8192, 1 << 36])),
    st.tuples(st.just("max_header_list_size"), st.sampled_from([0, 40, 300, 3000, 65536])),
    st.tuples(st.just("header_table_size"), st.integers(-5, 9000)),
    # The header list limit set around what the next block decodes to.
    st.tuples(st.just("tight"), _HEADERS, st.booleans(), st.integers(-1, 1)),
    st.tuples(st.just("raw"), _HOSTILE),
    st.tuples(
        st.just("mangle"),
        _HEADERS,
        st.booleans(),
        st.lists(st.integers(0, 1 << 16), max_size=3),
        st.none() | st.integers(0, 1 << 16) | st.integers(-3, -1),
    ),
)


def _string(data: bytes, *, huffman: bool = True) -> bytes:
    """A string literal of `data` (marked Huffman-coded or not, as it is)."""
    return _varint(0x80 if huffman else 0x00, 7, len(data)) + data


def _mangled(block: bytes, flips: list[int], cut: int | None) -> bytes:
    data = bytearray(block)
    for bit in flips:
        if data:
            data[bit // 8 % len(data)] ^= 1 << (bit % 8)
    if cut is not None:
        # Negative: that many bytes off the end (a string one byte short, say).
        del data[cut if cut < 0 else cut % (len(data) + 1) :]
    return bytes(data)


# Steps at the edges hpack's decoder draws, relative to the decoders' state: an entry
# that fills the table to one byte short, exactly or one over; the last index of the
# table and the first past it; a size update to the allowance or one over; the table
# resized to its limit or its contents, one byte either way.
_EDGE_STEP = st.one_of(
    st.tuples(st.just("fill"), st.integers(-1, 1), st.integers(0, 100), st.booleans()),
    st.tuples(st.just("edge_index"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("edge_update"), st.integers(-1, 1), st.none() | st.integers(0, 5000)),
    st.tuples(st.just("edge_resize"), st.booleans(), st.integers(-1, 1)),
)


def _edge_block(pair: Pair, kind: str, args: list[Any]) -> bytes | None:
    """The block of an edge step (None: the step was a setting)."""
    table = pair.ref.header_table
    used = sum(32 + len(n) + len(v) for n, v in table.dynamic_entries)
    if kind == "fill":
        # What is left of the table, or all of it (the entry then evicts the others,
        # or empties the table when it is larger).
        room = max(0, table.maxsize - (0 if args[2] else used) + args[0] - 32)
        name_length = min(args[1], room)
        name, value = b"n" * name_length, b"v" * (room - name_length)
        return b"\x40" + _string(name, huffman=False) + _string(value, huffman=False)
    if kind == "edge_index":
        index = 61 + len(table.dynamic_entries) + args[0]
        return _varint(0x80, 7, index) if args[1] else _varint(0x40, 6, index) + b"\x00"
    if kind == "edge_update":
        # Each size update is checked, not only the last one.
        update = _varint(0x20, 5, max(0, pair.ref.max_allowed_table_size + args[0]))
        return update if args[1] is None else update + _varint(0x20, 5, args[1])
    pair.set("header_table_size", (table.maxsize if args[0] else used) + args[1])
    return None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(st.one_of(_STEP, _EDGE_STEP), max_size=20),
    max_header_list_size=st.sampled_from([200, 65536]),
)
def test_decodes_as_hpack_step_by_step(
    core: Any, steps: list[tuple[Any, ...]], max_header_list_size: int
) -> None:
    pair = Pair(core, max_header_list_size)
    encoder = hpack.Encoder()
    for kind, *args in steps:
        block: bytes | None
        if kind == "encoder_size":
            encoder.header_table_size = args[0]
            continue
        if kind in ("max_allowed_table_size", "max_header_list_size", "header_table_size"):
            pair.set(kind, args[0])
            continue
        if kind == "raw":
            block = args[0]
        elif kind in ("fill", "edge_index", "edge_update", "edge_resize"):
            block = _edge_block(pair, kind, args)
        else:
            block = bytes(encoder.encode(args[0], huffman=args[1]))
            if kind == "mangle":
                block = _mangled(block, args[2], args[3])
            if kind == "tight":
                try:
                    headers = copy.deepcopy(pair.ref).decode(block, raw=True)
                except hpack.HPACKError:
                    headers = []
                pair.set(
                    "max_header_list_size", sum(32 + len(n) + len(v) for n, v in headers) + args[2]
                )
        if block is not None and not isinstance(pair.decode(block), list):
            return  # the observer stops at the first error, and so do we


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(warm_up=st.lists(_HEADERS, max_size=3), huffman=st.booleans(), block=_HOSTILE)
def test_hostile_blocks_decode_as_hpack(
    core: Any, warm_up: list[list[Any]], huffman: bool, block: bytes
) -> None:
    """A hostile block after a few valid ones (a table to index into)."""
    pair = Pair(core)
    encoder = hpack.Encoder()
    for headers in warm_up:
        assert isinstance(pair.decode(bytes(encoder.encode(headers, huffman=huffman))), list)
    pair.decode(block)


# -- captures ------------------------------------------------------------------------


def _blocks(data: bytes, *, preface: bool) -> Iterator[tuple[str, Any]]:
    """A direction's header blocks and SETTINGS, in order."""
    out: list[tuple[str, Any]] = []
    reader = FrameReader(
        preface=preface,
        on_headers=lambda _stream, block, _end: out.append(("block", bytes(block))),
        data_target=lambda _stream: None,
        on_data_end=lambda _stream: None,
        on_settings=lambda _ack, settings: out.append(("settings", settings)),
        on_push_promise=lambda block: out.append(("block", bytes(block))),
    )
    reader.feed(data)
    return iter(out)


def test_every_capture_decodes_as_hpack(core: Any) -> None:
    blocks = 0
    headers = 0
    for path in capture_files():
        records = read_h2cap(path)
        # One decoder per direction, as the observer has; a side's SETTINGS raise the
        # allowance of the other side's encoder (the observer's _raise_table_limit).
        pairs = {CLIENT: Pair(core, MAX_HEADER_BLOCK), SERVER: Pair(core, MAX_HEADER_BLOCK)}
        for direction, other in ((CLIENT, SERVER), (SERVER, CLIENT)):
            data = b"".join(r.data for r in records if r.direction == direction)
            for kind, arg in _blocks(data, preface=direction == CLIENT):
                if kind == "settings":
                    for identifier, value in arg:
                        if identifier == SETTINGS_HEADER_TABLE_SIZE:
                            limit = max(value, pairs[other].mine.max_allowed_table_size)
                            pairs[other].set("max_allowed_table_size", limit)
                    continue
                decoded = pairs[direction].decode(arg)
                assert isinstance(decoded, list), path.name
                blocks += 1
                headers += len(decoded)
    assert blocks > 50 and headers > 200, (blocks, headers)


# -- the Huffman table -----------------------------------------------------------------


def test_the_huffman_header_is_freshly_generated() -> None:
    assert _hpack_huffman.HEADER.read_text() == _hpack_huffman.render()


def test_the_huffman_machine_is_hpacks(core: Any) -> None:
    """A proof for every input: walked together from their start states, the two
    machines take the same steps (emit, fail, may end) on every nibble."""
    mine = core._huffman_table()
    assert len(mine) == 256 * 16 * 3
    start = (0, 0)
    seen, todo = {start}, [start]
    while todo:
        theirs_state, my_state = todo.pop()
        for nibble in range(16):
            nxt, flags, symbol = HUFFMAN_TABLE[theirs_state * 16 + nibble]
            at = (my_state * 16 + nibble) * 3
            my_next, my_flags, my_symbol = mine[at], mine[at + 1], mine[at + 2]
            if flags & HUFFMAN_FAIL:
                assert my_flags == HUFFMAN_FAIL
                continue
            assert my_flags == flags & (HUFFMAN_COMPLETE | HUFFMAN_EMIT_SYMBOL)
            if flags & HUFFMAN_EMIT_SYMBOL:
                assert my_symbol == symbol
            if (nxt, my_next) not in seen:
                seen.add((nxt, my_next))
                todo.append((nxt, my_next))
    assert len(seen) == 256  # every state of each, paired one to one


# -- hpack's quirks, one by one --------------------------------------------------------


def test_defaults_and_attributes(core: Any) -> None:
    decoder = core.Decoder()
    assert decoder.max_header_list_size == 65536
    assert decoder.max_allowed_table_size == 4096
    assert decoder.header_table_size == 4096
    assert decoder.dynamic_entries == ()
    decoder.max_header_list_size = 10
    decoder.max_allowed_table_size = 1 << 40
    assert (decoder.max_header_list_size, decoder.max_allowed_table_size) == (10, 1 << 40)
    assert core.Decoder(max_header_list_size=7).max_header_list_size == 7
    with pytest.raises(TypeError):
        decoder.max_header_list_size = "10"
    with pytest.raises(AttributeError):
        decoder.dynamic_entries = ()


@pytest.mark.parametrize(
    ("block", "error"),
    [
        (b"\x80", hpack.InvalidTableIndex),
        (b"\xbe", hpack.InvalidTableIndex),  # 62: the empty dynamic table
        (b"\x7e\x01v", hpack.InvalidTableIndex),
        (b"\x82\x20", hpack.HPACKDecodingError),  # a size update after a header
        (b"\xff\x80\x80\x80\x80\x80", hpack.HPACKDecodingError),  # too long
        (b"\xff\x80\x80\x80\x80\x80\x00", hpack.HPACKDecodingError),  # too long, ended
        (b"\xff\x80\x80\x80", hpack.HPACKDecodingError),  # truncated
        (b"\x3f\xff\xff\xff\xff\x01", hpack.InvalidTableSizeError),  # > 32 bits, too big
        (b"\x00\x05ab", hpack.HPACKDecodingError),  # a truncated name
        (b"\x00\x01a", hpack.HPACKDecodingError),  # no value
        (b"\x00\x01a\x02b", hpack.HPACKDecodingError),  # a value one byte short
        (b"\x00\x81\xff\x00", hpack.HPACKDecodingError),  # Huffman: bad padding
        (b"\x00\x84\xff\xff\xff\xff\x00", hpack.HPACKDecodingError),  # Huffman: EOS
    ],
)
def test_errors_as_hpacks(core: Any, block: bytes, error: type[Exception]) -> None:
    pair = Pair(core)
    assert pair.decode(block) is error


def test_integers_past_32_bits_are_hpacks(core: Any) -> None:
    pair = Pair(core)
    pair.set("max_allowed_table_size", 1 << 36)
    update = b"\x3f\xff\xff\xff\xff\x7f"  # 31 + 127 * (1 + 128 + ... + 128**4)
    assert pair.decode(update) == []
    assert pair.mine.header_table_size == 31 + (2**35 - 1) > 2**32


def test_the_allowance_is_checked_again_at_the_end_of_a_block(core: Any) -> None:
    pair = Pair(core)
    pair.set("max_allowed_table_size", 100)
    assert pair.decode(b"\x82") is hpack.InvalidTableSizeError  # still 4096
    pair = Pair(core)
    pair.set("max_allowed_table_size", 100)
    assert pair.decode(b"\x3f\x45\x82") == [(b":method", b"GET")]  # 100, then a header


def test_an_entry_larger_than_the_table_empties_it(core: Any) -> None:
    pair = Pair(core)
    assert pair.decode(b"\x40\x01a\x01b") == [(b"a", b"b")]
    assert pair.mine.dynamic_entries == ((b"a", b"b"),)
    pair.set("header_table_size", 40)
    assert pair.decode(b"\x40\x01a\x0a" + b"x" * 10) == [(b"a", b"x" * 10)]
    assert pair.mine.dynamic_entries == ()


def test_the_header_list_limit_counts_32_per_header(core: Any) -> None:
    pair = Pair(core, max_header_list_size=32 + 7 + 3)
    assert pair.decode(b"\x83") is hpack.OversizedHeaderListError  # 32 + 7 + 4
    pair = Pair(core, max_header_list_size=32 + 7 + 3)
    assert pair.decode(b"\x82") == [(b":method", b"GET")]  # exactly the limit


def test_the_table_size_setter_is_hpacks(core: Any) -> None:
    pair = Pair(core)
    for name in (b"a", b"b", b"c"):
        pair.decode(b"\x40\x01" + name + b"\x01v")
    pair.set("header_table_size", 2 * 34)  # the oldest goes
    assert pair.mine.dynamic_entries == ((b"c", b"v"), (b"b", b"v"))
    pair.set("max_allowed_table_size", 9000)
    pair.set("header_table_size", 9000)
    fill = 9000 - 2 * 34 - 32  # an entry that fills the table exactly
    assert pair.decode(b"\x40\x00" + _varint(0, 7, fill) + b"v" * fill) == [(b"", b"v" * fill)]
    assert len(pair.mine.dynamic_entries) == 3
    pair.set("header_table_size", 9000 - 1)  # one byte less: the oldest goes
    assert pair.mine.dynamic_entries == ((b"", b"v" * fill), (b"c", b"v"))
    pair.set("header_table_size", 0)
    assert pair.mine.dynamic_entries == ()
    pair.set("header_table_size", -3)
    assert pair.mine.header_table_size == -3


def test_any_bytes_like_input(core: Any) -> None:
    block = bytes(hpack.Encoder().encode([(b"a", b"b")]))
    for data in (bytearray(block), memoryview(block)):
        assert core.Decoder().decode(data) == [(b"a", b"b")]
    with pytest.raises(TypeError):
        core.Decoder().decode("a")


# -- memory --------------------------------------------------------------------------


def _workload(core: Any) -> Callable[[], None]:
    encoder = hpack.Encoder()
    blocks = [
        bytes(encoder.encode([(b":path", b"/p"), (b"grpc-timeout", f"{i}m".encode())], huffman=h))
        for i, h in zip(range(200), [True, False] * 100, strict=True)
    ]
    hostile = [
        b"\x80",
        b"\x00\x81\xff\x00",
        b"\xff\x80\x80\x80\x80\x80",
        b"\x82\x20",
        b"\x00\x05ab",
    ]

    def run() -> None:
        decoder = core.Decoder()
        for block in blocks:
            decoder.decode(block)
        for block in hostile:
            with pytest.raises(hpack.HPACKError):
                core.Decoder().decode(block)

    return run


def test_decoding_leaks_nothing(core: Any) -> None:
    """Every object a decode makes is freed: after warming up, a run of 60,000 blocks
    (valid and hostile) leaves the traced memory where it was."""
    run = _workload(core)
    run()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            run()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown
