"""The byte splice: accept client connections, open one upstream connection for
each, and copy bytes unchanged both ways with backpressure and half-closes.

It knows nothing of HTTP/2 or gRPC. A `ConnectionWatcher` per connection gets a copy
of each direction after the bytes were handed to the other side, so observing can
never delay, reorder or alter forwarding; a watcher that raises is disabled, never
the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from .errors import StartError

log = logging.getLogger("exporter.splice")

# Client bytes read while the upstream connection is still being opened; beyond
# this, reading from the client pauses until the upstream is there.
_CONNECT_BUFFER_LIMIT = 256 * 1024


class ConnectionWatcher(Protocol):
    def client_data(self, data: bytes, now: float) -> None: ...

    def server_data(self, data: bytes, now: float) -> None: ...

    def connection_lost(self, now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to listen or connect: a unix socket path or a TCP host and port."""

    path: str | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class SpliceEvents(Protocol):
    """What the splice tells its owner (upstream reachability, connection counts)."""

    def upstream_state(self, reachable: bool) -> None: ...

    def connection_rejected(self) -> None: ...


class _Side(asyncio.Protocol):
    """One socket of a spliced pair. Both sides share the `_Pair` that owns them."""

    __slots__ = ("_pair", "_to_client", "transport")

    def __init__(self, pair: _Pair, to_client: bool) -> None:
        self._pair = pair
        self._to_client = to_client  # True for the upstream side (its bytes go to the client)
        self.transport: asyncio.Transport | None = None

    def pause_writing(self) -> None:
        self._pair.writing_paused(self, True)

    def resume_writing(self) -> None:
        self._pair.writing_paused(self, False)

    def eof_received(self) -> bool:
        return self._pair.eof_from(self)

    def connection_lost(self, exc: Exception | None) -> None:
        pair = self._pair
        # The transport calls nothing after this and drops its protocol: unlinking the
        # pair breaks the pair <-> side cycle, so reference counting frees the
        # connection's objects at once instead of the cyclic GC, once per connection.
        del self._pair
        pair.lost(self)


class _ClientSide(_Side):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._pair.client_connected(self)

    def data_received(self, data: bytes) -> None:
        self._pair.from_client(data)


class _UpstreamSide(_Side):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._pair.from_upstream(data)


