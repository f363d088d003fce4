"""Ordinary Docker Engine API traffic through the docker tap behaves exactly as direct.

One real dockerd and one `step-runner-exporter serve --tap docker` process in front of
it for the whole module. Every check runs the same thing twice, once against the
daemon's own socket and once against the tap's, with the Docker CLI or with raw HTTP,
and compares the bytes (or, where the daemon itself answers differently each time, such
as a new container id, the shape of the answer). Afterwards the tap's own metrics must
account for exactly what was sent and count no job and no decode error.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .docker_daemon import DockerDaemon, UnixHTTPConnection, docker_daemon, run_cli
from .docker_tools import TOOL, tools_image
from .harness import ProcessLog, short_tmpdir, stop_process, wait_until
from .sidecar import docker_tap_process, http_get

pytestmark = pytest.mark.integration

COMMAND = str(Path(sys.executable).with_name("step-runner-exporter"))
API = "/v1.41"
MIB = 1024 * 1024
T = TypeVar("T")

# SPEC sections 4 and 7, as a scraper sees them.
DOCKER_REQUESTS = "step_runner_exporter_docker_requests_total"
DOCKER_EXEC_SESSIONS = "step_runner_exporter_docker_exec_sessions_total"
DOCKER_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD"})  # else "other"
DECODE_ERRORS = "step_runner_exporter_decode_errors_total"
JOBS = "step_runner_jobs_total"
TRACKED_JOBS = "step_runner_exporter_tracked_jobs"
UPSTREAM_UP = "step_runner_exporter_upstream_up"

# The only response header that may differ between two identical requests.
VOLATILE_HEADERS = frozenset({"date"})


@dataclass
class Env:
    daemon: DockerDaemon
    tap: str
    metrics_url: str
    image: str
    workdir: Path
    logs: ProcessLog
    # Exec creates and exec sessions sent through the tap by the tests that ran.
    exec_creates: int = 0
    exec_sessions: int = 0

    @property
    def direct(self) -> str:
        return self.daemon.socket

    def host(self, socket_path: str) -> str:
        return f"unix://{socket_path}"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with docker_daemon() as daemon, short_tmpdir("srx-tap-") as directory:
        image = tools_image(daemon)
        # Nothing is left in flight at the end, so shutting down need not wait.
        config = "shutdown: {grace_period: 5s, final_scrape_wait: 0s}\n"
        with docker_tap_process(daemon.host, config) as tap:
            metrics = tap.url("/metrics")
            yield Env(daemon, str(tap.socket_path), metrics, image, Path(directory), tap.log)
            stop_process(tap.process)
            assert tap.process.returncode == 0, tap.log.text()


# --- helpers -------------------------------------------------------------------------


def docker_clients() -> list[str]:
    """Each distinct Docker CLI here. Debian's docker.io brings 20.10 (API 1.41, the
    daemon's own); a newer CLI first in PATH negotiates its API version down to it."""
    found: dict[str, str] = {}
    for path in (shutil.which("docker"), "/usr/bin/docker"):
        if path and os.path.exists(path):
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


CLIENTS = docker_clients()


def docker(
    env: Env,
    socket_path: str,
    *args: str,
    input: bytes | None = None,
    check: bool = True,
    timeout: float = 30.0,
    client: str = "docker",
) -> subprocess.CompletedProcess[bytes]:
    """The Docker CLI against `socket_path` (the daemon's or the tap's), bytes in and out."""
    host = env.host(socket_path)
    return run_cli(host, *args, input=input, check=check, timeout=timeout, client=client)


def both(env: Env, *args: str, **kwargs: Any) -> tuple[subprocess.CompletedProcess[bytes], ...]:
    return tuple(docker(env, path, *args, **kwargs) for path in (env.direct, env.tap))


def bracketed(direct: Callable[[], T], tapped: Callable[[], T]) -> tuple[T, T, T]:
    """direct, tapped, direct again: the tap's answer must equal one of the two direct
    ones, for answers that carry the daemon's own clock ("Up 2 seconds")."""
    return direct(), tapped(), direct()


