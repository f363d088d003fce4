"""The docker tap as the splice drives it: recorded real Docker CLI traffic
(tests/fixtures/docker, recorded by tests/integration/docker_recorder.py against a real
daemon) and synthetic exchanges, fed into the watchers of a real Sidecar's tap."""

from __future__ import annotations

import json
import logging
import random
import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from exporter.app import Sidecar
from exporter.config import TAPS as CONFIG_TAPS
from exporter.config import Address, Config, DockerConfig
from exporter.taps import TAPS
from exporter.taps.docker import DockerConnection, DockerTap, route, steps_proxy
from exporter.taps.docker_execs import ExecTable, MarkedExec
from tests.docker_capture import CLIENT, Recording, load

Splitter = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> Iterable[bytes]:
    return (data,)


def sidecar(**docker: int | float) -> Sidecar:
    config = Config(
        listen=Address.unix("/tmp/srx-unit-tap.sock"),
        upstream=Address.unix("/tmp/srx-unit-docker.sock"),
        tap="docker",
        docker=DockerConfig(**docker),  # type: ignore[arg-type]
    )
    return Sidecar(config, CollectorRegistry(), web=False, process_metrics=False)


def tap_of(car: Sidecar) -> DockerTap:
    assert isinstance(car.tap, DockerTap)
    return car.tap


def replay(car: Sidecar, recording: Recording, split: Splitter = whole) -> list[DockerConnection]:
    """Each recorded connection into its own watcher, in the recorded order."""
    watchers: dict[int, DockerConnection] = {}
    for chunk in recording.chunks:
        watcher = watchers.get(chunk.connection)
        if watcher is None:
            watcher = watchers[chunk.connection] = tap_of(car).watcher()
        feed = watcher.client_data if chunk.direction == CLIENT else watcher.server_data
        for piece in split(chunk.data):
            feed(piece, chunk.time)
    end = max(c.time for c in recording.chunks) + 0.001
    for watcher in watchers.values():
        watcher.connection_lost(end)
    return list(watchers.values())


def value(car: Sidecar, name: str, **labels: str) -> float:
    v = car.registry.get_sample_value(name, labels)
    assert v is not None, (name, labels)
    return v


def sessions(car: Sidecar, state: str) -> float:
    return value(car, "step_runner_exporter_docker_exec_sessions_total", state=state)


def requests(car: Sidecar, method: str, endpoint: str) -> float:
    return value(
        car, "step_runner_exporter_docker_requests_total", method=method, endpoint=endpoint
    )


def decode_errors(car: Sidecar, message: str) -> float:
    return value(car, "step_runner_exporter_decode_errors_total", message=message)


def handled(car: Sidecar, method: str, code: str = "OK") -> float:
    return value(
        car,
        "grpc_server_handled_total",
        grpc_type="server_stream" if method == "FollowLogs" else "unary",
        grpc_service="proto.StepRunner",
        grpc_method=method,
        grpc_code=code,
    )


# -- the registry ----------------------------------------------------------------------


def test_every_tap_the_config_accepts_is_registered() -> None:
    assert set(TAPS) == set(CONFIG_TAPS)


# -- real Docker CLI traffic -----------------------------------------------------------


def test_recorded_steps_proxy_exec_is_one_tapped_job(caplog: pytest.LogCaptureFixture) -> None:
    recording = load("exec_steps_proxy")
    facts = recording.facts
    car = sidecar()
    with caplog.at_level(logging.INFO, logger="exporter.jobs"):
        replay(car, recording)
    assert sessions(car, "tapped") == 1 and sessions(car, "not_step_runner") == 0
    for method in ("Run", "FollowLogs", "Status", "Close"):
        assert handled(car, method) == 1, method
    assert value(car, "step_runner_jobs_total", result="success") == 1
    assert requests(car, "POST", "exec_create") == 1
    assert requests(car, "POST", "exec_start") == 1
    assert requests(car, "HEAD", "other") == 1  # /_ping
    assert requests(car, "GET", "container") == 1
    assert requests(car, "GET", "other") == 1  # /exec/ID/json
    assert decode_errors(car, "docker_http") == 0 and decode_errors(car, "docker_stream") == 0
    assert decode_errors(car, "http2") == 0
    [line] = [r for r in caplog.records if r.getMessage() == "job classified"]
    fields = line.fields  # type: ignore[attr-defined]
    assert fields["job_id"] == facts["job_id"]
    assert fields["container_id"] == facts["container_id"]
    assert len(fields["exec_id"]) == 64
    assert len(tap_of(car).execs) == 0  # the mark is used up by the start