class _Pair:
    """One client connection and its upstream connection."""

    __slots__ = (
        "_client_eof_pending",
        "_closed",
        "_done",
        "_eofs",
        "_loop",
        "_pending",
        "_pending_full",
        "_pending_size",
        "_splice",
        "_tap",
        "_upstream_full",
        "client",
        "upstream",
    )

    def __init__(self, splice: Splice) -> None:
        self._splice = splice
        self._loop = splice.loop
        self.client = _ClientSide(self, to_client=False)
        self.upstream = _UpstreamSide(self, to_client=True)
        self._tap: ConnectionWatcher | None = splice.watcher_factory()
        self._pending: list[bytes] | None = []  # client bytes read before upstream connected
        self._pending_size = 0
        # Two reasons to stop reading from the client, each cleared on its own: the
        # connect buffer is full, or the upstream socket is (asyncio says so once).
        self._pending_full = False
        self._upstream_full = False
        self._client_eof_pending = False
        self._eofs = 0
        self._closed = False
        # Made only when someone waits for the end (drain): most connections never are.
        self._done: asyncio.Future[None] | None = None

    @property
    def done(self) -> asyncio.Future[None]:
        """Resolved once the pair is closed."""
        done = self._done
        if done is None:
            done = self._done = self._loop.create_future()
            if self._closed:
                done.set_result(None)
        return done

    # -- wiring
    @property
    def buffered(self) -> int:
        """Bytes this pair holds in user space: the connect buffer and both write buffers."""
        held = self._pending_size if self._pending is not None else 0
        for side in (self.client, self.upstream):
            transport = side.transport
            if transport is not None and not transport.is_closing():
                held += transport.get_write_buffer_size()
        return held

    def writing_paused(self, side: _Side, paused: bool) -> None:
        if side is self.upstream:
            self._upstream_full = paused
            self._update_client_reading()
        else:
            # The client socket is full: stop reading what step-runner sends.
            upstream = self.upstream.transport
            if upstream is not None and not upstream.is_closing():
                if paused:
                    upstream.pause_reading()
                else:
                    upstream.resume_reading()

    def _update_client_reading(self) -> None:
        transport = self.client.transport
        if transport is None or transport.is_closing():
            return
        if self._pending_full or self._upstream_full:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def client_connected(self, side: _ClientSide) -> None:
        self._splice.connection_opened(self)
        self._loop.create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        try:
            await self._splice.open_upstream(lambda: self.upstream)
        except OSError as exc:
            log.warning("cannot reach the upstream %s: %s", self._splice.upstream_endpoint, exc)
            self._splice.upstream_reachable(False)
            # Close as a failed direct dial would: the client sees UNAVAILABLE. gRPC
            # clients wait for the server's SETTINGS before sending a call, so
            # usually no call has been read here; any that was is ended UNAVAILABLE.
            self._tap_lost()
            self.close(abort=True)
            return
        self._splice.upstream_reachable(True)
        if self._closed:
            self._close_transport(self.upstream.transport, abort=False)
            return
        pending, self._pending = self._pending, None
        upstream = self.upstream.transport
        assert upstream is not None
        for chunk in pending or ():
            upstream.write(chunk)
        if self._client_eof_pending:
            self._write_eof(upstream)
        self._pending_size = 0
        if self._pending_full:
            # The flush may just have filled the upstream socket (pause_writing, which
            # asyncio signals once): reading resumes only if it did not.
            self._pending_full = False
            self._update_client_reading()

    # -- data
    def from_client(self, data: bytes) -> None:
        # Until the bytes read while connecting are flushed (`_pending` is None), new
        # bytes queue behind them, even if the upstream transport already exists.
        if self._pending is None:
            upstream = self.upstream.transport
            if upstream is not None:
                upstream.write(data)
        else:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > _CONNECT_BUFFER_LIMIT and not self._pending_full:
                self._pending_full = True
                self._update_client_reading()
        tap = self._tap
        if tap is not None:
            try:
                tap.client_data(data, self._loop.time())
            except Exception:
                self._tap_failed()

    def from_upstream(self, data: bytes) -> None:
        client = self.client.transport
        if client is not None:
            client.write(data)
        tap = self._tap
        if tap is not None:
            try:
                tap.server_data(data, self._loop.time())
            except Exception:
                self._tap_failed()

    def _tap_failed(self) -> None:
        log.exception("observer failed; forwarding continues unobserved")
        self._tap = None

    # -- half-close and close
    def eof_from(self, side: _Side) -> bool:
        self._eofs += 1
        if side is self.upstream:
            # No response can arrive any more: every open call has ended for the client
            # (as UNAVAILABLE), whatever the client sends on its way out (a client
            # library may still reset the streams it is abandoning).
            self._tap_lost()
        if side is self.client and self._pending is not None:
            self._client_eof_pending = True  # forwarded once the upstream is there
        else:
            other = self.upstream if side is self.client else self.client
            if other.transport is not None:
                self._write_eof(other.transport)
        if self._eofs >= 2:
            self.close(abort=False)
        return True  # keep our side open for writing: a half-close, not a close

    def _write_eof(self, transport: asyncio.Transport) -> None:
        if transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()
        else:
            transport.close()

    def lost(self, side: _Side) -> None:
        # Either connection gone: the other one goes too (after flushing what it has).
        self.close(abort=False)

    def close(self, *, abort: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._tap_lost()
        self._close_transport(self.client.transport, abort=abort)
        self._close_transport(self.upstream.transport, abort=abort)
        self._splice.connection_closed(self)
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    def _tap_lost(self) -> None:
        tap, self._tap = self._tap, None
        if tap is not None:
            try:
                tap.connection_lost(self._loop.time())
            except Exception:
                log.exception("observer failed at connection end")

    @staticmethod
    def _close_transport(transport: asyncio.Transport | None, *, abort: bool) -> None:
        if transport is None or transport.is_closing():
            return
        if abort:
            transport.abort()
        else:
            transport.close()


class Splice:
    """Listens on `listen` and splices every connection to `upstream`."""

    def __init__(
        self,
        listen: Endpoint,
        upstream: Endpoint,
        watcher_factory: Callable[[], ConnectionWatcher | None],
        events: SpliceEvents | None = None,
        *,
        socket_mode: int = 0o660,
        socket_owner: int | None = None,
        socket_group: int | None = None,
        max_connections: int = 1024,
        connect_timeout: float = 5.0,
    ) -> None:
        self.listen = listen
        self.upstream_endpoint = upstream
        self.watcher_factory = watcher_factory
        self._events = events
        self._socket_mode = socket_mode
        self._socket_owner = socket_owner
        self._socket_group = socket_group
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._socket_file: tuple[int, int] | None = None  # (st_dev, st_ino) we created
        self._pairs: set[_Pair] = set()
        self._upstream_up: bool | None = None
        self.loop = asyncio.get_running_loop()

    @property
    def active_connections(self) -> int:
        return len(self._pairs)

    @property
    def buffered(self) -> int:
        """Bytes held in user space over every connection (connect and write buffers)."""
        return sum(pair.buffered for pair in self._pairs)

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        check_upstream(self.upstream_endpoint)
        factory = self._accept
        if self.listen.path is not None:
            sock = bind_unix_socket(
                self.listen.path, self._socket_mode, self._socket_owner, self._socket_group
            )
            st = os.lstat(self.listen.path)
            self._socket_file = (st.st_dev, st.st_ino)
            self._server = await self.loop.create_unix_server(factory, sock=sock, backlog=1024)
        else:
            try:
                self._server = await self.loop.create_server(
                    factory, self.listen.host, self.listen.port, backlog=1024, reuse_address=True
                )
            except OSError as exc:
                # uvloop's message repeats the address; the errno's text is enough.
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(f"cannot listen on {self.listen}: {reason}") from exc
            port = self._server.sockets[0].getsockname()[1]
            self.listen = Endpoint(host=self.listen.host, port=port)

    def _accept(self) -> asyncio.Protocol:
        if len(self._pairs) >= self._max_connections:
            if self._events is not None:
                self._events.connection_rejected()
            return _Rejected()
        return _Pair(self).client

    async def open_upstream(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport:
        ep = self.upstream_endpoint
        if ep.path is not None:
            coro = self.loop.create_unix_connection(factory, ep.path)
        else:
            coro = self.loop.create_connection(factory, ep.host, ep.port)
        try:
            # A timeout scope, not wait_for: wait_for runs the connect in a second task,
            # one more task and future per connection.
            async with asyncio.timeout(self._connect_timeout):
                transport, _ = await coro
        except TimeoutError as exc:
            raise OSError(f"connecting to {ep} timed out") from exc
        if ep.path is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return transport

    async def probe_upstream(self) -> bool:
        """Connect and disconnect once: is step-runner accepting connections?"""
        try:
            transport = await self.open_upstream(asyncio.Protocol)
        except OSError:
            self.upstream_reachable(False)
            return False
        transport.close()
        self.upstream_reachable(True)
        return True

    def upstream_reachable(self, reachable: bool) -> None:
        if reachable != self._upstream_up:
            self._upstream_up = reachable
            if self._events is not None:
                self._events.upstream_state(reachable)

    def connection_opened(self, pair: _Pair) -> None:
        self._pairs.add(pair)

    def connection_closed(self, pair: _Pair) -> None:
        self._pairs.discard(pair)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
            path, created = self.listen.path, self._socket_file
            if path is not None and created is not None:
                # Only the socket file we bound: whatever replaced it while we ran
                # (a new instance's socket, a file, a symlink) is not ours to delete.
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if (st.st_dev, st.st_ino) == created:
                        os.unlink(path)
                self._socket_file = None

    async def drain(self, grace: float) -> int:
        """Wait up to `grace` seconds for open connections to end, then cut the rest.
        Returns how many were cut."""
        pending = [p.done for p in self._pairs]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        cut = list(self._pairs)
        for pair in cut:
            pair.close(abort=True)
        return len(cut)

    async def close(self, grace: float = 0.0) -> None:
        await self.stop_accepting()
        await self.drain(grace)
        if self._server is not None:
            await self._server.wait_closed()


class _Rejected(asyncio.Protocol):
    """Over the connection limit: closed at once, as a refused dial would be."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class ListenError(StartError):
    """The listening socket cannot be created."""


def check_upstream(upstream: Endpoint) -> None:
    """Refuse an upstream path that can never be a socket to connect to. A missing one
    is fine: step-runner may start after the sidecar, and upstream_up says so."""
    if upstream.path is None:
        return
    try:
        st = os.stat(upstream.path)
    except OSError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
        raise StartError(f"upstream {upstream}: {upstream.path} is {kind}")


def bind_unix_socket(path: str, mode: int, owner: int | None, group: int | None) -> socket.socket:
    """A listening unix socket at `path` with `mode`, never world-writable in between.

    A stale socket file (nobody listening) is replaced; a live one, a symlink or any
    other file is refused: the sidecar never deletes what it did not create.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
            raise ListenError(f"{path} exists and is {kind}; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: its server is gone
        else:
            raise ListenError(f"{path}: another process is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the file with the umask applied; a strict umask means the
    # socket is never briefly more open than `mode`.
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    try:
        if owner is not None or group is not None:
            os.chown(path, -1 if owner is None else owner, -1 if group is None else group)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        os.unlink(path)
        raise ListenError(f"cannot set owner/mode of {path}: {exc.strerror}") from exc
    sock.setblocking(False)
    sock.listen(1024)
    return sock
