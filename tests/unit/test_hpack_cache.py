"""The shared HPACK block memo must decode exactly as a plain hpack Decoder does:
replayed captures give the same events with and without it, and random block
sequences over several connections give the same headers and the same errors."""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from benchmarks.replay import shared_connection
from exporter import hpack_cache
from exporter.h2 import MAX_HEADER_BLOCK
from exporter.hpack_cache import BlockCache, CachedDecoder, _Read, memoize_huffman
from exporter.metrics import HPACK_BLOCK_CACHE, Metrics
from exporter.observer import ConnectionObserver

from .captures import Record, RecordingSink, capture_files, read_h2cap, replay


def observed(records: Any, memos: tuple[BlockCache, BlockCache] | None) -> tuple[Any, ...]:
    sink = RecordingSink()
    client, server = memos or (None, None)
    # The memo is the pure-Python core's (the compiled one has no use for it).
    observer = ConnectionObserver(sink, client_blocks=client, server_blocks=server, core=None)
    replay(records, observer, sink)
    return (
        observer.failed,
        sink.started,
        sink.ended,
        dict(sink.decode_errors),
        dict(sink.unknown),
    )


def test_captures_observe_the_same_with_and_without_the_cache() -> None:
    memos = (
        BlockCache(max_header_list_size=MAX_HEADER_BLOCK),
        BlockCache(max_header_list_size=MAX_HEADER_BLOCK),
    )
    corpus = [(path.name, read_h2cap(path)) for path in capture_files()]
    # Blocks are kept when seen the second time: the third pass only hits.
    for attempt in range(3):
        misses = [memo.misses for memo in memos]
        for name, records in corpus:
            assert observed(records, memos) == observed(records, None), (attempt, name)
    assert [memo.misses for memo in memos] == misses
    assert all(memo.memoized > len(corpus) for memo in memos)
    assert all(memo.resets == 0 for memo in memos)


@pytest.mark.parametrize("deadline", [False, True])
def test_a_long_lived_connection_observes_the_same_with_and_without_the_cache(
    deadline: bool,
) -> None:
    memos = (
        BlockCache(max_header_list_size=MAX_HEADER_BLOCK),
        BlockCache(max_header_list_size=MAX_HEADER_BLOCK),
    )
    feed = shared_connection(300, deadline=deadline)
    records = [Record(direction, 0.0, data) for direction, data in feed]
    assert observed(records, memos) == observed(records, None)
    assert sum(memo.hits for memo in memos) > 300 * 4  # the server side, at least


# -- random blocks --------------------------------------------------------------

