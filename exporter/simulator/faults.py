"""A byte relay in front of the simulated step-runner that can kill a connection.

gRPC servers offer no way to drop one client's connection in the middle of a call, so
the relay forwards each connection to the real server and aborts both sides as soon
as the client's bytes contain a marker that only the connection_drop scenario sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """`unix:///abs/path.sock` or `HOST:PORT` (an IPv6 host in brackets), parsed."""

    path: str | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, address: str) -> Endpoint:
        if address.startswith("unix://"):
            path = address.removeprefix("unix://")
            if not path.startswith("/"):
                raise ValueError(f"unix socket path must be absolute: {address!r}")
            return cls(path=path)
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"not unix:///path or HOST:PORT: {address!r}")
        return cls(host=host.removeprefix("[").removesuffix("]"), port=int(port))

    def with_port(self, port: int) -> Endpoint:
        return Endpoint(self.path, self.host, port)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


async def open_connection(target: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if target.path is not None:
        return await asyncio.open_unix_connection(target.path)
    return await asyncio.open_connection(target.host, target.port)


class DropRelay:
    """Forwards every connection on `listen` to `upstream`, dropping marked ones."""

    def __init__(self, listen: Endpoint, upstream: Endpoint, marker: bytes) -> None:
        self.listen = listen
        self._upstream = upstream
        self._marker = marker
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.drops = 0

    async def start(self) -> Endpoint:
        """Listen; returns the bound endpoint (the real port when 0 was asked for)."""
        if self.listen.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen.path)  # a stale socket left by a killed instance
            self._server = await asyncio.start_unix_server(self._accept, self.listen.path)
        else:
            self._server = await asyncio.start_server(
                self._accept, self.listen.host, self.listen.port
            )
            self.listen = self.listen.with_port(self._server.sockets[0].getsockname()[1])
        return self.listen

    async def stop(self) -> None:
        """Stop listening and abort every relayed connection, like a killed process."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.listen.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen.path)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.get_running_loop().create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(client_writer)
        try:
            server_reader, server_writer = await open_connection(self._upstream)
        except OSError:
            client_writer.transport.abort()
            self._writers.discard(client_writer)
            return
        self._writers.add(server_writer)
        try:
            await asyncio.gather(
                self._pump(client_reader, server_writer, client_writer, scan=True),
                self._pump(server_reader, client_writer, server_writer, scan=False),
            )
        finally:
            for writer in (client_writer, server_writer):
                writer.transport.abort()
                self._writers.discard(writer)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        source_writer: asyncio.StreamWriter,
        *,
        scan: bool,
    ) -> None:
        tail = b""
        try:
            while data := await reader.read(65536):
                if scan:
                    # The marker may straddle two reads: search the previous tail too.
                    window = tail + data
                    if self._marker in window:
                        self.drops += 1
                        writer.transport.abort()
                        source_writer.transport.abort()
                        return
                    tail = window[-(len(self._marker) - 1) :]
                if writer.transport.is_closing():
                    return  # the other direction cut the connection (a drop, a reset)
                writer.write(data)
                await writer.drain()
            # uvloop raises on a closed transport, where asyncio does nothing.
            if not writer.transport.is_closing() and writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()
            source_writer.transport.abort()
