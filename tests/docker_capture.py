"""Recorded Docker Engine API connections (tests/fixtures/docker/*.json) and replaying
them into the docker tap.

A recording is what a splice in front of a real daemon saw: every chunk of every
connection, in the order the splice read them, as `[connection, direction, seconds,
base64]` records (direction 0: client to daemon, 1: daemon to client). Chunks of one
connection keep their order; across connections the order is the real one (the exec
create's answer passed before the start was sent on another connection).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "docker"
CLIENT, SERVER = 0, 1


@dataclass(frozen=True, slots=True)
class Chunk:
    connection: int
    direction: int  # CLIENT or SERVER
    time: float  # seconds since the recording started
    data: bytes


@dataclass(frozen=True, slots=True)
class Recording:
    description: str
    facts: dict[str, Any]  # what the recording holds (ids, job, expected counts)
    chunks: tuple[Chunk, ...]

    def connections(self) -> list[int]:
        return sorted({c.connection for c in self.chunks})

    def stream(self, connection: int, direction: int) -> bytes:
        return b"".join(
            c.data for c in self.chunks if c.connection == connection and c.direction == direction
        )


def dump(recording: Recording, path: Path) -> None:
    records = [
        [c.connection, c.direction, round(c.time, 6), base64.b64encode(c.data).decode()]
        for c in recording.chunks
    ]
    body = {"description": recording.description, "facts": recording.facts, "records": records}
    path.write_text(json.dumps(body, indent=1) + "\n")


def load(name: str) -> Recording:
    """A committed recording, by name."""
    return read(FIXTURES / f"{name}.json")


def read(path: Path) -> Recording:
    body = json.loads(path.read_text())
    chunks = tuple(
        Chunk(conn, direction, t, base64.b64decode(data))
        for conn, direction, t, data in body["records"]
    )
    return Recording(body["description"], body["facts"], chunks)
