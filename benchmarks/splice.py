"""A plain byte splice with no observation at all, for comparison only.

It takes the sidecar's `serve` flags and answers /-/ready and /metrics, so the harness
can put it where the sidecar goes (`--targets direct,sidecar,splice`): the gap between
it and the direct connection is what any asyncio splice costs, the gap between it and
the sidecar is what observation costs.

    python -m benchmarks.splice serve --listen unix:///tmp/x/s.sock \
        --upstream unix:///tmp/x/up.sock --web.listen-address 127.0.0.1:9999
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence
from typing import cast

HIGH_WATER = 256 * 1024


class _Pipe(asyncio.Protocol):
    """One direction's reader: writes what it reads to `peer`, and stops reading
    while the peer's write buffer is full (asyncio's flow-control callbacks)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, only behave like one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            # The client spoke before the upstream connection was up.
            self.pending.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def _unix_path(address: str) -> str:
    if not address.startswith("unix://"):
        raise SystemExit(f"only unix:// addresses are supported, got {address!r}")
    return address.removeprefix("unix://")


async def _bridge(client: _Pipe, upstream_path: str) -> None:
    loop = asyncio.get_running_loop()
    try:
        _, upstream = await loop.create_unix_connection(_Pipe, upstream_path)
    except OSError:
        if client.transport is not None:
            client.transport.close()
        return
    if client.transport is None or client.transport.is_closing():
        # The client left while the upstream connection was being made.
        if upstream.transport is not None:
            upstream.transport.close()
        return
    client.peer, upstream.peer = upstream, client
    for data in client.pending:
        assert upstream.transport is not None
        upstream.transport.write(data)
    client.pending.clear()


_RESPONSES = {
    b"/-/ready": b"ready\n",
    b"/-/healthy": b"healthy\n",
    b"/metrics": b"# a plain splice observes nothing\n",
}


async def _web(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            body = _RESPONSES.get(path)
            status = b"200 OK" if body is not None else b"404 Not Found"
            body = body or b"not found\n"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()
    writer.close()


async def serve(listen: str, upstream: str, web: str) -> None:
    loop = asyncio.get_running_loop()
    upstream_path = _unix_path(upstream)
    tasks: set[asyncio.Task[None]] = set()

    def accept() -> _Pipe:
        client = _Pipe()
        task = loop.create_task(_bridge(client, upstream_path))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return client

    server = await loop.create_unix_server(accept, _unix_path(listen))
    host, port = web.rsplit(":", 1)
    web_server = await asyncio.start_server(_web, host, int(port))
    stopped = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set_result, None)
    async with server, web_server:
        await stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.splice")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("serve")
    cmd.add_argument("--listen", required=True)
    cmd.add_argument("--upstream", required=True)
    cmd.add_argument("--web.listen-address", dest="web", required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.listen, args.upstream, args.web))
    else:
        uvloop.run(serve(args.listen, args.upstream, args.web))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