# A small pool so that connections repeat each other's blocks, as GitLab Runner's
# one-connection-per-job traffic does, plus never-indexed and long values.
POOL: list[list[tuple[bytes, bytes]]] = [
    [(b":status", b"200"), (b"content-type", b"application/grpc")],
    [(b"grpc-status", b"0"), (b"grpc-message", b"")],
    [(b"grpc-status", b"13"), (b"grpc-message", b"panic in /proto.StepRunner/Status")],
    [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-encoding", b"gzip")],
    [(b"x-big", b"v" * 3000)],
    [hpack.NeverIndexedHeaderTuple(b"authorization", b"secret")],
    [(b"x-job", b"1"), (b"x-job", b"2"), (b"x-job", b"3")],
    # Same sizes, other values: the same node, told apart by the entries read.
    [(b"grpc-timeout", b"59999999u")],
    [(b"grpc-timeout", b"59999996u")],
    [(b"x-job", b"1")],
    [(b"x-job", b"2")],
]
header = st.tuples(
    st.sampled_from([b"grpc-status", b"grpc-message", b"x-a", b"content-type"]),
    st.one_of(st.sampled_from([b"0", b"1", b"13", b"14"]), st.binary(max_size=40)),
)
block_headers = st.one_of(st.sampled_from(POOL), st.lists(header, min_size=1, max_size=4))
# A step on one connection: ("block", headers, huffman), a table size change the
# encoder announces in its next block, a SETTINGS allowance change, or raw bytes.
block_step = st.tuples(st.just("block"), block_headers, st.booleans())
step = st.one_of(
    block_step,
    block_step,
    block_step,
    st.tuples(st.just("resize"), st.sampled_from([0, 64, 256, 4096, 8192]), st.just(False)),
    st.tuples(st.just("allow"), st.sampled_from([4096, 8192, 65536]), st.just(False)),
    # Indexed references into the dynamic table show what it holds, errors included.
    st.tuples(
        st.just("raw"),
        st.one_of(st.sampled_from([b"\xbe", b"\xbf", b"\xc0", b"\xc1"]), st.binary(max_size=8)),
        st.just(False),
    ),
)
Step = tuple[str, Any, bool]


class _Conn:
    def __init__(self, cache: BlockCache) -> None:
        self.encoder = hpack.Encoder()
        self.plain = hpack.Decoder(max_header_list_size=cache.max_header_list_size)
        self.cached = CachedDecoder(cache)
        self.dead = False

    def run(self, kind: str, arg: Any, huffman: bool) -> None:
        if self.dead:
            return
        if kind == "resize":
            self.encoder.header_table_size = arg
            return
        if kind == "allow":
            self.plain.max_allowed_table_size = arg
            self.cached.max_allowed_table_size = arg
            assert self.cached.max_allowed_table_size == arg
            return
        block = arg if kind == "raw" else bytes(self.encoder.encode(arg, huffman=huffman))
        self.check(block)

    def check(self, block: bytes) -> None:
        try:
            want: Sequence[Any] | Exception = list(self.plain.decode(block, raw=True))
        except hpack.HPACKError as exc:
            want = exc
        try:
            got: Sequence[Any] | Exception = self.cached.decode(block)
        except hpack.HPACKError as exc:
            got = exc
        if isinstance(want, Exception):
            assert type(got) is type(want)
            self.dead = True  # the observer stops at the first error
            return
        assert not isinstance(got, Exception), got
        assert list(got) == want
        assert [type(h) for h in got] == [type(h) for h in want]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trunk=st.lists(step, max_size=10),
    branches=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10), st.lists(step, max_size=5)),
        min_size=1,
        max_size=4,
    ),
    order=st.lists(st.integers(min_value=0, max_value=3), max_size=60),
    budget=st.sampled_from([2_000, 20_000, 1 << 20]),
    generations=st.integers(min_value=1, max_value=4),
    give_up=st.sampled_from([1, 3, hpack_cache._GIVE_UP]),
)
def test_random_blocks_decode_as_plain_hpack(
    trunk: list[Step],
    branches: list[tuple[int, list[Step]]],
    order: list[int],
    budget: int,
    generations: int,
    give_up: int,
) -> None:
    """Connections share a trunk of steps and then branch off, interleaved, like
    jobs whose calls go the same way up to their outcome; with few misses allowed
    in a row, they also go on with plain hpack after giving up on the memo."""
    default = hpack_cache._GIVE_UP
    hpack_cache._GIVE_UP = give_up
    try:
        _random_blocks(trunk, branches, order, budget, generations)
    finally:
        hpack_cache._GIVE_UP = default


def _random_blocks(
    trunk: list[Step],
    branches: list[tuple[int, list[Step]]],
    order: list[int],
    budget: int,
    generations: int,
) -> None:
    cache = BlockCache(max_header_list_size=8192, budget=budget, max_block=512)
    scripts = [trunk[:cut] + tail for cut, tail in branches]
    # The same again on new connections walks what the earlier ones memoized (or
    # what is left of it after a reset).
    for _ in range(generations):
        conns = [_Conn(cache) for _ in scripts]
        todo = [list(script) for script in scripts]
        turns = [i % len(scripts) for i in order] + [
            i for i, script in enumerate(scripts) for _ in script
        ]
        for i in turns:
            if todo[i]:
                conns[i].run(*todo[i].pop(0))


def test_hpack_reads_its_table_only_where_the_cache_looks() -> None:
    """The memo is exact because hpack's Decoder reads the dynamic table only
    through get_by_index (recorded) and otherwise only sizes it: a new hpack that
    does more must fail here before it can make the memo wrong."""
    source = inspect.getsource(hpack.hpack.Decoder)
    assert set(re.findall(r"header_table\.(\w+)", source)) == {"get_by_index", "add", "maxsize"}
    assert "dynamic_entries" not in source


def test_a_read_counts_as_whole_unless_only_the_name_is_taken() -> None:
    name_only, indexed, by_value = (_Read((b"n", b"v")) for _ in range(3))
    assert name_only[0] == b"n"
    assert not name_only.whole
    assert hpack.HeaderTuple(*indexed) == (b"n", b"v")
    assert indexed.whole
    assert by_value[1] == b"v"
    assert by_value.whole


