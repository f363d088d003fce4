"""A shared memo of HPACK header block decodes, for encoders that repeat themselves.

GitLab Runner opens one connection per job, so every connection's encoders start from
the same empty table and, job after job, write much the same header blocks in the
same order. hpack's Decoder reads its dynamic table only through
`HeaderTable.get_by_index` (indexed fields, indexed names); otherwise a block's
decoding depends on the table only through the table size and the entries' sizes
(evictions, size checks). So the decodes form a graph shared by all connections:

- a node is an abstract decoder state: the table size and the size of each entry;
- an edge is a block and the entries it read, each at its position with its exact
  value, leading to the headers it decodes to, the entries it adds and how many old
  ones survive, and the next node.

A connection keeps its concrete entries and follows an edge when the block and the
values at the edge's positions match: every state that matches decodes that block to
the same headers and the same table, so the result is exactly hpack's. At the first
block without such an edge it restores a real `hpack.Decoder` from its entries,
decodes live while recording the table reads, and adds the edge for the next
connection while the memo has room. This way the values of entries a block does not
read (the client's per-request `grpc-timeout`, say) do not stop later blocks from
being shared.

A connection stops using the graph for good when its decoder's allowance changes
(SETTINGS_HEADER_TABLE_SIZE), or when `_GIVE_UP` of its blocks in a row missed: on a
long-lived connection whose client writes a new grpc-timeout into the table with
every request the states never repeat, and the graph's bookkeeping would cost more
than plain hpack (and churn the memo every other connection uses). Blocks longer than
`max_block` are decoded live and not kept; a full memo is dropped whole, and
connections carry on into the new one.

Below the memo, `memoize_huffman()` makes hpack decode each short Huffman string once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any, cast

import hpack
import hpack.hpack as hpack_impl
from hpack import Decoder, Encoder
from hpack.table import HeaderTable

# RFC 7541's initial table size, which every connection starts with.
_DEFAULT_TABLE = 4096
# Different reads of the same block from one node worth keeping (a value the block
# reads that changes per job would otherwise grow the list without bound).
_MAX_VARIANTS = 8
# Different blocks kept from one node, and (node, block) pairs remembered as seen once.
_MAX_BLOCKS = 128
_MAX_SEEN = 4096
# Misses in a row after which a connection decodes with plain hpack for good: more
# blocks than a connection per job (as GitLab Runner opens them), or one carrying a
# few jobs, has in all, and few next to a long-lived connection's thousands.
_GIVE_UP = 64

Entry = tuple[bytes, bytes]
Headers = Sequence[tuple[bytes, bytes]]
_NodeKey = tuple[int, tuple[int, ...]]
# (entries read whole: (position, entry) pairs, entries whose name only was read:
# (position, name) pairs, headers, next node, entries added, old entries kept)
_Edge = tuple[
    tuple[tuple[int, Entry], ...],
    tuple[tuple[int, bytes], ...],
    Headers,
    "_Node",
    tuple[Entry, ...],
    int,
]


class _Node:
    """Table size and entry sizes: all that a block's decoding needs besides the
    values it reads."""

    __slots__ = ("edges", "key", "retired")

    def __init__(self, key: _NodeKey) -> None:
        self.key = key
        self.edges: dict[bytes, list[_Edge]] = {}
        self.retired = False


class _Read(tuple[bytes, bytes]):
    """A table entry as handed to hpack, noting whether more than its name was used:
    a literal with an indexed name takes `entry[0]` only, so the value of the entry
    it names (a per-request grpc-timeout, say) does not matter to the block."""

    whole = False

    def __getitem__(self, index: Any) -> Any:
        if index != 0:
            self.whole = True
        return super().__getitem__(index)

    def __iter__(self) -> Iterator[bytes]:
        self.whole = True
        return super().__iter__()


class _ReadTable(HeaderTable):
    """hpack's table, recording the entries a decode reads (while `recording`)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[Entry, _Read]] = []
        self.recording = True

    def get_by_index(self, index: int) -> Entry:
        entry: Entry = super().get_by_index(index)
        if not self.recording:
            return entry
        read = _Read(entry)
        self.reads.append((entry, read))
        return read