def new_container(env: Env, *args: str, label: str = "") -> str:
    """`docker create` (direct) a container of the tools image running `srx-tool ARGS`."""
    options = ["--network", "none"] + (["--label", label] if label else [])
    return (
        docker(env, env.direct, "create", *options, env.image, TOOL, *args).stdout.decode().strip()
    )


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def stable_headers(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in self.headers if k.lower() not in VOLATILE_HEADERS)

    def header_names(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.headers)

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    chunked = body is not None and not isinstance(body, bytes)
    conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
    response = conn.getresponse()
    data = response.read()
    return Response(response.status, response.reason, tuple(response.getheaders()), data)


def exchange(socket_path: str, method: str, path: str, **kwargs: Any) -> Response:
    conn = UnixHTTPConnection(socket_path, timeout=30)
    try:
        return request(conn, method, path, **kwargs)
    finally:
        conn.close()


def assert_same_response(direct: Response, tapped: Response) -> None:
    assert tapped.status == direct.status
    assert tapped.reason == direct.reason
    assert tapped.header_names() == direct.header_names()
    assert tapped.stable_headers() == direct.stable_headers()
    assert tapped.body == direct.body


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metrics(env: Env) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the tap exports, by name and sorted labels."""
    status, _, body = http_get(env.metrics_url)
    assert status == 200
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def docker_requests(env: Env) -> Counter[tuple[str, str]]:
    """docker_requests_total by (method, endpoint)."""
    counts: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in metrics(env).items():
        if name == DOCKER_REQUESTS:
            label = dict(labels)
            counts[(label["method"], label["endpoint"])] = int(value)
    return counts


def exec_sessions(env: Env, state: str) -> float:
    return metrics(env).get((DOCKER_EXEC_SESSIONS, (("state", state),)), 0.0)


class LineReader:
    """Collects a process's stdout lines on a thread, so waiting never blocks on a pipe."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[bytes] = []
        self._stream = stream
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)