def learn(cache: BlockCache, *blocks: bytes) -> None:
    """Memoize `blocks` as one connection's: a block is kept the second time it is
    seen from the same state."""
    for _ in range(2):
        conn = _Conn(cache)
        for block in blocks:
            conn.check(block)


def test_a_block_is_kept_the_second_time_it_is_seen() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    blocks = encoded([POOL[0], POOL[1], POOL[0], POOL[1]])
    for expected_misses in (4, 8, 8):
        decoder = CachedDecoder(cache)
        results = [list(decoder.decode(block)) for block in blocks]
        assert results == [POOL[0], POOL[1], POOL[0], POOL[1]]
        assert cache.misses == expected_misses
    assert tracked(decoder)
    # The repeats are all indexed: they leave the table as it was and loop back.
    assert cache.size == 3


def test_a_long_connection_repeating_itself_stays_in_a_small_cache() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK, budget=5_000)
    encoder = hpack.Encoder()
    decoder = CachedDecoder(cache)
    for _ in range(500):  # a Status poll: the same response and trailers each time
        for headers in (POOL[0], POOL[1]):
            assert list(decoder.decode(bytes(encoder.encode(headers)))) == headers
    assert tracked(decoder)
    assert cache.resets == 0
    assert cache.size == 3
    assert cache.misses < 10


def test_a_long_connection_that_never_repeats_gives_up_on_the_memo() -> None:
    """A long-lived connection whose client writes each call's own grpc-timeout into
    the table: no state comes twice, so after _GIVE_UP misses in a row it decodes with
    plain hpack, exactly as before, and leaves the shared memo alone."""
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    conn = _Conn(cache)
    for call in range(500):
        path = (b":path", b"/proto.StepRunner/" + [b"Run", b"FollowLogs", b"Status"][call % 3])
        conn.check(bytes(conn.encoder.encode([path, (b"grpc-timeout", b"%du" % (10**8 + call))])))
        assert not conn.dead
    assert not tracked(conn.cached)
    assert (cache.hits, cache.misses) == (0, hpack_cache._GIVE_UP)
    assert cache.resets == 0 and cache.size <= hpack_cache._GIVE_UP + 1
    # Repeating connections still share the memo.
    for _ in range(3):
        again = _Conn(cache)
        for headers in (POOL[0], POOL[1]):
            again.check(bytes(again.encoder.encode(headers)))
    assert cache.hits == 2


def test_a_miss_after_hits_restores_the_table() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    encoder = hpack.Encoder()
    common = [bytes(encoder.encode(POOL[0])), bytes(encoder.encode(POOL[1]))]
    learn(cache, common[0])
    later, misses = _Conn(cache), cache.misses
    later.check(common[0])
    assert cache.misses == misses  # a hit: no live decoder yet
    # Only indexed references to what the first block added: needs the restored table.
    later.check(common[1])
    later.check(bytes(encoder.encode(POOL[0])))
    assert not later.dead


def test_a_miss_restores_the_table_size_too() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    # The same entry in a table of the default size: another state.
    learn(cache, bytes(hpack.Encoder().encode([(b"x-a", b"v" * 10)])))
    encoder = hpack.Encoder()
    encoder.header_table_size = 64  # room for one of the entries below
    first = bytes(encoder.encode([(b"x-a", b"v" * 10)]))
    second = bytes(encoder.encode([(b"x-b", b"w" * 10)]))  # evicts x-a
    learn(cache, first)
    conn, misses = _Conn(cache), cache.misses
    conn.check(first)
    assert cache.misses == misses  # a hit
    conn.check(second)  # a miss: restored from the entries after `first`
    conn.check(b"\xbf")  # the second dynamic entry: evicted, so an error
    assert conn.dead
    # Now both blocks are memoized: a hit that adds one entry and evicts another.
    learn(cache, first, second)
    again, misses = _Conn(cache), cache.misses
    again.check(first)
    again.check(second)
    assert cache.misses == misses
    again.check(b"\xbf")
    assert again.dead