def test_recorded_exec_is_matched_across_its_two_connections() -> None:
    recording = load("exec_steps_proxy")
    assert len(recording.connections()) == 2
    create, start = recording.stream(0, CLIENT), recording.stream(1, CLIENT)
    assert b"/exec HTTP/1.1" in create and b"/start HTTP/1.1" in start
    assert b"/start" not in create and b"/exec HTTP" not in start


def test_recorded_stdout_frames_cut_http2_frames() -> None:
    # The premise of the demultiplexer's design, checked on the real daemon's output.
    recording = load("exec_steps_proxy")
    raw = recording.stream(1, 1)
    raw = raw[raw.index(b"\r\n\r\n") + 4 :]
    payload, pos, sizes = b"", 0, []
    while pos < len(raw):
        stream, size = struct.unpack_from(">BxxxI", raw, pos)
        if stream == 1:
            payload += raw[pos + 8 : pos + 8 + size]
            sizes.append(size)
        pos += 8 + size
    assert max(sizes) == 32768
    frame_starts, pos = set(), 0
    while pos < len(payload):
        frame_starts.add(pos)
        pos += 9 + int.from_bytes(payload[pos : pos + 3], "big")
    boundaries = {sum(sizes[: i + 1]) for i in range(len(sizes) - 1)}
    assert boundaries - frame_starts  # some stdcopy frame ends inside an HTTP/2 frame


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_recorded_steps_proxy_exec_in_random_pieces(seed: int) -> None:
    rnd = random.Random(seed)

    def split(data: bytes) -> Iterable[bytes]:
        pos = 0
        while pos < len(data):
            n = rnd.choice((1, 2, 7, 9, 100, 4096, 40000))
            yield data[pos : pos + n]
            pos += n

    car = sidecar()
    replay(car, load("exec_steps_proxy"), split)
    assert value(car, "step_runner_jobs_total", result="success") == 1
    assert sessions(car, "tapped") == 1
    assert decode_errors(car, "docker_stream") == 0 and decode_errors(car, "http2") == 0


def test_recorded_exec_of_another_program_is_not_step_runner() -> None:
    car = sidecar()
    replay(car, load("exec_cat"))
    assert sessions(car, "not_step_runner") == 1 and sessions(car, "tapped") == 0
    assert value(car, "grpc_server_started_total", grpc_type="unknown", grpc_service="unknown",
                 grpc_method="unknown") == 0  # fmt: skip
    assert decode_errors(car, "docker_http") == 0 and decode_errors(car, "http2") == 0


def test_recorded_ordinary_api_traffic_is_followed_without_errors() -> None:
    car = sidecar()
    replay(car, load("ps_logs_inspect"))
    assert requests(car, "GET", "container") == 4  # ps, inspect for logs, logs, inspect
    assert requests(car, "HEAD", "other") == 3
    assert sessions(car, "tapped") == 0 and sessions(car, "not_step_runner") == 0
    assert decode_errors(car, "docker_http") == 0


def test_a_start_replayed_without_its_create_is_not_step_runner() -> None:
    recording = load("exec_steps_proxy")
    only_start = Recording("", {}, tuple(c for c in recording.chunks if c.connection == 1))
    car = sidecar()
    replay(car, only_start)
    assert sessions(car, "not_step_runner") == 1
    assert value(car, "step_runner_jobs_total", result="success") == 0


