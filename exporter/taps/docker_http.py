"""Follows the HTTP/1.1 exchanges of one Docker Engine API connection, passively.

Two h11 connections read the two directions: a server-role one the client's bytes (the
requests), a client-role one the daemon's bytes (the responses). h11 is a protocol
endpoint, not a spectator, so each is also told what the other side said: every request
read is "sent" on the response reader (so it knows about HEAD, Upgrade and
100-continue), every response read is "sent" on the request reader (so it knows when a
keep-alive cycle ends or the connection must close). The mirrored messages carry no body
and no framing headers of their own; the bytes h11 writes for them are dropped.

Bodies pass through h11's readers in pieces and are handed on only when the handler asked
for them; nothing else of a body is kept. At a protocol switch (`101`) or a hijack (a
response whose body runs until the connection closes: the Docker daemon's raw and
multiplexed streams when the client did not ask to upgrade) the follower hands the
unread bytes of both directions to the handler and is done: from there the connection
is not HTTP any more.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, cast

import h11

# Bytes a direction may send while the other one is expected to speak (h11 pauses,
# holding them): a Docker client does not pipeline, so more than this is not followed.
MAX_UNREAD = 256 * 1024

# The request reader's states for the client once its request has ended.
_REQUEST_ENDED = (h11.DONE, h11.MUST_CLOSE, h11._state.MIGHT_SWITCH_PROTOCOL)

# A mirrored request carries only what h11 needs to read its response (HEAD is in the
# method): the rest would only be validated again. Its framing is h11's own business.
_MIRRORED = frozenset({b"host", b"connection", b"upgrade", b"expect"})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class HttpError(Exception):
    """The exchange cannot be followed; forwarding goes on, following stops.

    Its text is the name of what failed, never a message about the bytes (h11 quotes
    them, and headers or bodies may carry secrets). `unexpected` when it was not a
    protocol error: h11 in a state it did not foresee, or a bug of ours.
    """

    def __init__(self, what: str, *, unexpected: bool = False) -> None:
        super().__init__(what)
        self.unexpected = unexpected


class HttpHandler(Protocol):
    """What the follower reports. `request` and `response` return whether the body is
    wanted; only then do `request_body` / `response_body` see its pieces."""

    def request(self, method: bytes, target: bytes, now: float) -> bool: ...

    def request_body(self, data: bytes) -> None: ...

    def request_end(self, now: float) -> None: ...

    def response(self, status: int, now: float) -> bool: ...

    def response_body(self, data: bytes) -> None: ...

    def response_end(self, now: float) -> None: ...

    def switched(self, status: int, client_rest: bytes, server_rest: bytes, now: float) -> None:
        """The connection is raw from here; `*_rest` are the bytes each side sent after
        the HTTP part (the client's first stdin bytes, the daemon's first stream bytes)."""


class HttpFollower:
    __slots__ = (
        "_done",
        "_handler",
        "_method",
        "_request_body",
        "_requests",
        "_response_body",
        "_responses",
    )

    def __init__(self, handler: HttpHandler) -> None:
        self._handler = handler
        self._requests = h11.Connection(h11.SERVER)  # reads the client's bytes
        self._responses = h11.Connection(h11.CLIENT)  # reads the daemon's bytes
        self._request_body = False
        self._response_body = False
        self._method = b""
        self._done = False

    @property
    def done(self) -> bool:
        """Switched to a raw stream: not HTTP any more."""
        return self._done

    def client_data(self, data: bytes, now: float) -> None:
        self._receive(self._requests, data, now)

    def server_data(self, data: bytes, now: float) -> None:
        self._receive(self._responses, data, now)

    def _receive(self, conn: h11.Connection, data: bytes, now: float) -> None:
        if self._done or not data:
            return
        conn.receive_data(data)
        pump, other = (
            (self._pump_requests, self._pump_responses)
            if conn is self._requests
            else (self._pump_responses, self._pump_requests)
        )
        try:
            # Each pump reads its direction until it must wait (or hands over at the end
            # of a response); what one read can only unblock the other (a request its
            # response, a response the next request), so they take turns until neither
            # moves. New bytes that moved nothing changed nothing.
            quiet = 0 if pump(now) else 2
            while quiet < 2 and not self._done:
                pump, other = other, pump
                quiet = 0 if pump(now) else quiet + 1
        except h11.ProtocolError as exc:
            raise HttpError(type(exc).__name__) from None
        except Exception as exc:
            raise HttpError(type(exc).__name__, unexpected=True) from None

    def _pump_requests(self, now: float) -> bool:
        conn, handler = self._requests, self._handler
        progressed = False
        while (event := _next_event(conn)) is not None:
            progressed = True
            if isinstance(event, h11.Data):
                if self._request_body:
                    handler.request_body(event.data)
            elif isinstance(event, h11.Request):
                self._method = event.method
                self._request_body = handler.request(event.method, event.target, now)
                headers = _mirrored(event.headers)
                if event.http_version != b"1.1":
                    headers.append((b"connection", b"close"))  # HTTP/1.0 does not keep alive
                    if not any(name == b"host" for name, _ in headers):
                        headers.append((b"host", b"docker"))
                mirror = self._responses
                mirror.send(h11.Request(method=event.method, target=event.target, headers=headers))
                mirror.send(h11.EndOfMessage())
            elif isinstance(event, h11.EndOfMessage):
                self._request_body = False
                handler.request_end(now)
                self._next_cycle()
            else:  # ConnectionClosed: nothing more will come
                return True
        return progressed

    def _pump_responses(self, now: float) -> bool:
        conn, handler = self._responses, self._handler
        progressed = False
        while (event := _next_event(conn)) is not None:
            progressed = True
            if isinstance(event, h11.Data):
                if self._response_body:
                    handler.response_body(event.data)
            elif isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._switch(101, now)
                    return True
                self._requests.send(
                    h11.InformationalResponse(status_code=event.status_code, headers=[])
                )
            elif isinstance(event, h11.Response):
                if _until_close(self._method, event) or conn.their_state is h11.SWITCHED_PROTOCOL:
                    self._switch(event.status_code, now)
                    return True
                self._response_body = handler.response(event.status_code, now)
                keep_alive = event.http_version == b"1.1" and not _has_token(
                    event.headers, b"connection", b"close"
                )
                self._requests.send(
                    h11.Response(
                        status_code=event.status_code,
                        headers=[] if keep_alive else [(b"connection", b"close")],
                    )
                )
            elif isinstance(event, h11.EndOfMessage):
                self._response_body = False
                handler.response_end(now)
                self._requests.send(h11.EndOfMessage())
                self._next_cycle()
                # The next response may already be here, its request not yet read (a
                # pipelining client): the request reader goes first.
                return True
            else:  # ConnectionClosed
                return True
        return progressed

    def _next_cycle(self) -> None:
        for conn in (self._requests, self._responses):
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()

    def _switch(self, status: int, now: float) -> None:
        requests = self._requests
        if requests.their_state not in _REQUEST_ENDED:
            raise h11.RemoteProtocolError("switched before the request ended")
        self._done = True
        client_rest = requests.trailing_data[0]
        server_rest = self._responses.trailing_data[0]
        self._handler.switched(status, client_rest, server_rest, now)


def _next_event(conn: h11.Connection) -> h11.Event | None:
    """The next event of a direction, or None when it must wait: for more bytes, or
    (paused) for the other side to speak, with its held bytes bounded."""
    event = conn.next_event()
    if event is h11.NEED_DATA:
        return None
    if event is h11.PAUSED:
        # A paused direction's bytes wait in h11 until the other side has spoken.
        if len(conn.trailing_data[0]) > MAX_UNREAD:
            raise HttpError("too many bytes sent out of turn")
        return None
    # The sentinels are classes, which `is` does not narrow away; isinstance on the
    # Event ABC would, at several times the cost of a cast on every event.
    return cast(h11.Event, event)


def _mirrored(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name in _MIRRORED]


def _has_token(headers: Iterable[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    tokens = (t.strip().lower() for n, value in headers if n == name for t in value.split(b","))
    return token in tokens


def _until_close(method: bytes, response: h11.Response) -> bool:
    """A response body that only the connection's end delimits (RFC 9112 6.3): how the
    Docker daemon answers a hijacked attach or exec start that asked for no upgrade."""
    status = response.status_code
    if method == b"HEAD" or status in (204, 304):
        return False
    return not any(name in _FRAMING for name, _ in response.headers)