class BlockCache:
    """The decode graph of one kind of encoder, shared by the connections it serves.

    Bounded by an estimate of the memory it holds (`budget` bytes).
    """

    def __init__(
        self, *, max_header_list_size: int, budget: int = 1 << 20, max_block: int = 1024
    ) -> None:
        self.max_header_list_size = max_header_list_size
        self._budget = budget
        self._max_block = max_block
        self._used = 0
        self._nodes: dict[_NodeKey, _Node] = {}
        self._seen: set[int] = set()  # hashes of (node, block) pairs missed once
        self.root = self._new_root()
        self.resets = 0
        # Blocks of tracked connections found in the memo, and decoded live instead.
        self.hits = 0
        self.misses = 0

    @property
    def size(self) -> int:
        """How many abstract states the graph holds (1: nothing memoized)."""
        return len(self._nodes)

    @property
    def memoized(self) -> int:
        """How many block decodes the graph holds."""
        return sum(len(v) for node in self._nodes.values() for v in node.edges.values())

    def _new_root(self) -> _Node:
        root = _Node((_DEFAULT_TABLE, ()))
        self._nodes = {root.key: root}
        self._used = 0
        return root

    def reset(self) -> None:
        """Forget everything; connections go on from nodes of the new graph."""
        for node in self._nodes.values():
            node.retired = True
            node.edges = {}
        self.root = self._new_root()
        self.resets += 1

    def restore(self, table_size: int, entries: Sequence[Entry]) -> Decoder:
        """A live hpack Decoder holding `entries` (newest first) in a table of
        `table_size`, recording its reads."""
        decoder = Decoder(max_header_list_size=self.max_header_list_size)
        table = _ReadTable()
        table.maxsize = table_size
        # Oldest first: the entries fit the table, so nothing is evicted on the way
        # and the table ends up exactly as it was.
        for name, value in reversed(entries):
            table.add(name, value)
        decoder.header_table = table
        return decoder

    def node(self, table_size: int, entries: Sequence[Entry]) -> _Node | None:
        """The node of a concrete state, added if new; None when the memo is full."""
        key = (table_size, tuple([32 + len(name) + len(value) for name, value in entries]))
        node = self._nodes.get(key)
        if node is None:
            cost = 128 + 8 * len(entries)
            # A full memo starts over, and the state is the first of the new one.
            if not self._spend(cost) and not self._spend(cost):
                return None
            node = self._nodes[key] = _Node(key)
        return node

    def add(self, node: _Node, block: bytes, edge: _Edge) -> None:
        if node.retired or len(block) > self._max_block:
            return
        # Only a block seen twice from here: most that are seen once (a request with
        # its own grpc-timeout) never come again and would only churn the memo.
        seen = hash((id(node), block))
        if seen not in self._seen:
            if len(self._seen) >= _MAX_SEEN:
                self._seen.clear()
            self._seen.add(seen)
            return
        variants = node.edges.get(block)
        if variants is None and len(node.edges) >= _MAX_BLOCKS:
            return  # the blocks that will come again are there by now
        if variants is not None and len(variants) >= _MAX_VARIANTS:
            return
        deps, names, headers, _nxt, added, _kept = edge
        reads = len(deps) + len(names)
        if not self._spend(256 + len(block) + 64 * (len(headers) + reads + len(added))):
            return  # `node` belonged to the memo just dropped
        if variants is None:
            node.edges[block] = [edge]
        else:
            variants.append(edge)

    def _spend(self, cost: int) -> bool:
        if self._used + cost > self._budget:
            self.reset()
            return False
        self._used += cost
        return True


class CachedDecoder:
    """One connection's decoder for one direction, decoding through a `BlockCache`.

    Its `decode(block)` returns what `hpack.Decoder.decode(block, raw=True)` would,
    as a sequence of (name, value) tuples, and raises what it would raise.
    """

    __slots__ = ("_allowed", "_cache", "_entries", "_live", "_live_current", "_missed", "_node")

    def __init__(self, cache: BlockCache) -> None:
        self._cache = cache
        self._node: _Node | None = cache.root
        self._entries: list[Entry] = []  # the dynamic table, newest first
        self._live: Decoder | None = None  # once one was needed
        self._live_current = False  # whether `_live` holds `_entries`
        self._allowed = _DEFAULT_TABLE
        self._missed = 0  # blocks in a row decoded live

    @property
    def tracked(self) -> bool:
        return self._node is not None

    @property
    def max_allowed_table_size(self) -> int:
        return self._allowed

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        if value == self._allowed:
            return
        # The graph was built for the default allowance: go live for good.
        live = self._live_decoder()
        self._untrack(live)
        self._allowed = value
        live.max_allowed_table_size = value

    def _untrack(self, live: Decoder) -> None:
        self._node = None
        cast(_ReadTable, live.header_table).recording = False

    def decode(self, block: bytes) -> Headers:
        node = self._node
        if node is not None:
            variants = node.edges.get(block)
            if variants is not None:
                entries = self._entries
                for deps, names, headers, nxt, added, kept in variants:
                    if _matches(entries, deps, names):
                        if added or kept != len(entries):
                            self._entries = [*added, *entries[:kept]]
                            self._live_current = False
                        elif nxt is not node:  # a new table size
                            self._live_current = False
                        self._node = nxt
                        self._missed = 0
                        self._cache.hits += 1
                        return headers
        elif self._live is not None:
            # Untracked for good: plain hpack, nothing recorded.
            return cast(Headers, self._live.decode(block, raw=True))
        return self._decode_live(block)

    def _live_decoder(self) -> Decoder:
        """The live decoder, restored first unless it holds the current state."""
        node, live = self._node, self._live
        if node is not None and (live is None or not self._live_current):
            live = self._live = self._cache.restore(node.key[0], self._entries)
        assert live is not None  # untracked only once a live decoder exists
        self._live_current = True
        return live

    def _decode_live(self, block: bytes) -> Headers:
        node = self._node
        live = self._live_decoder()
        table = cast(_ReadTable, live.header_table)
        before = list(table.dynamic_entries)
        table.reads.clear()
        # On an error the decoder is left as hpack leaves it, untracked.
        self._node = None
        try:
            headers: Headers = tuple(live.decode(block, raw=True))
        except BaseException:
            table.recording = False
            raise
        reads, table.reads = table.reads, []
        if node is None:
            return headers
        after = list(table.dynamic_entries)
        cache = self._cache
        cache.misses += 1
        self._missed += 1
        if self._missed >= _GIVE_UP:
            self._untrack(live)
            return headers
        nxt = cache.node(live.header_table_size, after)
        if nxt is None:
            self._untrack(live)
            return headers  # no room even in an empty memo: stay live
        self._node, self._entries = nxt, after
        # The block's entries come first, then what survives of the old ones.
        positions = {id(entry): i for i, entry in enumerate(before)}
        added = 0
        while added < len(after) and id(after[added]) not in positions:
            added += 1
        kept = len(after) - added
        if all(a is b for a, b in zip(after[added:], before, strict=False)):
            # Only reads of entries from before the block: the block's own are its own.
            old = [(positions[id(e)], e, r.whole) for e, r in reads if id(e) in positions]
            deps = tuple(sorted({(i, e) for i, e, whole in old if whole}))
            names = tuple(sorted({(i, e[0]) for i, e, whole in old if not whole}))
            cache.add(node, block, (deps, names, headers, nxt, tuple(after[:added]), kept))
        return headers