def test_a_connection_that_missed_then_hit_restores_again() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    x, y, z = (
        [(b"x-a", b"1")],
        [(b"x-b", b"2")],
        [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-c", b"3")],
    )
    encoder = hpack.Encoder()
    bx, by, bz = (bytes(encoder.encode(h)) for h in (x, y, z))
    learn(cache, bx)
    slow = _Conn(cache)
    slow.check(bx)  # a hit
    slow.check(bytes(hpack.Encoder().encode([])))  # an empty block: a miss, then live
    learn(cache, bx, b"", by)  # y after x, memoized meanwhile
    misses = cache.misses
    slow.check(by)  # a hit: its live decoder is now behind
    assert cache.misses == misses
    slow.check(bz)  # a miss: needs the table as it is after y
    assert not slow.dead
    assert tracked(slow.cached)


def test_blocks_that_read_other_values_are_told_apart() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    for job in (b"1", b"2", b"1", b"2", b"1", b"2"):
        conn = _Conn(cache)
        # The second block only refers to the entry the first one added.
        for _ in range(2):
            conn.run("block", [(b"x-job", job)], False)
        conn.check(b"\xbe")
        assert not conn.dead
    assert cache.size == 2  # one node after the first block, whatever the job
    assert cache.memoized == 4  # each first block, and "\xbe" once per value it reads
    # Each block is kept the second time it is missed: both first blocks twice, and
    # "\xbe" until both values were seen twice.
    assert cache.misses == 2 * 2 + 3


def test_a_block_naming_an_entry_does_not_depend_on_its_value() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    # grpc-go: the first request indexes its own grpc-timeout, later ones name it.
    hits = []
    for timeout in (b"59931372u", b"59945102u", b"59902222u"):
        encoder = hpack.Encoder()
        conn = _Conn(cache)
        conn.check(bytes(encoder.encode([(b"grpc-timeout", timeout)])))
        misses = cache.misses
        conn.check(bytes(encoder.encode([(b"grpc-timeout", b"59999999u")])))
        hits.append(cache.misses == misses)
        conn.check(b"\xbf")  # reads the first value whole
        assert not conn.dead
    assert hits == [False, False, True]  # kept at the second sight, whatever the value
    assert cache.memoized == 1 + 2  # the naming block, and "\xbf" per value read


def test_a_block_naming_an_entry_depends_on_that_name() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    # Entries of the same size (the same node) under different names; the second
    # block of each names the entry the first added, in the same bytes.
    for name, value in [(b"x-a", b"12"), (b"x-bb", b"1")] * 3:
        encoder = hpack.Encoder()
        conn = _Conn(cache)
        conn.check(bytes(encoder.encode([(name, value)])))
        conn.check(bytes(encoder.encode([(name, b"99")])))
        assert not conn.dead
    assert cache.size == 4  # root, the one after the first blocks, one after each second


def test_a_block_that_only_resizes_the_table_is_followed_right() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    encoder = hpack.Encoder()
    first = bytes(encoder.encode(POOL[0]))
    encoder.header_table_size = 4000  # small entries: nothing is evicted
    resize = bytes(encoder.encode([]))
    conn = _Conn(cache)
    conn.check(first)  # a miss: its live decoder is current
    learn(cache, first, resize)
    misses = cache.misses
    conn.check(resize)  # a hit: the live decoder's table size is now stale
    assert cache.misses == misses
    # An entry that fits 4096 but, with the others, not 4000: they are evicted.
    conn.check(b"\x40\x05x-big\x7f" + bytes(_varint(3905 - 127)) + b"v" * 3905)
    conn.check(b"\xbf")
    assert conn.dead


def _varint(value: int) -> bytearray:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return out


def test_a_changed_table_allowance_stops_tracking() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    decoder = CachedDecoder(cache)
    decoder.max_allowed_table_size = 4096  # unchanged: still tracked
    assert tracked(decoder)
    decoder.max_allowed_table_size = 8192
    assert not tracked(decoder)
    encoder = hpack.Encoder()
    encoder.header_table_size = 8192
    for _ in range(2):
        assert list(decoder.decode(bytes(encoder.encode(POOL[0])))) == POOL[0]
    assert cache.size == 1  # an untracked connection memoizes nothing
    assert cache.misses == 0


def test_large_blocks_are_decoded_live_and_not_kept() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK, max_block=100)
    blocks = encoded([POOL[4], POOL[0]])
    for _ in range(3):
        decoder = CachedDecoder(cache)
        assert [list(decoder.decode(b)) for b in blocks] == [POOL[4], POOL[0]]
        assert tracked(decoder)
    assert cache.memoized == 1  # only the small block, after the large one


