"""The web endpoint: /metrics (Prometheus text or OpenMetrics by `Accept`),
/-/healthy and /-/ready, optionally behind TLS and basic auth.

It runs in its own thread with a threading HTTP server, so a scrape never competes
with the byte splice's event loop for scheduling (only for the GIL, briefly).
"""

from __future__ import annotations

import gzip
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .errors import StartError

log = logging.getLogger("exporter.web")

# TLS handshake and idle time allowed to one web connection.
REQUEST_TIMEOUT = 30.0

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
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="web", kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def wait_for_scrape(self, after: int, timeout: float) -> bool:
        """Block until more than `after` scrapes have been served, or the timeout."""
        with self._scraped:
            return self._scraped.wait_for(lambda: self.scrapes > after, timeout)

    def _scrape_served(self) -> None:
        with self._scraped:
            self.scrapes += 1
            self._scraped.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

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
        if web.authorize is not None and not web.authorize(self.headers.get("Authorization")):
            self._send(401, b"Unauthorized\n", extra={"WWW-Authenticate": 'Basic realm="metrics"'})
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

    def _metrics(self, web: WebServer) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(web.registry)
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