def _matches(
    entries: list[Entry],
    deps: tuple[tuple[int, Entry], ...],
    names: tuple[tuple[int, bytes], ...],
) -> bool:
    for i, entry in deps:
        if entries[i] != entry:
            return False
    # Plain loops: all() over a generator costs more on this path, run per block.
    for i, name in names:  # noqa: SIM110
        if entries[i][0] != name:
            return False
    return True


_SHORT_HUFFMAN = 128  # longer strings (rare, seldom repeated) are decoded as they come


def memoize_huffman() -> None:
    """Let hpack decode each short Huffman string once, process-wide.

    GitLab Runner opens a connection per job, so every job's header blocks start from
    an empty HPACK table and Huffman-code the same few dozen strings (paths, header
    names, user agent) again; hpack decodes them in pure Python every time, which was
    the largest share of the observer's CPU per job. Decoding is a pure function of
    the bytes, so a bounded cache of short strings returns the same results for less.

    hpack has no hook for this: its decoder calls the `decode_huffman` it imported
    into `hpack.hpack`, and that name is replaced. If a future hpack moves or stops
    calling it, this raises RuntimeError (at import of exporter.observer) instead of
    silently doing nothing. Calling it again is harmless.
    """
    current = getattr(hpack_impl, "decode_huffman", None)
    if getattr(current, "_exporter_memo", False):
        return
    try:
        from hpack.huffman_table import decode_huffman as decode
    except ImportError as exc:
        raise RuntimeError(_patch_problem("has no hpack.huffman_table.decode_huffman")) from exc
    if current is not decode:
        raise RuntimeError(_patch_problem("does not decode through hpack.hpack.decode_huffman"))
    cached = functools.lru_cache(maxsize=4096)(decode)

    def decode_huffman(huffman_string: bytes | bytearray | memoryview | None) -> bytes:
        if huffman_string is not None and len(huffman_string) <= _SHORT_HUFFMAN:
            result: bytes = cached(bytes(huffman_string))
            return result
        return decode(huffman_string)

    decode_huffman._exporter_memo = True  # type: ignore[attr-defined]
    hpack_impl.decode_huffman = decode_huffman  # type: ignore[attr-defined]
    # Prove the decoder goes through the replaced name: one Huffman-coded literal.
    before = cached.cache_info().misses
    block = Encoder().encode([(b"x-huffman-check", b"memo")], huffman=True)
    if Decoder().decode(block, raw=True) != [(b"x-huffman-check", b"memo")] or (
        cached.cache_info().misses == before
    ):
        hpack_impl.decode_huffman = decode  # type: ignore[attr-defined]
        raise RuntimeError(_patch_problem("no longer calls hpack.hpack.decode_huffman"))


def _patch_problem(what: str) -> str:
    version = getattr(hpack, "__version__", "?")
    return (
        f"hpack {version} {what}: exporter.hpack_cache.memoize_huffman needs updating "
        "for this hpack version"
    )