def test_a_node_keeps_a_bounded_number_of_blocks_and_reads() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK, budget=1 << 30)
    for value in range(300):  # each seen twice, as a repeated grpc-timeout would be
        learn(cache, bytes(hpack.Encoder().encode([(b"x-n", b"%03d" % value)])), b"\xbe")
    # 128 first blocks, and "\xbe" (reading each value whole) for 8 of them.
    assert cache.memoized == 128 + 8
    assert cache.resets == 0


def test_a_full_cache_starts_over() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK, budget=2_000)
    for value in range(10):
        headers = [(b"x-n", str(value).encode())]
        learn(cache, bytes(hpack.Encoder().encode(headers)))
    assert cache.resets >= 1
    assert cache.memoized < 10
    # A connection on the old graph goes on from the new one, even with a block the
    # old graph knew: its edges are dropped so that it holds no memory.
    block = encoded([POOL[0]])[0]
    learn(cache, block)
    assert cache.memoized >= 1
    old = CachedDecoder(cache)
    cache.reset()
    assert cache.memoized == 0
    assert list(old.decode(block)) == POOL[0]
    assert tracked(old)
    assert cache.size == 2


def test_errors_are_raised_not_memoized() -> None:
    cache = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    bad = b"\xff\xff\xff\xff\xff\xff\xff\x7f"  # an index far past any table
    for _ in range(2):
        with pytest.raises(hpack.HPACKError):
            CachedDecoder(cache).decode(bad)
    assert cache.size == 1


def tracked(decoder: CachedDecoder) -> bool:
    return decoder.tracked


def encoded(header_lists: list[list[tuple[bytes, bytes]]]) -> list[bytes]:
    encoder = hpack.Encoder()
    return [bytes(encoder.encode(headers)) for headers in header_lists]


# -- the Huffman memo patched into hpack, and the memo's counts --------------------------


def test_the_huffman_memo_is_in_place_and_used() -> None:
    import hpack.hpack as impl

    assert getattr(impl.decode_huffman, "_exporter_memo", False)  # type: ignore[attr-defined]
    memoize_huffman()  # again: harmless
    block = hpack.Encoder().encode([(b"x-new-name", b"some value")], huffman=True)
    assert hpack.Decoder().decode(block, raw=True) == [(b"x-new-name", b"some value")]


def test_an_hpack_without_what_the_memo_patches_fails_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hpack.hpack as impl

    monkeypatch.delattr(impl, "decode_huffman")
    with pytest.raises(RuntimeError, match=r"hpack .* needs updating"):
        memoize_huffman()


def test_an_hpack_that_no_longer_calls_the_patched_name_fails_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hpack.hpack as impl
    from hpack.huffman_table import decode_huffman

    def decode_another_way(self: hpack.Decoder, data: bytes, raw: bool = False) -> Any:
        return [(b"x-huffman-check", b"memo")]  # right, without hpack.hpack.decode_huffman

    monkeypatch.setattr(impl, "decode_huffman", decode_huffman)  # as hpack ships it
    monkeypatch.setattr(hpack.Decoder, "decode", decode_another_way)
    with pytest.raises(RuntimeError, match=r"no longer calls hpack\.hpack\.decode_huffman"):
        memoize_huffman()
    assert impl.decode_huffman is decode_huffman  # type: ignore[attr-defined]


def test_the_memo_counts_hits_and_misses_and_the_metric_shows_them() -> None:
    client = BlockCache(max_header_list_size=MAX_HEADER_BLOCK)
    registry = CollectorRegistry()
    Metrics(registry, hpack_memos=[client])

    def counts() -> tuple[float | None, float | None]:
        name = HPACK_BLOCK_CACHE.name
        return (
            registry.get_sample_value(name, {"result": "hit"}),
            registry.get_sample_value(name, {"result": "miss"}),
        )

    assert counts() == (0, 0)
    blocks = [bytes(hpack.Encoder().encode([(":path", "/proto.StepRunner/Run")]))]
    for _ in range(3):  # the second time a block is seen it is memoized
        decoder = CachedDecoder(client)
        for block in blocks:
            decoder.decode(block)
    assert (client.hits, client.misses) == (1, 2)
    assert counts() == (1, 2)
