"""The `docker` tap (SPEC section 7): the listening socket speaks the Docker Engine API.

Each API connection is followed as HTTP/1.1 (docker_http) on the side of the splice.
An exec create whose `Cmd` runs `... steps proxy ...` marks the exec id of its `201`
answer in the tap's one ExecTable (docker_execs); when a connection starts a marked
exec and the daemon hijacks it (`101`, or `200` with a raw stream), the rest of that
connection is a step-runner connection: the client's bytes go to a gRPC observer as
they are, the daemon's through the stdcopy demultiplexer (docker_stream) unless the
exec has a Tty. From then on the splice calls the gRPC observer (or the
demultiplexer) directly: the HTTP follower is out of the path.

Only an exec create's request and response bodies are ever held (at most
`docker.max_body_bytes`, and only until they are parsed); every other body passes
through h11 unseen. Container create bodies carry job secrets: nothing here logs a
body, a header or a parser's message about them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote_to_bytes

from ..metrics import DOCKER_METHODS
from ..observer import ConnectionObserver
from . import TapParts
from .docker_execs import ExecTable, MarkedExec
from .docker_http import HttpError, HttpFollower
from .docker_stream import StdcopyDemultiplexer, StreamError

log = logging.getLogger("exporter.docker")

# /v1.41/containers/ID/exec, /exec/ID/start: the API version prefix is optional.
_PATH = re.compile(rb"^(?:/v\d+(?:\.\d+)?)?(/[^?#]*)")
# Container names and ids as the daemon accepts them; exec ids are 64 hex digits. Both
# end up in a log line, so nothing else is taken.
_NAME = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_METHODS = frozenset(m for m in DOCKER_METHODS if m != "other")


@dataclass(frozen=True, slots=True)
class Route:
    method: str  # label value
    endpoint: str  # label value
    name: str | None = None  # the container (exec_create) or exec (exec_start) id


def route(method: bytes, target: bytes) -> Route:
    """The labels of a request, and the id in its path for exec create and start."""
    label = method.decode("ascii", "replace")
    if label not in _METHODS:
        label = "other"
    match = _PATH.match(target)
    parts = match.group(1).split(b"/") if match else []
    # parts[0] is the empty string before the path's first slash.
    top = parts[1] if len(parts) > 1 else b""
    if top == b"containers":
        if len(parts) == 4 and parts[3] == b"exec" and method == b"POST":
            return Route(label, "exec_create", _name(parts[2]))
        return Route(label, "container")
    if top == b"exec" and len(parts) == 4 and parts[3] == b"start" and method == b"POST":
        return Route(label, "exec_start", _name(parts[2]))
    if top == b"images":
        return Route(label, "image")
    return Route(label, "other")


def _name(segment: bytes) -> str | None:
    name = unquote_to_bytes(segment)
    return name.decode("ascii") if _NAME.match(name) else None


def steps_proxy(cmd: object) -> bool:
    """`[<any binary>, ..., "steps", "proxy", ...]`: GitLab Runner's exec of step-runner."""
    if not isinstance(cmd, list):
        return False
    return any(cmd[i] == "steps" and cmd[i + 1] == "proxy" for i in range(1, len(cmd) - 1))


class DockerTap:
    upstream_name = "Docker daemon"
    default_socket_group: str | None = "docker"

    def __init__(self, parts: TapParts) -> None:
        self.parts = parts
        cfg = parts.config.docker
        self.max_body_bytes = cfg.max_body_bytes
        self.execs = ExecTable(max_execs=cfg.max_execs, ttl=cfg.exec_ttl)
        self.metrics = parts.accounting.metrics

    def watcher(self) -> DockerConnection:
        return DockerConnection(self)

    def decode_error(self, message: str) -> None:
        self.parts.accounting.decode_error(message)

    def grpc_observer(self, marked: MarkedExec) -> ConnectionObserver:
        context = (("container_id", marked.container_id), ("exec_id", marked.exec_id))
        return self.parts.grpc_observer(self.parts.accounting.bound(context))


def _ignore(data: bytes, now: float) -> None:
    pass


def _ignore_end(now: float) -> None:
    pass


