"""The docker tap's HTTP/1.1 follower (exporter/taps/docker_http.py): both directions
of an API connection, as bytes, in the orders a real client and daemon produce them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.taps.docker_http import MAX_UNREAD, HttpError, HttpFollower


@dataclass
class Handler:
    """Records what the follower reports; wants every body."""

    events: list[tuple[str, object]] = field(default_factory=list)
    request_bodies: list[bytes] = field(default_factory=list)
    response_bodies: list[bytes] = field(default_factory=list)
    want_bodies: bool = True
    rest: tuple[bytes, bytes] | None = None

    def request(self, method: bytes, target: bytes, now: float) -> bool:
        self.events.append(("request", (method, target)))
        self.request_bodies.append(b"")
        return self.want_bodies

    def request_body(self, data: bytes) -> None:
        self.request_bodies[-1] += data

    def request_end(self, now: float) -> None:
        self.events.append(("request_end", None))

    def response(self, status: int, now: float) -> bool:
        self.events.append(("response", status))
        self.response_bodies.append(b"")
        return self.want_bodies

    def response_body(self, data: bytes) -> None:
        self.response_bodies[-1] += data

    def response_end(self, now: float) -> None:
        self.events.append(("response_end", None))

    def switched(self, status: int, client_rest: bytes, server_rest: bytes, now: float) -> None:
        self.events.append(("switched", status))
        self.rest = (client_rest, server_rest)


def follow(exchange: list[tuple[int, bytes]], *, want_bodies: bool = True) -> Handler:
    """Feed (direction, bytes) pieces: 0 client to daemon, 1 daemon to client."""
    handler = Handler(want_bodies=want_bodies)
    follower = HttpFollower(handler)
    for direction, data in exchange:
        (follower.server_data if direction else follower.client_data)(data, 0.0)
    return handler


PING = b"HEAD /_ping HTTP/1.1\r\nHost: api.moby.localhost\r\n\r\n"
PONG = b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 0\r\n\r\n"
INSPECT = b"GET /v1.41/containers/abc/json HTTP/1.1\r\nHost: docker\r\n\r\n"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'6\r\n{"Id":\r\n6\r\n"abc"}\r\n0\r\n\r\n'
)
CREATE_BODY = b'{"Cmd":["h","steps","proxy"],"Tty":false}'
CREATE = (
    b"POST /v1.41/containers/abc/exec HTTP/1.1\r\nHost: docker\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(CREATE_BODY), CREATE_BODY)
)
CREATED = b'HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\n{"Id":"e1"}'
START = (
    b"POST /v1.41/exec/e1/start HTTP/1.1\r\nHost: docker\r\nContent-Length: 29\r\n"
    b"Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Type: application/json\r\n\r\n"
    b'{"Detach":false,"Tty":false}\n'
)
UPGRADED = (
    b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
    b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
STDOUT_FRAME = b"\x01\x00\x00\x00\x00\x00\x00\x09\x00\x00\x00\x04\x00\x00\x00\x00\x00"

KEEP_ALIVE = [(0, PING), (1, PONG), (0, INSPECT), (1, CHUNKED), (0, CREATE), (1, CREATED)]
KEEP_ALIVE_EVENTS = [
    ("request", (b"HEAD", b"/_ping")),
    ("request_end", None),
    ("response", 200),
    ("response_end", None),
    ("request", (b"GET", b"/v1.41/containers/abc/json")),
    ("request_end", None),
    ("response", 200),
    ("response_end", None),
    ("request", (b"POST", b"/v1.41/containers/abc/exec")),
    ("request_end", None),
    ("response", 201),
    ("response_end", None),
]


def test_a_keep_alive_sequence_of_requests_and_responses() -> None:
    h = follow(KEEP_ALIVE)
    assert h.events == KEEP_ALIVE_EVENTS
    assert h.request_bodies == [b"", b"", CREATE_BODY]
    assert h.response_bodies == [b"", b'{"Id":"abc"}', b'{"Id":"e1"}']


def test_split_at_every_byte_of_each_message() -> None:
    for direction, message in KEEP_ALIVE:
        for cut in range(len(message) + 1):
            pieces = []
            for d, m in KEEP_ALIVE:
                if m is message and d == direction:
                    pieces += [(d, message[:cut]), (d, message[cut:])]
                else:
                    pieces.append((d, m))
            h = follow(pieces)
            assert h.events == KEEP_ALIVE_EVENTS, (message, cut)
            assert h.response_bodies[1] == b'{"Id":"abc"}', (message, cut)


def test_bodies_not_asked_for_are_not_handed_on() -> None:
    h = follow(KEEP_ALIVE, want_bodies=False)
    assert h.events == KEEP_ALIVE_EVENTS
    assert h.request_bodies == [b"", b"", b""]
    assert h.response_bodies == [b"", b"", b""]


def test_head_response_with_content_length_has_no_body() -> None:
    head = b"HEAD /v1.41/containers/abc/archive?path=/x HTTP/1.1\r\nHost: d\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n"
    h = follow([(0, head), (1, answer), (0, PING), (1, PONG)])
    assert [e for e, _ in h.events].count("response_end") == 2


def test_100_continue_then_the_response() -> None:
    put = (
        b"PUT /v1.41/containers/abc/archive?path=/ HTTP/1.1\r\nHost: d\r\n"
        b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    h = follow(
        [
            (0, put),
            (1, b"HTTP/1.1 100 Continue\r\n\r\n"),
            (0, b"data"),
            (1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            (0, PING),
            (1, PONG),
        ]
    )
    assert h.request_bodies[0] == b"data"
    assert h.events[:4] == [
        ("request", (b"PUT", b"/v1.41/containers/abc/archive?path=/")),
        ("request_end", None),
        ("response", 200),
        ("response_end", None),
    ]
    assert len(h.events) == 8


def test_connection_close_ends_following_cleanly_and_more_bytes_are_an_error() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    h = follow([(0, INSPECT), (1, closing)])
    assert h.events[-1] == ("response_end", None)
    handler = Handler()
    follower = HttpFollower(handler)
    follower.client_data(INSPECT, 0.0)
    follower.server_data(closing, 0.0)
    with pytest.raises(HttpError):
        follower.client_data(PING, 0.0)


def test_request_with_connection_close() -> None:
    req = b"GET /v1.41/info HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
    h = follow([(0, req), (1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")])
    assert h.response_bodies == [b"{}"]


def test_http_1_0_request() -> None:
    req = b"GET /v1.41/version HTTP/1.0\r\n\r\n"
    answer = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    h = follow([(0, req), (1, answer)])
    assert h.events[-1] == ("response_end", None) and h.response_bodies == [b"{}"]


def test_upgrade_with_the_http2_preface_in_the_same_packet_as_the_request() -> None:
    h = follow([(0, START + PREFACE), (1, UPGRADED + STDOUT_FRAME)])
    assert h.events[-1] == ("switched", 101)
    assert h.rest == (PREFACE, STDOUT_FRAME)


def test_upgrade_split_at_every_byte() -> None:
    exchange, answer = START + PREFACE, UPGRADED + STDOUT_FRAME
    for cut in range(len(exchange) + 1):
        for acut in range(len(answer) + 1):
            h = follow([(0, exchange[:cut]), (0, exchange[cut:]), (1, answer[:acut])])
            h_rest = follow(
                [(0, exchange[:cut]), (0, exchange[cut:]), (1, answer[:acut]), (1, answer[acut:])]
            )
            assert h_rest.events[-1] == ("switched", 101), (cut, acut)
            assert h_rest.rest is not None and h_rest.rest[0] == PREFACE, (cut, acut)
            if acut >= len(UPGRADED):
                # Switched in the first piece: the second one is the caller's to route.
                assert h.rest == (PREFACE, answer[len(UPGRADED) : acut]), (cut, acut)
            else:
                assert h.rest is None
                assert h_rest.rest[1] == STDOUT_FRAME, (cut, acut)


def test_a_200_hijack_without_upgrade() -> None:
    start = (
        b"POST /v1.24/exec/e1/start HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\n"
        b"Content-Type: application/json\r\n\r\n{}"
    )
    hijacked = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\n"
    h = follow([(0, start), (0, b"stdin"), (1, hijacked + STDOUT_FRAME)])
    assert h.events[-1] == ("switched", 200)
    assert h.rest == (b"stdin", STDOUT_FRAME)


def test_a_refused_upgrade_is_an_ordinary_response() -> None:
    refused = (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
        b'{"message":"x"}'
    )
    h = follow([(0, START), (1, refused), (0, PING), (1, PONG)])
    assert ("switched", 101) not in h.events
    assert h.events[-1] == ("response_end", None)
    assert h.response_bodies[0] == b'{"message":"x"}'


def test_an_early_response_before_the_request_body_ended() -> None:
    big = b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\nContent-Length: 100000\r\n\r\n"
    early = b"HTTP/1.1 413 Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    h = follow([(0, big + b"x" * 1000), (1, early), (0, b"y" * 99000)])
    assert h.events == [
        ("request", (b"POST", b"/v1.41/containers/create")),
        ("response", 413),
        ("response_end", None),
        ("request_end", None),
    ]


@pytest.mark.parametrize(
    "exchange",
    [
        [(0, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello")],
        [(0, b"GARBAGE\r\n\r\n")],
        [(0, b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n")],  # headers too long
        [(0, b"GET / HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")],
        [(0, PING), (1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nextra bytes\r\n\r\n")],
        [(0, START), (1, b"HTTP/1.1 101 Switching\r\n\r\n"[:-2] + b"\r\n")],  # fine: ends
        [(0, INSPECT), (1, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")],
        [(0, PING + b"z" * (MAX_UNREAD + 1))],  # pipelined beyond what is held
    ],
)
def test_hostile_or_unfollowable_input_raises_http_error_only(
    exchange: list[tuple[int, bytes]],
) -> None:
    handler = Handler()
    follower = HttpFollower(handler)
    try:
        for direction, data in exchange:
            (follower.server_data if direction else follower.client_data)(data, 0.0)
    except HttpError:
        return
    # Only the well-formed upgrade in this list may pass.
    assert handler.events[-1] == ("switched", 101)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_random_bytes_either_way_only_ever_raise_http_error(client: bytes, server: bytes) -> None:
    follower = HttpFollower(Handler())
    try:
        follower.client_data(client, 0.0)
        follower.server_data(server, 0.0)
    except HttpError:
        pass


WHOLE = b"".join(m for _, m in KEEP_ALIVE)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40))
def test_random_splits_of_a_keep_alive_exchange(sizes: list[int]) -> None:
    pieces: list[tuple[int, bytes]] = []
    for direction, message in KEEP_ALIVE:
        pos = 0
        for size in sizes:
            if pos >= len(message):
                break
            pieces.append((direction, message[pos : pos + size]))
            pos += size
        pieces.append((direction, message[pos:]))
    h = follow(pieces)
    assert h.events == KEEP_ALIVE_EVENTS
    assert h.request_bodies[2] == CREATE_BODY


def test_pipelined_requests_and_their_responses_in_one_read_each() -> None:
    h = follow([(0, PING + INSPECT + PING), (1, PONG + CHUNKED + PONG)])
    assert [e for e, _ in h.events] == ["request", "request_end", "response", "response_end"] * 3
    assert h.response_bodies == [b"", b'{"Id":"abc"}', b""]


def test_an_error_that_is_not_a_protocol_error_is_reported_as_unexpected() -> None:
    class Broken(Handler):
        def request(self, method: bytes, target: bytes, now: float) -> bool:
            raise KeyError("a bug")

    follower = HttpFollower(Broken())
    with pytest.raises(HttpError) as caught:
        follower.client_data(PING, 0.0)
    assert caught.value.unexpected and str(caught.value) == "KeyError"
