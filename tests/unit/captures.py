"""Test helpers: the .h2cap reader (format in tests/captures/README.md), the manifest,
a recording ObserverSink and ways to replay a capture into an observer."""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.events import CallEnded, Method
from exporter.observer import ConnectionObserver
from tests.unit.twin import TwinObserver

# The repository's copy of the recorded corpus: a test that needs it fails when it is
# missing, never skips, so a fresh clone runs exactly the tests CI runs.
CAPTURES = Path(__file__).resolve().parents[1] / "captures"

CLIENT, SERVER, CLOSED = 0, 1, 2
_RECORD = struct.Struct(">BQI")


@dataclass(frozen=True, slots=True)
class Record:
    direction: int  # CLIENT, SERVER or CLOSED
    time: float  # seconds since the splice accepted the connection
    data: bytes


def read_h2cap(path: Path) -> list[Record]:
    raw = path.read_bytes()
    if raw[:8] != b"H2CAP001":
        raise ValueError(f"{path}: not an H2CAP001 file")
    records, pos = [], 8
    while pos < len(raw):
        direction, time_ns, length = _RECORD.unpack_from(raw, pos)
        pos += _RECORD.size
        records.append(Record(direction, time_ns / 1e9, raw[pos : pos + length]))
        pos += length
    if pos != len(raw):
        raise ValueError(f"{path}: truncated record")
    return records


def capture_files() -> list[Path]:
    """Every recorded connection, by name; an empty corpus is an error, not a pass."""
    paths = sorted(CAPTURES.glob("*.h2cap"))
    if not paths:
        raise FileNotFoundError(f"no .h2cap files in {CAPTURES}")
    return paths


def load_manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((CAPTURES / "manifest.json").read_text())
    return manifest


@dataclass
class RecordingSink:
    """An ObserverSink that keeps everything, with the replay time of each end."""

    now: float = 0.0
    started: list[Method] = field(default_factory=list)
    ended: list[tuple[float, CallEnded]] = field(default_factory=list)
    decode_errors: Counter[str] = field(default_factory=Counter)
    unknown: Counter[str] = field(default_factory=Counter)

    def call_started(self, method: Method) -> None:
        self.started.append(method)

    def call_ended(self, call: CallEnded) -> None:
        self.ended.append((self.now, call))

    def decode_error(self, message: str) -> None:
        self.decode_errors[message] += 1

    def unknown_fields(self, message: str) -> None:
        self.unknown[message] += 1

    @property
    def calls(self) -> list[CallEnded]:
        return [call for _, call in self.ended]

    def calls_in_start_order(self) -> list[CallEnded]:
        """Ended calls ordered by their request HEADERS time, whatever order they ended in."""
        return [
            call for end, call in sorted(self.ended, key=lambda e: e[0] - e[1].duration_seconds)
        ]


def replay(
    records: Iterable[Record],
    observer: ConnectionObserver | TwinObserver,
    sink: RecordingSink | None = None,
) -> None:
    """Feed `records` to `observer`; `sink`, if given, learns each record's time."""
    for record in records:
        if sink is not None:
            sink.now = record.time
        if record.direction == CLIENT:
            observer.client_data(record.data, record.time)
        elif record.direction == SERVER:
            observer.server_data(record.data, record.time)
        else:
            observer.connection_lost(record.time)


def one_direction_at_a_time(records: list[Record]) -> list[Record]:
    """All client bytes, then all server bytes (each at its own time), then the close."""
    client = [r for r in records if r.direction == CLIENT]
    server = [r for r in records if r.direction == SERVER]
    last = max(r.time for r in records)
    return [*client, *server, Record(CLOSED, last, b"")]


def rechunked(records: list[Record], rng: random.Random, max_piece: int) -> Iterator[Record]:
    """The same bytes and times, cut into pieces of 1..max_piece bytes."""
    for record in records:
        data, pos = record.data, 0
        if not data:
            yield record
        while pos < len(data):
            size = rng.randint(1, max_piece)
            yield Record(record.direction, record.time, data[pos : pos + size])
            pos += size


def observe(records: Iterable[Record], **options: Any) -> tuple[TwinObserver, RecordingSink]:
    sink = RecordingSink()
    observer = TwinObserver(sink, **options)
    replay(records, observer, sink)
    return observer, sink