class DockerConnection:
    """The watcher of one API connection.

    Its three entry points are attributes, not methods, so that once the connection is
    an exec session (or not followed any more) the splice calls the gRPC observer, the
    demultiplexer or a no-op without a hop through here.
    """

    client_data: Callable[[bytes, float], None]
    server_data: Callable[[bytes, float], None]
    connection_lost: Callable[[float], None]

    def __init__(self, tap: DockerTap) -> None:
        self._tap = tap
        self._http = HttpFollower(self)
        self._route = Route("other", "other")
        # An exec create in flight: its request body so far (None when not wanted or
        # over the bound), then what it asked for; the same for its answer.
        self._create_body: bytearray | None = None
        self._create: MarkedExec | None = None  # a steps-proxy create (exec id still "")
        self._response_body: bytearray | None = None
        self.client_data = self._follow_client
        self.server_data = self._follow_server
        self.connection_lost = _ignore_end

    # -- following HTTP --------------------------------------------------------------

    def _follow_client(self, data: bytes, now: float) -> None:
        try:
            self._http.client_data(data, now)
        except HttpError as exc:
            self._http_failed(exc)

    def _follow_server(self, data: bytes, now: float) -> None:
        try:
            self._http.server_data(data, now)
        except HttpError as exc:
            self._http_failed(exc)

    def _http_failed(self, exc: HttpError) -> None:
        if exc.unexpected:
            log.warning("unexpected %s while following a Docker API connection", exc)
        self._unfollowable("docker_http", exc)

    def _unfollowable(self, message: str, exc: Exception) -> None:
        # The exception names what failed, never the bytes (they may carry secrets).
        log.debug("stopped following a Docker API connection: %s", exc)
        self._stop()
        self._tap.decode_error(message)

    def _stop(self) -> None:
        self.client_data = self.server_data = _ignore
        self.connection_lost = _ignore_end
        self._create_body = self._response_body = None
        self._create = None

    def _bounded(self, body: bytearray | None, data: bytes) -> bytearray | None:
        """`body` with `data` added; None (not wanted, or a decode error once it would
        pass max_body_bytes) stays None."""
        if body is None:
            return None
        if len(body) + len(data) > self._tap.max_body_bytes:
            self._tap.decode_error("docker_http")
            return None
        body += data
        return body

    # -- HttpHandler -----------------------------------------------------------------

    def request(self, method: bytes, target: bytes, now: float) -> bool:
        r = self._route = route(method, target)
        self._tap.metrics.docker_request(r.method, r.endpoint)
        self._create = None
        if r.endpoint == "exec_create" and r.name is not None:
            self._create_body = bytearray()
            return True
        return False

    def request_body(self, data: bytes) -> None:
        self._create_body = self._bounded(self._create_body, data)

    def request_end(self, now: float) -> None:
        body, self._create_body = self._create_body, None
        container = self._route.name
        if body is None or container is None or self._route.endpoint != "exec_create":
            return
        try:
            config = json.loads(body)
        except (ValueError, RecursionError):  # deep nesting too: hostile, not a bug
            self._tap.decode_error("docker_http")
            return
        finally:
            del body  # the exec's Env may hold secrets: not kept a moment longer
        if isinstance(config, dict) and steps_proxy(config.get("Cmd")):
            self._create = MarkedExec("", container, config.get("Tty") is True)

    def response(self, status: int, now: float) -> bool:
        if self._create is not None and status == 201:
            self._response_body = bytearray()
            return True
        return False

    def response_body(self, data: bytes) -> None:
        self._response_body = self._bounded(self._response_body, data)

    def response_end(self, now: float) -> None:
        body, self._response_body = self._response_body, None
        create, self._create = self._create, None
        if body is None or create is None:
            return
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):  # deep nesting too: hostile, not a bug
            answer = None
        exec_id = answer.get("Id") if isinstance(answer, dict) else None
        if not isinstance(exec_id, str) or not _NAME.match(exec_id.encode()):
            self._tap.decode_error("docker_http")
            return
        self._tap.execs.mark(MarkedExec(exec_id, create.container_id, create.tty), now)

    def switched(self, status: int, client_rest: bytes, server_rest: bytes, now: float) -> None:
        r = self._route
        self._stop()
        if r.endpoint != "exec_start":
            return  # an attach or another hijack: raw bytes we do not follow
        marked = self._tap.execs.take(r.name, now) if r.name is not None else None
        if marked is None:
            self._tap.metrics.docker_exec_session("not_step_runner")
            return
        self._tap.metrics.docker_exec_session("tapped")
        observer = self._tap.grpc_observer(marked)
        self.client_data = observer.client_data
        self.connection_lost = observer.connection_lost
        if marked.tty:
            self.server_data = observer.server_data
        else:
            # FrameReader.feed takes any buffer; the slices are of the splice's bytes.
            to_observer = cast(Callable[[memoryview, float], None], observer.server_data)
            self.server_data = StdcopyDemultiplexer(to_observer, self._bad_stream).feed
        if client_rest:
            self.client_data(client_rest, now)
        if server_rest:
            self.server_data(server_rest, now)

    def _bad_stream(self, exc: StreamError) -> None:
        # Where the next frame starts is lost, so the calls open now cannot be seen to
        # end: they are dropped, not ended (as the gRPC observer does on bad HTTP/2).
        self._unfollowable("docker_stream", exc)