def test_fixtures_hold_no_credentials() -> None:
    for name in ("exec_steps_proxy", "exec_cat", "ps_logs_inspect"):
        recording = load(name)
        for connection in recording.connections():
            client = recording.stream(connection, CLIENT).lower()
            assert b"authorization" not in client and b"x-registry-auth" not in client
            assert b'"env":null' in client or b"/exec http" not in client


# -- synthetic exchanges ---------------------------------------------------------------

CONTAINER = "c0ffee" * 8
EXEC_ID = "e" * 64


def http_request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: docker\r\n{headers}{length}\r\n".encode() + body


def http_response(status: str, body: bytes = b"", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


UPGRADE = "Connection: Upgrade\r\nUpgrade: tcp\r\n"
UPGRADED = b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"


def exec_create(cmd: list[str], tty: bool = False, env: list[str] | None = None) -> bytes:
    body = json.dumps({"AttachStdin": True, "Tty": tty, "Env": env, "Cmd": cmd}).encode()
    return http_request("POST", f"/v1.41/containers/{CONTAINER}/exec", body)


CREATED = http_response("201 Created", json.dumps({"Id": EXEC_ID}).encode())
START = http_request("POST", f"/v1.41/exec/{EXEC_ID}/start", b'{"Tty":false}', UPGRADE)
PROXY = ["/usr/bin/gitlab-runner-helper", "steps", "proxy", "--socket", "/tmp/s.sock"]


def create(car: Sidecar, cmd: list[str], tty: bool = False) -> None:
    w = tap_of(car).watcher()
    w.client_data(exec_create(cmd, tty), 1.0)
    w.server_data(CREATED, 1.0)


def test_steps_followed_by_proxy_marks_whatever_the_binary() -> None:
    assert steps_proxy(PROXY)
    assert steps_proxy(["gitlab-runner", "steps", "proxy"])
    assert steps_proxy(["/opt/step-runner", "--debug", "steps", "proxy", "--socket", "x"])
    assert not steps_proxy(["steps", "proxy"])  # no binary
    assert not steps_proxy(["sh", "-c", "steps proxy"])
    assert not steps_proxy(["x", "proxy", "steps"])
    assert not steps_proxy("x steps proxy")
    assert not steps_proxy(None)


@pytest.mark.parametrize(
    ("method", "path", "labels"),
    [
        ("POST", "/v1.41/containers/abc/exec", ("POST", "exec_create", "abc")),
        ("POST", "/containers/abc/exec", ("POST", "exec_create", "abc")),
        ("GET", "/containers/abc/exec", ("GET", "container", None)),
        ("POST", "/v1.41/containers/create?name=x", ("POST", "container", None)),
        ("DELETE", "/v1.41/containers/abc?force=1", ("DELETE", "container", None)),
        ("POST", "/v1.41/exec/e1/start", ("POST", "exec_start", "e1")),
        ("POST", "/v1.41/exec/e1/resize?h=1", ("POST", "other", None)),
        ("GET", "/v1.41/exec/e1/json", ("GET", "other", None)),
        ("POST", "/v1.41/images/create?fromImage=x", ("POST", "image", None)),
        ("HEAD", "/_ping", ("HEAD", "other", None)),
        ("PUT", "/v1.41/containers/abc/archive", ("PUT", "container", None)),
        ("PATCH", "/v1.41/containers/abc", ("other", "container", None)),
        ("GET", "http://x/containers/json", ("GET", "other", None)),
        ("POST", "/v1.41/containers/a%2Fb/exec", ("POST", "exec_create", None)),
        ("POST", "/v1.41/containers/" + "a" * 200 + "/exec", ("POST", "exec_create", None)),
    ],
)
def test_route_labels(method: str, path: str, labels: tuple[str, str, str | None]) -> None:
    r = route(method.encode(), path.encode())
    assert (r.method, r.endpoint, r.name) == labels


def test_a_marked_exec_started_on_another_connection_is_tapped() -> None:
    car = sidecar()
    create(car, PROXY)
    start = tap_of(car).watcher()
    start.client_data(START, 2.0)
    start.server_data(UPGRADED, 2.0)
    assert sessions(car, "tapped") == 1
    # From here the splice calls the gRPC observer and the demultiplexer directly.
    assert start.client_data.__self__.__class__.__name__ == "ConnectionObserver"  # type: ignore[attr-defined]
    assert start.server_data.__self__.__class__.__name__ == "StdcopyDemultiplexer"  # type: ignore[attr-defined]


def test_a_tty_exec_is_raw() -> None:
    car = sidecar()
    create(car, PROXY, tty=True)
    start = tap_of(car).watcher()
    start.client_data(START, 2.0)
    start.server_data(UPGRADED, 2.0)
    assert sessions(car, "tapped") == 1
    assert start.server_data.__self__.__class__.__name__ == "ConnectionObserver"  # type: ignore[attr-defined]


def test_an_exec_that_is_not_steps_proxy_is_not_marked() -> None:
    car = sidecar()
    create(car, ["/bin/sh", "-c", "echo steps proxy"])
    assert len(tap_of(car).execs) == 0
    start = tap_of(car).watcher()
    start.client_data(START, 2.0)
    start.server_data(UPGRADED, 2.0)
    assert sessions(car, "not_step_runner") == 1


def test_a_create_body_over_the_bound_is_not_marked_and_counted() -> None:
    car = sidecar(max_body_bytes=100)
    padded = [*PROXY, "x" * 200]
    create(car, padded)
    assert len(tap_of(car).execs) == 0
    assert decode_errors(car, "docker_http") == 1
    car = sidecar(max_body_bytes=100_000)
    create(car, padded)
    assert len(tap_of(car).execs) == 1


def test_a_create_answered_with_an_error_marks_nothing() -> None:
    car = sidecar()
    w = tap_of(car).watcher()
    w.client_data(exec_create(PROXY), 1.0)
    w.server_data(http_response("409 Conflict", b'{"message":"container is not running"}'), 1.0)
    assert len(tap_of(car).execs) == 0
    assert decode_errors(car, "docker_http") == 0


def test_a_refused_start_keeps_the_mark_for_a_later_start() -> None:
    car = sidecar()
    create(car, PROXY)
    w = tap_of(car).watcher()
    w.client_data(START, 2.0)
    w.server_data(http_response("404 Not Found", b'{"message":"no such exec"}'), 2.0)
    assert sessions(car, "tapped") == 0 and len(tap_of(car).execs) == 1
    w.client_data(START, 3.0)
    w.server_data(UPGRADED, 3.0)
    assert sessions(car, "tapped") == 1


def test_bad_multiplexing_is_counted_and_stops_following_without_ending_calls() -> None:
    car = sidecar()
    create(car, PROXY)
    w = tap_of(car).watcher()
    w.client_data(START, 2.0)
    w.server_data(UPGRADED + b"\x09garbage", 2.0)
    assert decode_errors(car, "docker_stream") == 1
    w.server_data(b"more", 2.1)
    w.connection_lost(3.0)
    assert decode_errors(car, "docker_stream") == 1


def test_unfollowable_http_is_counted_once_and_the_watcher_goes_quiet() -> None:
    car = sidecar()
    w = tap_of(car).watcher()
    w.client_data(b"\x00\x01\x02 not http\r\n\r\n", 1.0)
    w.client_data(b"more garbage\r\n\r\n", 1.0)
    w.server_data(b"HTTP/1.1 400 Bad Request\r\n\r\n", 1.0)
    w.connection_lost(2.0)
    assert decode_errors(car, "docker_http") == 1


SECRET = "s3cr3t-t0ken-value-9f8e7d"


def test_secrets_in_bodies_appear_in_no_log_and_no_metric(
    caplog: pytest.LogCaptureFixture,
) -> None:
    car = sidecar(max_body_bytes=300)
    container = json.dumps(
        {"Image": "x", "Env": [f"CI_JOB_TOKEN={SECRET}"], "Cmd": ["steps", "serve"]}
    ).encode()
    exchanges = [
        # A container create: its body is never looked at.
        (http_request("POST", "/v1.41/containers/create", container),
         http_response("201 Created", b'{"Id":"' + CONTAINER.encode() + b'","Warnings":[]}')),
        # An exec create that is not steps proxy, with the secret in its Env.
        (exec_create(["/bin/sh"], env=[f"TOKEN={SECRET}"]), CREATED),
        # A steps proxy exec create with the secret in its Env, and one over the bound.
        (exec_create(PROXY, env=[f"TOKEN={SECRET}"]), CREATED),
        (exec_create(PROXY, env=[f"TOKEN={SECRET}" * 20]), CREATED),
        # Bodies that break the JSON or the HTTP around the secret.
        (http_request("POST", f"/containers/{CONTAINER}/exec", f'{{"Env":["{SECRET}'.encode()),
         http_response("400 Bad Request", f'{{"message":"{SECRET}"}}'.encode())),
        (f"POST /containers/create HTTP/1.1\r\nHost: d\r\nX-Token: {SECRET}\r\n"
         f"Content-Length: nope{SECRET}\r\n\r\n".encode(), b""),
    ]  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        for request, response in exchanges:
            w = tap_of(car).watcher()
            w.client_data(request, 1.0)
            w.server_data(response, 1.0)
            w.connection_lost(2.0)
    assert decode_errors(car, "docker_http") >= 2  # the bound, the bad JSON, the bad header
    logged = "\n".join(
        f"{r.getMessage()} {getattr(r, 'fields', '')} {r.exc_info}" for r in caplog.records
    )
    assert caplog.records  # debug lines were written, just without the secret
    assert SECRET not in logged
    assert SECRET.encode() not in generate_latest(car.exposed)


# -- the exec table --------------------------------------------------------------------


def marked(i: int) -> MarkedExec:
    return MarkedExec(f"exec{i}", "c", False)


def test_exec_table_takes_a_mark_once() -> None:
    table = ExecTable(max_execs=10, ttl=60)
    table.mark(marked(1), 0.0)
    assert table.take("exec1", 1.0) == marked(1)
    assert table.take("exec1", 1.0) is None
    assert table.take("exec2", 1.0) is None


def test_exec_table_forgets_after_the_ttl() -> None:
    table = ExecTable(max_execs=10, ttl=60)
    table.mark(marked(1), 0.0)
    table.mark(marked(2), 30.0)
    assert table.take("exec1", 60.0) is None
    assert table.take("exec2", 60.0) == marked(2)


def test_exec_table_keeps_the_newest_max_execs() -> None:
    table = ExecTable(max_execs=3, ttl=600)
    for i in range(10):
        table.mark(marked(i), float(i))
    assert len(table) == 3
    assert [table.take(f"exec{i}", 10.0) is not None for i in range(10)] == [False] * 7 + [True] * 3


def test_exec_table_is_shared_by_the_connections_of_a_tap_and_bounded_by_config() -> None:
    car = sidecar(max_execs=2, exec_ttl=5.0)
    for _ in range(3):
        create(car, PROXY)
    assert len(tap_of(car).execs) == 1  # one exec id, marked thrice
    tap_of(car).execs.mark(MarkedExec("a", "c", False), 1.0)
    tap_of(car).execs.mark(MarkedExec("b", "c", False), 1.0)
    assert len(tap_of(car).execs) == 2
    assert tap_of(car).execs.take("b", 7.0) is None


def test_a_deeply_nested_create_body_is_counted_not_raised() -> None:
    car = sidecar(max_body_bytes=200_000)
    w = tap_of(car).watcher()
    w.client_data(http_request("POST", f"/containers/{CONTAINER}/exec", b"[" * 100_000), 1.0)
    assert decode_errors(car, "docker_http") == 1
    w.server_data(http_response("400 Bad Request", b"{}"), 1.0)
    w.client_data(exec_create(PROXY), 2.0)  # the connection is still followed
    w.server_data(CREATED, 2.0)
    assert len(tap_of(car).execs) == 1