@contextlib.contextmanager
def cli_process(
    env: Env, socket_path: str, *args: str, client: str = "docker"
) -> Iterator[subprocess.Popen[bytes]]:
    argv = [client, "-H", env.host(socket_path), *args]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            stop_process(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# --- the Docker CLI ------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_version_negotiation_sees_the_daemon(env: Env, client: str) -> None:
    direct, tapped = both(env, "version", "--format", "{{json .}}", client=client)
    assert tapped.stdout == direct.stdout
    version = json.loads(direct.stdout)
    # The client negotiated down to the daemon's API version through the tap as direct.
    assert version["Client"]["ApiVersion"] == version["Server"]["ApiVersion"]
    for method in ("GET", "HEAD"):
        assert_same_response(
            exchange(env.direct, method, "/_ping"), exchange(env.tap, method, "/_ping")
        )
    assert_same_response(
        exchange(env.direct, "GET", "/version"), exchange(env.tap, "GET", "/version")
    )


def test_ps_and_inspect_answer_the_same(env: Env) -> None:
    label = f"srx-parity={uuid.uuid4().hex}"
    running = new_container(env, "sleep", label=label)
    exited = new_container(env, "exit", "3", label=label)
    docker(env, env.direct, "start", running, exited)
    wait_until(
        lambda: (
            docker(env, env.direct, "inspect", "-f", "{{.State.Status}}", exited).stdout
            == b"exited\n"
        ),
        what="the short container to exit",
    )
    ps = ("ps", "-a", "--no-trunc", "--filter", f"label={label}", "--format", "{{json .}}")
    first, tapped, last = bracketed(
        lambda: docker(env, env.direct, *ps).stdout, lambda: docker(env, env.tap, *ps).stdout
    )
    assert tapped in (first, last)
    assert len(tapped.splitlines()) == 2

    direct_inspect, tap_inspect = both(env, "inspect", running, exited, env.image)
    assert tap_inspect.stdout == direct_inspect.stdout
    assert [c["State"]["Status"] for c in json.loads(tap_inspect.stdout)[:2]] == [
        "running",
        "exited",
    ]

    missing_direct, missing_tap = both(env, "inspect", "srx-no-such-thing", check=False)
    assert (missing_tap.returncode, missing_tap.stdout, missing_tap.stderr) == (
        missing_direct.returncode,
        missing_direct.stdout,
        missing_direct.stderr,
    )
    assert missing_tap.returncode == 1
    docker(env, env.direct, "stop", "-t", "5", running)


def test_logs_follow_is_byte_equal(env: Env) -> None:
    # Prints for about a second, so the followers attach while it still writes.
    cid = new_container(env, "print", "20", "50", "0")
    docker(env, env.direct, "start", cid)
    raw: dict[str, Response] = {}

    def follow_raw(name: str, socket_path: str) -> None:
        path = f"{API}/containers/{cid}/logs?follow=1&stdout=1&stderr=1"
        raw[name] = exchange(socket_path, "GET", path)

    threads = [
        threading.Thread(target=follow_raw, args=(name, path))
        for name, path in (("direct", env.direct), ("tap", env.tap))
    ]
    for thread in threads:
        thread.start()
    direct, tapped = both(env, "logs", "-f", cid)
    for thread in threads:
        thread.join(30)
    assert (tapped.stdout, tapped.stderr) == (direct.stdout, direct.stderr)
    assert direct.stdout == b"".join(b"out %d of 20\n" % i for i in range(1, 21))
    assert direct.stderr == b"".join(b"err %d of 20\n" % i for i in range(1, 21))
    # The multiplexed stream itself (8-byte stdcopy headers, stdout and stderr frames in
    # the daemon's order) is the same bytes through the tap.
    assert_same_response(raw["direct"], raw["tap"])
    assert len(raw["tap"].body) == 40 * 8 + len(direct.stdout) + len(direct.stderr)


@pytest.mark.parametrize("client", CLIENTS)
def test_run_attached_and_wait(env: Env, client: str) -> None:
    run = ("run", "--rm", "--network", "none", env.image, TOOL, "print", "3", "0", "5")
    direct, tapped = both(env, *run, check=False, client=client)
    assert (tapped.returncode, tapped.stdout, tapped.stderr) == (
        direct.returncode,
        direct.stdout,
        direct.stderr,
    )
    assert tapped.returncode == 5
    assert tapped.stdout == b"out 1 of 3\nout 2 of 3\nout 3 of 3\n"
    assert tapped.stderr == b"err 1 of 3\nerr 2 of 3\nerr 3 of 3\n"

    cid = new_container(env, "exit", "7")
    docker(env, env.tap, "start", cid, client=client)
    direct_wait, tap_wait = both(env, "wait", cid, client=client)
    assert tap_wait.stdout == direct_wait.stdout == b"7\n"


@pytest.mark.parametrize("client", CLIENTS)
def test_attach_carries_stdin_and_stdout(env: Env, client: str) -> None:
    seen: list[tuple[int, list[tuple[bytes, bytes]], bytes, bytes]] = []
    for socket_path in (env.direct, env.tap):
        cid = docker(
            env, env.direct, "run", "-d", "-i", "--network", "none", env.image, TOOL, "echo"
        ).stdout.decode()
        with cli_process(env, socket_path, "attach", cid.strip(), client=client) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            # A line comes back only once the attach carries stdin in and stdout out.
            assert proc.stderr is not None
            lines = []
            for line in (b"hello through attach\n", b"second line\n"):
                proc.stdin.write(line)
                proc.stdin.flush()
                lines.append((proc.stdout.readline(), proc.stderr.readline()))
            # Only once every line came back: the daemon may drop output a container
            # writes just before it exits, direct as through the tap.
            proc.stdin.write(b"exit 4\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=30)
            seen.append((proc.returncode, lines, out, err))
    assert seen[1] == seen[0]
    assert seen[1] == (
        4,
        [
            (b"hello through attach\n", b"err: hello through attach\n"),
            (b"second line\n", b"err: second line\n"),
        ],
        b"",
        b"",
    )


def test_events_stream_the_same_sequence(env: Env) -> None:
    label = f"srx-events={uuid.uuid4().hex}"
    events = ("events", "--filter", f"label={label}", "--format", "{{json .}}")
    probes: list[str] = []
    with (
        cli_process(env, env.direct, *events) as direct_proc,
        cli_process(env, env.tap, *events) as tap_proc,
    ):
        assert direct_proc.stdout is not None and tap_proc.stdout is not None
        direct, tapped = LineReader(direct_proc.stdout), LineReader(tap_proc.stdout)
        # Both subscriptions are live once each stream has shown a probe's create: a
        # CLI that has not subscribed yet misses an event, so probe until both have one.
        deadline = time.monotonic() + 30
        while not (direct.lines and tapped.lines):
            assert time.monotonic() < deadline, "no event stream came up in 30 s"
            probes.append(new_container(env, "exit", "0", label=label))
            with contextlib.suppress(AssertionError):
                wait_until(lambda: bool(direct.lines and tapped.lines), 1.0, "a probe event")
        cid = new_container(env, "sleep", label=label)
        docker(env, env.direct, "start", cid)
        docker(env, env.direct, "stop", "-t", "5", cid)
        docker(env, env.direct, "rm", cid)

        def sequence(reader: LineReader) -> list[bytes]:
            return [line for line in list(reader.lines) if json.loads(line)["id"] == cid]

        def destroyed(reader: LineReader) -> bool:
            return any(json.loads(line)["Action"] == "destroy" for line in sequence(reader))

        wait_until(
            lambda: destroyed(direct) and destroyed(tapped), what="destroy events in both streams"
        )
    assert sequence(tapped) == sequence(direct)
    # The rest of each stream is probe creates from before the sequence began.
    for reader in (direct, tapped):
        assert reader.lines[-len(sequence(reader)) :] == sequence(reader)
    actions = [json.loads(line)["Action"] for line in sequence(tapped)]
    assert actions[0] == "create"
    assert actions[-1] == "destroy"
    assert {"start", "kill", "die", "stop"} <= set(actions)
    docker(env, env.direct, "rm", *probes)


def test_cp_a_few_mib_both_ways(env: Env) -> None:
    cid = new_container(env, "sleep")
    payload = os.urandom(3 * MIB + 12345)
    source = env.workdir / "payload.bin"
    source.write_bytes(payload)
    docker(env, env.tap, "cp", str(source), f"{cid}:/tmp/via-tap.bin")
    docker(env, env.direct, "cp", str(source), f"{cid}:/tmp/direct.bin")
    for name in ("via-tap", "direct"):
        for via, socket_path in (("direct", env.direct), ("tap", env.tap)):
            target = env.workdir / f"{name}-out-{via}.bin"
            docker(env, socket_path, "cp", f"{cid}:/tmp/{name}.bin", str(target))
            assert sha256(target.read_bytes()) == sha256(payload), (name, via)
    # The archive stream itself (tar headers with the file's mode and times) is the same.
    direct, tapped = both(env, "cp", f"{cid}:/tmp/via-tap.bin", "-")
    assert sha256(tapped.stdout) == sha256(direct.stdout)
    with tarfile.open(fileobj=io.BytesIO(tapped.stdout)) as tar:
        member = tar.extractfile("via-tap.bin")
        assert member is not None and sha256(member.read()) == sha256(payload)


def test_export_and_import_through_the_tap(env: Env) -> None:
    cid = new_container(env, "exit", "0")
    direct, tapped = both(env, "export", cid)
    assert sha256(tapped.stdout) == sha256(direct.stdout)
    name = f"srx-test/imported:{uuid.uuid4().hex[:8]}"
    image_id = docker(env, env.tap, "import", "-", name, input=tapped.stdout).stdout.strip()
    assert image_id.startswith(b"sha256:")
    direct_inspect, tap_inspect = both(env, "image", "inspect", name)
    assert tap_inspect.stdout == direct_inspect.stdout
    assert json.loads(tap_inspect.stdout)[0]["Id"] == image_id.decode()
    direct_save, tap_save = both(env, "save", name)
    assert sha256(tap_save.stdout) == sha256(direct_save.stdout)
    run = ("run", "--rm", "--network", "none", name, TOOL, "print", "2", "0", "0")
    direct_run, tap_run = both(env, *run)
    assert (tap_run.stdout, tap_run.stderr) == (direct_run.stdout, direct_run.stderr)
    assert tap_run.stdout == b"out 1 of 2\nout 2 of 2\n"


@pytest.mark.parametrize("client", CLIENTS)
def test_exec_with_stdin_is_not_a_step_runner_session(env: Env, client: str) -> None:
    cid = new_container(env, "sleep")
    docker(env, env.direct, "start", cid)
    before_requests, before_sessions = docker_requests(env), exec_sessions(env, "not_step_runner")
    payload = os.urandom(MIB)
    direct, tapped = both(env, "exec", "-i", cid, TOOL, "cat", input=payload, client=client)
    assert sha256(tapped.stdout) == sha256(direct.stdout) == sha256(payload)
    assert tapped.stderr == direct.stderr == b"%d bytes\n" % MIB
    direct_code, tap_code = both(env, "exec", cid, TOOL, "exit", "3", check=False, client=client)
    assert tap_code.returncode == direct_code.returncode == 3
    execs_through_tap = 2
    env.exec_creates += execs_through_tap
    env.exec_sessions += execs_through_tap
    requests = docker_requests(env) - before_requests
    assert requests[("POST", "exec_create")] == execs_through_tap
    assert requests[("POST", "exec_start")] == execs_through_tap
    assert exec_sessions(env, "not_step_runner") - before_sessions == execs_through_tap
    docker(env, env.direct, "stop", "-t", "5", cid)


# --- raw HTTP ------------------------------------------------------------------------


def endpoint_class(method: str, path: str) -> str:
    """SPEC section 7's endpoint label for a request path (with or without /v1.xx)."""
    route = re.sub(r"^/v[0-9.]+/", "/", path.split("?", 1)[0])
    if method == "POST" and re.fullmatch(r"/containers/[^/]+/exec", route):
        return "exec_create"
    if method == "POST" and re.fullmatch(r"/exec/[^/]+/start", route):
        return "exec_start"
    if route.startswith("/containers/") or route == "/containers":
        return "container"
    if route.startswith("/images/") or route == "/images":
        return "image"
    return "other"


class RawClient:
    """Sends the same requests to the daemon and to the tap, each on one keep-alive
    connection, and tallies what went through the tap by (method, endpoint)."""

    def __init__(self, env: Env) -> None:
        self.direct = UnixHTTPConnection(env.direct, timeout=30)
        self.tap = UnixHTTPConnection(env.tap, timeout=30)
        self.sent: Counter[tuple[str, str]] = Counter()
        self._sockets: dict[str, socket.socket] = {}

    def send(
        self, method: str, path: str | tuple[str, str],
        body: Callable[[], bytes | Iterable[bytes]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[Response, Response]:  # fmt: skip
        """The request to both (`path`: one for both, or (direct's, tap's))."""
        paths = (path, path) if isinstance(path, str) else path
        results = []
        for name, conn, p in (("direct", self.direct, paths[0]), ("tap", self.tap, paths[1])):
            results.append(request(conn, method, p, body() if body else None, headers))
            assert conn.sock is not None, "the daemon closed a keep-alive connection"
            # http.client reconnects silently; the same socket object proves it did not.
            assert self._sockets.setdefault(name, conn.sock) is conn.sock
        self.sent[(method if method in DOCKER_METHODS else "other",
                   endpoint_class(method, paths[1]))] += 1  # fmt: skip
        return results[0], results[1]

    def same(self, method: str, path: str, **kwargs: Any) -> Response:
        direct, tapped = self.send(method, path, **kwargs)
        assert_same_response(direct, tapped)
        return tapped

    def close(self) -> None:
        self.direct.close()
        self.tap.close()


def chunks(data: bytes, size: int) -> Callable[[], Iterator[bytes]]:
    return lambda: (data[i : i + size] for i in range(0, len(data), size))


def tar_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def until_closed(socket_path: str, raw: bytes) -> bytes:
    """Write `raw` at once and read until the daemon closes (its last request says
    `Connection: close`, or is HTTP/1.0); Date headers masked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(socket_path)
        sock.sendall(raw)
        received = bytearray()
        while data := sock.recv(65536):
            received += data
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", bytes(received))


def test_raw_http_is_byte_equal_and_counted(env: Env) -> None:
    cid = new_container(env, "sleep")
    docker(env, env.direct, "start", cid)
    since = int(time.time()) - 60
    before = docker_requests(env)
    client = RawClient(env)
    try:
        client.same("HEAD", "/_ping")
        client.same("GET", "/_ping")
        client.same("GET", f"{API}/version")
        # Versions the daemon refuses, too new and too old: its own 400s, unchanged.
        assert client.same("GET", "/v1.99/version").status == 400
        assert client.same("GET", "/v1.11/version").status == 400
        client.same("GET", f"{API}/containers/{cid}/json")
        client.same("GET", f"{API}/images/json")
        client.same("GET", f"{API}/images/{env.image}/json")
        client.same("GET", f"{API}/containers/{cid}/changes")
        client.same("GET", f"{API}/events?since={since}&until={int(time.time())}")
        # Answered 404 by the daemon: a missing container, image, exec and route.
        assert client.same("GET", f"{API}/containers/srx-missing/json").status == 404
        assert client.same("DELETE", f"{API}/images/srx-missing:1").status == 404
        assert client.same("GET", f"{API}/exec/srx-missing/json").status == 404
        assert client.same("GET", "/srx/no/such/route").status == 404
        assert client.same("POST", f"{API}/containers/srx-missing/exec",
                           body=lambda: b'{"Cmd":["x"]}',
                           headers={"Content-Type": "application/json"}).status == 404  # fmt: skip
        client.same("OPTIONS", "/_ping")

        # Container create with a chunked body, cut mid-token; the two new containers
        # differ only in their ids and names.
        config = json.dumps(
            {"Image": env.image, "Cmd": [TOOL, "exit", "0"], "Labels": {"srx": "chunked"},
             "HostConfig": {"NetworkMode": "none"}}
        ).encode()  # fmt: skip
        created = client.send(
            "POST", f"{API}/containers/create", body=chunks(config, 7),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert [r.status for r in created] == [201, 201]
        assert created[1].header_names() == created[0].header_names()
        ids = [r.json()["Id"] for r in created]
        configs = [client.same("GET", f"{API}/containers/{i}/json").json() for i in ids]
        # A container's hostname defaults to the start of its id.
        assert {**configs[1]["Config"], "Hostname": ""} == {**configs[0]["Config"], "Hostname": ""}
        assert configs[1]["HostConfig"] == configs[0]["HostConfig"]

        # Exec create with a chunked body (an ordinary command: nothing to tap).
        exec_body = json.dumps({"Cmd": [TOOL, "exit", "0"], "AttachStdout": True}).encode()
        execs = client.send(
            "POST", f"{API}/containers/{cid}/exec", body=chunks(exec_body, 5),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert [r.status for r in execs] == [201, 201]
        assert execs[1].header_names() == execs[0].header_names()
        env.exec_creates += 2  # this one and the one for a missing container

        # An archive of a few MiB up (chunked) and down again.
        payload = os.urandom(4 * MIB + 1)
        archive = tar_of("raw.bin", payload)
        uploaded = client.send(
            "PUT", f"{API}/containers/{cid}/archive?path=/tmp", body=chunks(archive, 65536),
            headers={"Content-Type": "application/x-tar"},
        )  # fmt: skip
        assert [r.status for r in uploaded] == [200, 200]
        assert_same_response(*uploaded)
        downloaded = client.same("GET", f"{API}/containers/{cid}/archive?path=/tmp/raw.bin")
        with tarfile.open(fileobj=io.BytesIO(downloaded.body)) as tar:
            member = tar.extractfile("raw.bin")
            assert member is not None and sha256(member.read()) == sha256(payload)
        client.same("HEAD", f"{API}/containers/{cid}/archive?path=/tmp/raw.bin")

        removed = client.send(
            "DELETE", (f"{API}/containers/{ids[0]}", f"{API}/containers/{ids[1]}")
        )
        assert [r.status for r in removed] == [204, 204]
        assert_same_response(*removed)
    finally:
        client.close()

    # Several requests in one write on one connection (HTTP/1.1 pipelining). The daemon
    # lists a container's exec ids in random order, so this one has none.
    quiet = new_container(env, "exit", "0")
    script = [
        ("HEAD", "/_ping", ""),
        ("GET", f"{API}/containers/{quiet}/json", ""),
        ("GET", f"{API}/containers/srx-missing/json", ""),
        ("GET", f"{API}/images/{env.image}/json", "Connection: close\r\n"),
    ]
    raw = b"".join(
        f"{m} {p} HTTP/1.1\r\nHost: docker\r\n{extra}\r\n".encode() for m, p, extra in script
    )
    direct_bytes, tap_bytes = until_closed(env.direct, raw), until_closed(env.tap, raw)
    assert tap_bytes == direct_bytes
    assert direct_bytes.count(b"HTTP/1.1 ") == len(script)
    for method, path, _ in script:
        client.sent[(method, endpoint_class(method, path))] += 1

    # HTTP/1.0, no Host: one request, then the daemon closes.
    old = b"GET /_ping HTTP/1.0\r\n\r\n"
    direct_bytes, tap_bytes = until_closed(env.direct, old), until_closed(env.tap, old)
    assert tap_bytes == direct_bytes
    assert direct_bytes.startswith(b"HTTP/1.0 200 OK\r\n")
    client.sent[("GET", "other")] += 1

    counted = docker_requests(env) - before
    assert counted == client.sent
    docker(env, env.direct, "stop", "-t", "5", cid)


# --- afterwards ----------------------------------------------------------------------


def test_metrics_count_no_job_and_no_decode_error(env: Env) -> None:
    docker(env, env.tap, "ps", "-a")
    samples = metrics(env)
    decode_errors = {
        dict(labels)["message"]: value
        for (name, labels), value in samples.items()
        if name == DECODE_ERRORS
    }
    assert {"docker_http", "docker_stream"} <= decode_errors.keys()
    assert all(value == 0 for value in decode_errors.values()), decode_errors
    jobs = {labels: value for (name, labels), value in samples.items() if name == JOBS}
    assert all(value == 0 for value in jobs.values()), jobs
    assert exec_sessions(env, "tapped") == 0
    # Every exec session was a `docker exec`; attach and run hijacks are none.
    assert exec_sessions(env, "not_step_runner") == env.exec_sessions
    requests = docker_requests(env)
    assert requests[("POST", "exec_start")] == env.exec_sessions
    assert requests[("POST", "exec_create")] == env.exec_creates
    calls = [
        n
        for (n, _), v in samples.items()
        if n.startswith("grpc_server_") and not n.endswith("_created") and v != 0
    ]
    assert calls == []
    assert samples[(TRACKED_JOBS, ())] == 0
    assert samples[(UPSTREAM_UP, ())] == 1
    # Everything went through one tap, which saw it as Docker API traffic.
    assert requests[("GET", "container")] > 0
    assert not env.logs.find(r"Traceback|level=error"), env.logs.text()
