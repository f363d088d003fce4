"""The web endpoint: /metrics (Prometheus text or OpenMetrics by `Accept`),
/-/healthy and /-/ready, optionally behind TLS and basic auth.

It runs on its own threads, so a scrape never competes with the byte splice's event
loop for scheduling (only for the GIL, briefly). A fixed pool of WORKERS threads
serves at most that many connections at once; further connections wait in the
kernel's listen backlog, at no cost to the splice, until a worker is free (a flood of
logins cannot start a thread each, and each bcrypt runs alone, see webconfig).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import select
import selectors
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .errors import StartError
from .exposition import Exposition

log = logging.getLogger("exporter.web")

# TLS handshake and idle time allowed to one web connection.
REQUEST_TIMEOUT = 30.0
# Connections served at once, and connections the kernel queues beyond them.
WORKERS = 8
BACKLOG = 128
# How much nicer than the rest of the process the web workers run.
WEB_NICE = 10

LANDING = b"""<html><head><title>step-runner-exporter</title></head><body>
<h1>step-runner-exporter</h1><p><a href="%s">Metrics</a></p></body></html>
"""


class WebServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "0.0.0.0",
        port: int = 9854,
        metrics_path: str = "/metrics",
        ready: Callable[[], bool] = lambda: True,
        tls: ssl.SSLContext | None = None,
        authorize: Callable[[str | None], bool] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = registry
        self.exposition = Exposition(registry)
        self.metrics_path = metrics_path
        self.ready = ready
        self.authorize = authorize
        self.headers = dict(headers or {})
        self.scrapes = 0
        self._scraped = threading.Condition()
        try:
            self._httpd = _Server((host, port), _Handler, self)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise StartError(
                f"cannot listen on {where} (web.listen_address): {exc.strerror or exc}"
            ) from exc
        if tls is not None:
            # The handshake happens in the request's thread (see _Server.finish_request):
            # done in accept(), one client that never sends a ClientHello would stall
            # every scrape and shutdown.
            self._httpd.socket = tls.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        # Several idle workers wait on the one listening socket; the losers of an
        # accept() must get EAGAIN, not block.
        self._httpd.socket.setblocking(False)
        self._workers: list[threading.Thread] = []
        self._stopping = threading.Event()
        # Idle workers sleep until a connection or stop(): a byte in this pipe, never
        # read, wakes every one of them (no periodic wake-ups to take the GIL).
        self._wake_read, self._wake_write = os.pipe()
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    def start(self, workers: int = WORKERS) -> None:
        for n in range(workers):
            thread = threading.Thread(target=self._work, name=f"web-{n}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        os.write(self._wake_write, b"x")
        with self._open_lock:
            for conn in self._open:
                # A kept-alive or stalled connection ends now, not at its timeout; a
                # response being written is still sent whole (only reading stops). The
                # plain socket's shutdown: SSLSocket's would pull the TLS state from
                # under the worker using it.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(conn, socket.SHUT_RD)
        for thread in self._workers:
            thread.join()
        self._workers.clear()
        self._httpd.server_close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _work(self) -> None:
        # Scrapes (and the bcrypt of a login) yield the CPU to the splice's event loop
        # when both want it: on Linux a thread id names just that thread here.
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WEB_NICE)
        httpd = self._httpd
        with selectors.DefaultSelector() as selector:
            selector.register(httpd.socket, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while True:
                selector.select()
                if self._stopping.is_set():
                    return
                try:
                    conn, address = httpd.get_request()
                except (BlockingIOError, InterruptedError):
                    continue  # another worker accepted it
                except OSError:
                    log.debug("web accept failed", exc_info=True)
                    continue
                self._serve(conn, address)

    def _serve(self, conn: socket.socket, address: Any) -> None:
        with self._open_lock:
            if self._stopping.is_set():
                conn.close()
                return
            self._open.add(conn)
        try:
            # accept() on the non-blocking listening socket; the handler sets timeouts.
            conn.setblocking(True)
            self._httpd.finish_request(conn, address)
        except Exception:
            self._httpd.handle_error(conn, address)
        finally:
            with self._open_lock:
                self._open.discard(conn)
            self._httpd.shutdown_request(conn)

    def wait_for_scrape(self, after: int, timeout: float) -> bool:
        """Block until more than `after` scrapes have been served, or the timeout."""
        with self._scraped:
            return self._scraped.wait_for(lambda: self.scrapes > after, timeout)

    def _scrape_served(self) -> None:
        with self._scraped:
            self.scrapes += 1
            self._scraped.notify_all()


class _Server(HTTPServer):
    """The listening socket and the request handling; WebServer's workers accept."""

    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], handler: Any, web: WebServer) -> None:
        self.web = web
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(REQUEST_TIMEOUT)
            request.do_handshake()
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping mid-response or failing the TLS handshake is not our error.
        log.debug("web request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "step-runner-exporter"
    protocol_version = "HTTP/1.1"
    # A client that stops sending or reading holds one thread only this long.
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        web = self.server.web
        if self._client_gone():
            # It waited in the backlog and gave up: no bcrypt, no scrape for nobody.
            self.close_connection = True
            return
        if web.authorize is not None and not web.authorize(self.headers.get("Authorization")):
            # Closed after a failed login: a client trying passwords on one kept-alive
            # connection would hold its worker; reconnecting queues it behind others.
            self.close_connection = True
            self._send(
                401,
                b"Unauthorized\n",
                extra={"WWW-Authenticate": 'Basic realm="metrics"', "Connection": "close"},
            )
            return
        path = self.path.split("?", 1)[0]
        if path == web.metrics_path:
            self._metrics(web)
        elif path == "/-/healthy":
            self._send(200, b"Healthy\n")
        elif path == "/-/ready":
            if web.ready():
                self._send(200, b"Ready\n")
            else:
                self._send(503, b"Not ready\n")
        elif path == "/":
            self._send(200, LANDING % web.metrics_path.encode(), content_type="text/html")
        else:
            self._send(404, b"Not found\n")

    def _client_gone(self) -> bool:
        """Whether the client has closed its end (EOF waiting after its request)."""
        conn = self.connection
        try:
            # poll, not select: a busy sidecar has descriptors beyond select's 1024.
            waiting = select.poll()
            waiting.register(conn, select.POLLIN)
            if not waiting.poll(0):
                return False
            # The plain socket's recv: SSLSocket refuses flags. A TLS client's EOF
            # reads as b"" there too (a close_notify is data, and answered as usual).
            return socket.socket.recv(conn, 1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _metrics(self, web: WebServer) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = web.exposition.render(encoder)
        extra = {}
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            extra["Content-Encoding"] = "gzip"
        self._send(200, body, content_type=content_type, extra=extra)
        web._scrape_served()

    def _send(
        self,
        code: int,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**self.server.web.headers, **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines can carry credentials in URLs; keep them out of the logs.
        pass
