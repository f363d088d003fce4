"""Backpressure of the byte splice against a slow upstream (issue 10, item 6).

A client writes far more than any buffer while the upstream connection is still being
opened, and the upstream is a real socket peer that reads slowly. Flushing the connect
buffer fills the upstream socket, and asyncio says so (`pause_writing`) only once: the
splice must not read more from the client until the upstream drains. What the splice
holds in user space stays bounded the whole time, and every byte arrives in order.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest

from exporter.splice import _CONNECT_BUFFER_LIMIT, Endpoint, Splice

from .harness import async_wait_until, short_tmpdir

pytestmark = pytest.mark.integration

TOTAL = 4 * 1024 * 1024
# A small send buffer on the splice's upstream socket stands in for a busy step-runner:
# the kernel takes little, so the flush of the connect buffer fills the socket.
UPSTREAM_SNDBUF = 32 * 1024
READ_PAUSE = 0.002  # the slow peer's pause between two reads
# The connect buffer, one more read on top of it (asyncio and uvloop read at most
# 256 KiB at a time) and the transport's high-water mark, with room to spare: without
# backpressure the splice holds most of TOTAL instead.
BOUND = _CONNECT_BUFFER_LIMIT + 256 * 1024 + 64 * 1024 + 256 * 1024


class _SlowConnectSplice(Splice):
    """The real splice, whose upstream connection is opened only on `release`."""

    def __init__(self, *args: Any, release: asyncio.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = release

    async def open_upstream(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport:
        await self.release.wait()
        transport = await super().open_upstream(factory)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UPSTREAM_SNDBUF)
        return transport


class _SlowPeer(asyncio.Protocol):
    """Reads whatever the kernel has, then pauses, and again, until TOTAL arrived."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received += data
        assert self.transport is not None
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(READ_PAUSE, self.transport.resume_reading)


class _HeldBytes:
    """A splice tap that records, after each forwarded client chunk, what the splice
    holds in user space."""

    def __init__(self) -> None:
        self.splice: Splice | None = None
        self.client_bytes = 0
        self.most_held = 0

    def client_data(self, data: bytes, now: float) -> None:
        assert self.splice is not None
        self.client_bytes += len(data)
        self.most_held = max(self.most_held, self.splice.buffered)

    def server_data(self, data: bytes, now: float) -> None:
        pass

    def connection_lost(self, now: float) -> None:
        pass


async def _slow_upstream_flow() -> tuple[int, int, int]:
    loop = asyncio.get_running_loop()
    payload = bytes(i % 251 for i in range(TOTAL))
    with short_tmpdir() as directory:
        peer = _SlowPeer()
        server = await loop.create_unix_server(lambda: peer, f"{directory}/upstream.sock")
        release = asyncio.Event()
        held = _HeldBytes()
        splice = _SlowConnectSplice(
            Endpoint(path=f"{directory}/splice.sock"),
            Endpoint(path=f"{directory}/upstream.sock"),
            lambda: held,
            release=release,
        )
        held.splice = splice
        await splice.start()
        _, writer = await asyncio.open_unix_connection(f"{directory}/splice.sock")
        try:
            writer.write(payload)  # the client's transport holds what the kernel does not
            # The connect buffer is full and reading from the client has paused...
            await async_wait_until(
                lambda: splice.buffered > _CONNECT_BUFFER_LIMIT, 10, "a full connect buffer"
            )
            at_connect = splice.buffered
            # ...then the upstream connects and the buffer is flushed into a socket that
            # takes little and a peer that reads slowly.
            release.set()
            await async_wait_until(lambda: len(peer.received) == TOTAL, 30, "every byte upstream")
            assert bytes(peer.received) == payload
            return at_connect, held.most_held, held.client_bytes
        finally:
            writer.close()
            await splice.close()
            server.close()


def _run(loop_kind: str, coro: Coroutine[Any, Any, tuple[int, int, int]]) -> tuple[int, int, int]:
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_full_upstream_after_the_connect_flush_pauses_the_client(loop_kind: str) -> None:
    at_connect, most_held, forwarded = _run(loop_kind, _slow_upstream_flow())
    assert forwarded == TOTAL
    assert at_connect <= _CONNECT_BUFFER_LIMIT + 256 * 1024
    assert most_held <= BOUND, f"the splice held {most_held} bytes (bound {BOUND})"
