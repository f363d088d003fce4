"""The differential harness of the observer's two cores (issue 11).

`TwinObserver` is a ConnectionObserver for the tests: every byte, time and close a test
gives it goes to two observers, one on the compiled core and one on the pure-Python
reference, and both logs of events (every sink call, in order) must be equal, as well
as whether, and on what kind of input, each stopped observing and what each holds.
The test's own sink sees the events of the observer on this process's core
(`exporter.native.CORE`: compiled under `make test`, pure under `make unit-pure`).

Every observer the unit tests build goes through it (the synthetic frame tests, the
captures, the hostile streams), and `check_twins` (an autouse fixture) compares each
one a test made when it ends: so each such test is a differential test too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from exporter import native
from exporter.events import CallEnded, Method, ObserverSink
from exporter.observer import ConnectionObserver

Event = tuple[str, Any]


@dataclass
class EventLog:
    """An ObserverSink that logs every call, then passes it on (if there is a sink)."""

    inner: ObserverSink | None = None
    events: list[Event] = field(default_factory=list)

    def call_started(self, method: Method) -> None:
        self.events.append(("call_started", method))
        if self.inner is not None:
            self.inner.call_started(method)

    def call_ended(self, call: CallEnded) -> None:
        self.events.append(("call_ended", call))
        if self.inner is not None:
            self.inner.call_ended(call)

    def decode_error(self, message: str) -> None:
        self.events.append(("decode_error", message))
        if self.inner is not None:
            self.inner.decode_error(message)

    def unknown_fields(self, message: str) -> None:
        self.events.append(("unknown_fields", message))
        if self.inner is not None:
            self.inner.unknown_fields(message)


def compiled_core() -> native.Core | None:
    """The compiled core whatever the environment forces; in CI it must be there."""
    core = native.load()
    if core is None and os.environ.get("CI") == "true":
        raise AssertionError("the compiled observer core is required in CI (make test builds it)")
    return core


_made: list[TwinObserver] = []


class TwinObserver:
    """A ConnectionObserver's three entry points and properties, fed to both cores."""

    def __init__(self, sink: ObserverSink, **options: Any) -> None:
        self.log = EventLog(sink)
        self.observer = ConnectionObserver(self.log, **options)
        other = compiled_core() if native.CORE is None else None
        # Without a compiled core (not built, outside CI) there is nothing to compare.
        self.twin_log: EventLog | None = None
        self.twin: ConnectionObserver | None = None
        if other is not None or native.CORE is not None:
            self.twin_log = EventLog()
            self.twin = ConnectionObserver(self.twin_log, **{**options, "core": other})
        _made.append(self)

    def client_data(self, data: bytes, now: float) -> None:
        self.observer.client_data(data, now)
        if self.twin is not None:
            self.twin.client_data(data, now)

    def server_data(self, data: bytes, now: float) -> None:
        self.observer.server_data(data, now)
        if self.twin is not None:
            self.twin.server_data(data, now)

    def connection_lost(self, now: float) -> None:
        self.observer.connection_lost(now)
        if self.twin is not None:
            self.twin.connection_lost(now)

    @property
    def failed(self) -> bool:
        return self.observer.failed

    @property
    def stopped_by(self) -> Exception | None:
        return self.observer.stopped_by

    @property
    def held_bytes(self) -> int:
        return self.observer.held_bytes

    def assert_same(self) -> None:
        if self.twin is None or self.twin_log is None:
            return
        assert self.twin_log.events == self.log.events
        assert self.twin.failed == self.observer.failed
        assert type(self.twin.stopped_by) is type(self.observer.stopped_by), (
            self.twin.stopped_by,
            self.observer.stopped_by,
        )
        assert self.twin.held_bytes == self.observer.held_bytes


def forget() -> None:
    _made.clear()


def check_all() -> None:
    """Compare, then forget, every twin made since the last call."""
    made = list(_made)
    _made.clear()
    for twin in made:
        twin.assert_same()
