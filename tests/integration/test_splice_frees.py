"""A finished connection leaves nothing for the cyclic garbage collector (issue 11).

GitLab Runner opens a connection per job. Whatever of a connection is still alive in a
reference cycle once it is over (the pair of sockets, its sides, the observer and its
frame readers) is found and freed only by the cyclic GC, whose passes over thousands of
such objects cost the job path tens of microseconds per job. With the GC switched off,
a real connection through the real splice and observer (one whole call, then both
sides closing) must be freed by reference counting alone.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Coroutine, Iterator
from typing import Any, cast

import hpack
import pytest

from exporter.events import CallEnded, Method
from exporter.h2 import PREFACE
from exporter.observer import ConnectionObserver
from exporter.proto import step_pb2
from exporter.splice import Endpoint, Splice, _Pair, _Side
from tests.wire import frame, grpc_message, request_headers

from .harness import async_wait_until, short_tmpdir

pytestmark = pytest.mark.integration

DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4


class _Sink:
    def __init__(self) -> None:
        self.ended: list[CallEnded] = []

    def call_started(self, method: Method) -> None:
        pass

    def call_ended(self, call: CallEnded) -> None:
        self.ended.append(call)

    def decode_error(self, message: str) -> None:
        raise AssertionError(f"decode error {message}")

    def unknown_fields(self, message: str) -> None:
        pass


class _WatchedObserver(ConnectionObserver):
    """The real observer, with a slot for the weak reference the test holds."""

    __slots__ = ("__weakref__",)


class _StepRunner(asyncio.Protocol):
    """Answers the one call once the whole request is in, as step-runner would, and
    closes when the client has."""

    def __init__(self, request_size: int) -> None:
        self.request_size = request_size
        self.received = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(frame(SETTINGS, 0, 0))

    def data_received(self, data: bytes) -> None:
        before, self.received = self.received, self.received + len(data)
        if before < self.request_size <= self.received:
            assert self.transport is not None
            encoder = hpack.Encoder()
            response = [(":status", "200"), ("content-type", "application/grpc")]
            self.transport.write(
                frame(HEADERS, END_HEADERS, 1, encoder.encode(response))
                + frame(DATA, 0, 1, grpc_message(b""))
                + frame(
                    HEADERS, END_HEADERS | END_STREAM, 1, encoder.encode([("grpc-status", "0")])
                )
            )

    def eof_received(self) -> bool:
        return False  # close


def _live(kind: type) -> list[object]:
    return [o for o in gc.get_objects() if isinstance(o, kind)]


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _one_connection() -> list[CallEnded]:
    loop = asyncio.get_running_loop()
    sink = _Sink()
    observers: list[weakref.ref[_WatchedObserver]] = []

    def watcher() -> _WatchedObserver:
        observer = _WatchedObserver(sink)
        observers.append(weakref.ref(observer))
        return observer

    with short_tmpdir() as directory:
        request = (
            PREFACE
            + frame(SETTINGS, 0, 0)
            + frame(
                HEADERS,
                END_HEADERS,
                1,
                hpack.Encoder().encode(request_headers("/proto.StepRunner/Run")),
            )
            + frame(
                DATA, END_STREAM, 1, grpc_message(step_pb2.RunRequest(id="7").SerializeToString())
            )
        )
        server = await loop.create_unix_server(
            lambda: _StepRunner(len(request)), f"{directory}/up.sock"
        )
        splice = Splice(
            Endpoint(path=f"{directory}/splice.sock"),
            Endpoint(path=f"{directory}/up.sock"),
            watcher,
        )
        await splice.start()
        try:
            reader, writer = await asyncio.open_unix_connection(f"{directory}/splice.sock")
            writer.write(request)
            await async_wait_until(lambda: len(sink.ended) == 1, 10, "the call's end")
            writer.close()
            await reader.read()  # the splice closes the client once step-runner has closed
            await async_wait_until(lambda: splice.active_connections == 0, 10, "the close")
            # Freed without a GC pass, or never (the GC is off): a cycle fails here.
            await async_wait_until(
                lambda: len(observers) == 1 and observers[0]() is None, 10, "the observer freed"
            )
            await async_wait_until(
                lambda: not _live(_Pair) and not _live(_Side), 10, "the pair and its sides freed"
            )
        finally:
            await splice.close()
            server.close()
    return sink.ended


def _run(loop_kind: str, coro: Coroutine[Any, Any, list[CallEnded]]) -> list[CallEnded]:
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


@pytest.mark.usefixtures("no_cyclic_gc")
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_finished_connection_is_freed_by_reference_counting(loop_kind: str) -> None:
    ended = _run(loop_kind, _one_connection())
    assert [(call.method.name, call.job_id, call.code) for call in ended] == [("Run", "7", 0)]
