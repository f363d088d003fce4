"""Stopping the web endpoint's worker pool: a response being written is still sent
whole (the final scrape of a shutdown), a kept-alive idle connection does not hold
the stop for its timeout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.web import REQUEST_TIMEOUT, WebServer

from .harness import wait_until

pytestmark = pytest.mark.integration

BIG = 16 * 1024 * 1024  # far more than the socket buffers hold


class _Big(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("big", "x" * BIG, value=1)


def _request(sock: socket.socket) -> None:
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before the headers"
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    length = int(next(
        line.split(b":", 1)[1] for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ))  # fmt: skip
    rest = bytearray(body)
    while len(rest) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        rest += chunk
    return head, bytes(rest[:length]) if len(rest) >= length else bytes(rest)


def test_a_response_being_written_when_the_server_stops_is_sent_whole() -> None:
    registry = CollectorRegistry()
    registry.register(_Big())
    web = WebServer(registry, host="127.0.0.1", port=0)
    web.start()
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as client:
        _request(client)
        # The worker is writing: the first bytes are here, the rest cannot fit.
        wait_until(lambda: len(client.recv(1, socket.MSG_PEEK)) == 1, 30, "the response")
        stopper = threading.Thread(target=web.stop)
        stopper.start()
        head, body = _read_response(client)
        stopper.join(30)
        assert not stopper.is_alive()
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) > BIG and body.rstrip().endswith(b"big 1.0")


def test_an_idle_kept_alive_connection_does_not_hold_the_stop() -> None:
    web = WebServer(CollectorRegistry(), host="127.0.0.1", port=0)
    web.start()
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as client:
        _request(client)
        head, _ = _read_response(client)
        assert head.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        web.stop()  # the connection stays open on the client's side
        assert time.monotonic() - started < REQUEST_TIMEOUT / 3
