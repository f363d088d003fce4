"""Bad input through a real `serve --tap docker` process in front of a real daemon:
each one is sent once straight to the daemon and once through the tap, and the client
must get the same answer (or the same close); the tap counts what it saw, keeps
serving, and never writes a secret from a body into its log (at debug level) or into
/metrics. Also here, on the same daemon and tap: the `200` hijack of an exec start that
asked for no upgrade."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hpack import Encoder
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import build
from exporter.proto import step_pb2
from tests.wire import frame, grpc_message, request_headers

from .docker_daemon import DockerDaemon, docker_daemon, ping
from .docker_images import BuildContainer, proxy_cmd, start_build_container, step_runner_image
from .harness import ProcessLog, stop_process, wait_until
from .sidecar import docker_tap_process, http_get

pytestmark = pytest.mark.integration

COMMAND = str(Path(sys.executable).with_name("step-runner-exporter"))
SECRET = "tok3n-9d1c0b7e-never-logged"
MAX_BODY = 64 * 1024
TEN_MIB = 10 * 1024 * 1024
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STATUS_PATH = "/proto.StepRunner/Status"
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4


@dataclass
class Tap:
    proc: subprocess.Popen[bytes]
    socket: str
    base: str
    logs: ProcessLog

    def metrics_text(self) -> str:
        status, _, body = http_get(f"{self.base}/metrics")
        assert status == 200
        return body.decode()

    def value(self, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        raise AssertionError(f"no series {name}{labels}")


@dataclass
class Env:
    daemon: DockerDaemon
    tap: Tap
    container: BuildContainer


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with docker_daemon() as daemon:
        image = step_runner_image(daemon)
        container = start_build_container(daemon, image)
        config = (
            f"docker: {{max_body_bytes: {MAX_BODY}}}\n"
            "shutdown: {grace_period: 2s, final_scrape_wait: 0s}\n"
        )
        with docker_tap_process(daemon.host, config, "--log.level", "debug") as process:
            path = str(process.socket_path)
            tap = Tap(process.process, path, f"http://{process.web}", process.log)
            wait_until(lambda: ping(path), what="the tap forwarding")
            yield Env(daemon, tap, container)
            stop_process(process.process)
            # Everything the tap wrote at debug level, up to its last line.
            assert SECRET not in process.log.text()


def exchange(path: str, data: bytes, *, half_close: bool = False, timeout: float = 20) -> bytes:
    """Send `data` on a new connection (then half-close it if asked) and read until the
    peer closes.

    Ordinary requests say `Connection: close` instead of half-closing, as a real client
    would: the daemon (Go's net/http) cancels a request whose client half-closed, and
    whether it still answers depends on how soon the end of input follows the body.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        # If the daemon stopped reading, what it answered is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk


_DATE = re.compile(rb"\r\nDate: [^\r]*")
_ID = re.compile(rb"[0-9a-f]{64}")


def normal(answer: bytes) -> bytes:
    """An answer without what differs from one request to the next (date, new ids)."""
    return _ID.sub(b"<id>", _DATE.sub(b"", answer))


def both(env: Env, data: bytes, **kwargs: object) -> tuple[bytes, bytes]:
    direct = exchange(env.daemon.socket, data, **kwargs)  # type: ignore[arg-type]
    tapped = exchange(env.tap.socket, data, **kwargs)  # type: ignore[arg-type]
    return direct, tapped


def errors(env: Env, message: str) -> float:
    return env.tap.value("step_runner_exporter_decode_errors_total", message=message)


def requests(env: Env, method: str, endpoint: str) -> float:
    return env.tap.value(
        "step_runner_exporter_docker_requests_total", method=method, endpoint=endpoint
    )


def sessions(env: Env, state: str) -> float:
    return env.tap.value("step_runner_exporter_docker_exec_sessions_total", state=state)


def still_serving(env: Env) -> None:
    assert env.tap.proc.poll() is None
    assert ping(env.tap.socket)
    assert env.daemon.cli("ps", "-q", host=f"unix://{env.tap.socket}").stdout.strip()


def request(
    method: str, path: str, body: bytes = b"", extra: str = "Connection: close\r\n"
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: docker\r\n{extra}"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def exec_create_body(cmd: list[str], env: list[str] | None = None) -> bytes:
    return json.dumps(
        {"AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "Tty": False,
         "Env": env, "Cmd": cmd}
    ).encode()  # fmt: skip


def create_exec(env: Env, path: str, cmd: list[str], extra_env: list[str] | None = None) -> str:
    answer = exchange(
        path,
        request(
            "POST", f"/v1.41/containers/{env.container.id}/exec", exec_create_body(cmd, extra_env)
        ),
    )
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]
    exec_id: str = json.loads(answer[answer.index(b"\r\n\r\n") + 4 :])["Id"]
    return exec_id


UPGRADE = "Connection: Upgrade\r\nUpgrade: tcp\r\n"


def test_garbage_bytes(env: Env) -> None:
    before = errors(env, "docker_http")
    direct, tapped = both(env, b"\x00\x01\x02\xff garbage \r\n\r\n", half_close=True)
    assert direct.startswith(b"HTTP/1.1 400 Bad Request")
    assert tapped == direct
    assert errors(env, "docker_http") == before + 1
    still_serving(env)


def test_a_truncated_chunked_body(env: Env) -> None:
    before = requests(env, "POST", "container")
    data = (
        b"POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'100\r\n{"Image": "srx-none", "Env": ["A=' + SECRET.encode() + b'"'
    )
    direct, tapped = both(env, data, half_close=True)  # the client stops mid-chunk
    assert direct.startswith(b"HTTP/1.1 500 ")  # the daemon answered
    assert normal(tapped) == normal(direct)
    assert requests(env, "POST", "container") == before + 1
    still_serving(env)


def test_an_exec_start_for_an_id_never_created(env: Env) -> None:
    before = (requests(env, "POST", "exec_start"), sessions(env, "tapped"))
    before_not = sessions(env, "not_step_runner")
    data = request("POST", "/v1.41/exec/" + "ab" * 32 + "/start", b'{"Detach":false}', UPGRADE)
    direct, tapped = both(env, data, half_close=True)
    assert direct.startswith(b"HTTP/1.1 404 ")
    assert normal(tapped) == normal(direct)
    assert (requests(env, "POST", "exec_start"), sessions(env, "tapped")) == (
        before[0] + 1,
        before[1],
    )
    assert sessions(env, "not_step_runner") == before_not  # no hijack, no session
    still_serving(env)


def test_a_hijack_the_daemon_refuses_keeps_the_mark_for_the_real_start(env: Env) -> None:
    tapped_before = sessions(env, "tapped")
    bad_start = b'{"Detach": "not a bool"}'
    answers = []
    for path in (env.daemon.socket, env.tap.socket):
        exec_id = create_exec(env, path, proxy_cmd(env.container.socket))
        answers.append(
            exchange(
                path,
                request("POST", f"/v1.41/exec/{exec_id}/start", bad_start, UPGRADE),
                half_close=True,
            )
        )
    direct, tapped = answers
    assert direct.startswith(b"HTTP/1.1 400 ")
    assert normal(tapped) == normal(direct)
    assert sessions(env, "tapped") == tapped_before
    # The same exec, started properly through the tap: upgraded and tapped.
    start = request("POST", f"/v1.41/exec/{exec_id}/start", b'{"Detach":false}', UPGRADE)
    answer = exchange(env.tap.socket, start, half_close=True)  # stdin ends at once
    assert answer.startswith(b"HTTP/1.1 101 UPGRADED")
    assert sessions(env, "tapped") == tapped_before + 1
    still_serving(env)


def test_a_10_mib_json_body(env: Env) -> None:
    before = (errors(env, "docker_http"), requests(env, "POST", "container"))
    value = "A=" + SECRET + "x" * TEN_MIB
    body = json.dumps({"Image": "srx-no-such-image", "Env": [value]}).encode()
    direct, tapped = both(env, request("POST", "/v1.41/containers/create", body))
    assert direct.startswith(b"HTTP/1.1 ")
    assert normal(tapped) == normal(direct)
    assert requests(env, "POST", "container") == before[1] + 1
    assert errors(env, "docker_http") == before[0]  # followed, never held
    still_serving(env)


def test_a_10_mib_exec_create_is_not_marked_and_counted(env: Env) -> None:
    before = (errors(env, "docker_http"), sessions(env, "not_step_runner"))
    big_env = ["A=" + SECRET + "x" * TEN_MIB]
    exec_id = create_exec(env, env.tap.socket, proxy_cmd(env.container.socket), big_env)
    assert errors(env, "docker_http") == before[0] + 1
    start = request("POST", f"/v1.41/exec/{exec_id}/start", b'{"Detach":false}', UPGRADE)
    assert exchange(env.tap.socket, start, half_close=True).startswith(b"HTTP/1.1 101 UPGRADED")
    assert sessions(env, "not_step_runner") == before[1] + 1
    still_serving(env)


def test_a_client_that_disappears_mid_exec(env: Env) -> None:
    """The Go client dialing as Runner does, killed while its job's log streams: the
    tap ends the open call Unavailable (the job counts as failed, grpc_status), the
    exec session ends in the daemon, and the tap keeps serving."""
    handled = {
        "grpc_type": "server_stream",
        "grpc_service": "proto.StepRunner",
        "grpc_method": "FollowLogs",
        "grpc_code": "Unavailable",
    }
    failed = {
        "failure_reason": "script_failure",
        "source": "grpc_status",
        "kind": "Unavailable",
        "category": "infrastructure",
    }
    before = (
        env.tap.value("grpc_server_handled_total", **handled),
        env.tap.value("step_runner_job_failures_total", **failed),
        sessions(env, "tapped"),
    )
    argv = [str(build.ensure_built().client), f"-docker={env.tap.socket}"]
    argv += [f"-container={env.container.id}", f"-steps-socket={env.container.socket}"]
    argv += ["-id-base=7000000", "-mode=jobs", "-jobs=1", "-scenario=success"]
    argv += [f"-log-bytes={1 << 40}", "-chunk=4096"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(
            lambda: (
                env.tap.value(
                    "grpc_server_started_total",
                    grpc_type="server_stream",
                    grpc_service="proto.StepRunner",
                    grpc_method="FollowLogs",
                )
                > 0
                and sessions(env, "tapped") >= before[2] + 1
            ),
            timeout=30,
            what="the job's log streaming",
        )
        proc.kill()
    finally:
        proc.wait(10)
    wait_until(
        lambda: env.tap.value("grpc_server_handled_total", **handled) == before[0] + 1,
        timeout=30,
        what="FollowLogs ended Unavailable",
    )
    wait_until(
        lambda: env.tap.value("step_runner_job_failures_total", **failed) == before[1] + 1,
        what="the job failed",
    )

    def exec_sessions_ended() -> bool:
        inspect = env.daemon.cli("inspect", "-f", "{{json .ExecIDs}}", env.container.id)
        ids = json.loads(inspect.stdout) or []
        running = [
            i for i in ids if env.daemon.cli("exec", "inspect", "-f", "{{.Running}}", i,
                                              check=False).stdout.strip() == "true"
        ]  # fmt: skip
        return not running

    wait_until(exec_sessions_ended, timeout=30, what="the exec session ended in the daemon")
    assert re.search(
        r'msg="job classified" job_id=7000000 result=failed .*container_id=[0-9a-f]{64} '
        r"exec_id=[0-9a-f]{64}",
        env.tap.logs.text(),
    ), "no job line with container and exec id"
    still_serving(env)


def test_secrets_in_container_and_exec_create_bodies_stay_out_of_logs_and_metrics(
    env: Env,
) -> None:
    host = f"unix://{env.tap.socket}"
    image = env.daemon.cli("inspect", "-f", "{{.Config.Image}}", env.container.id).stdout.strip()
    created = env.daemon.cli(
        "create", "--network", "none", "-e", f"CI_JOB_TOKEN={SECRET}", image, "/bin/true",
        host=host,
    )  # fmt: skip
    env.daemon.cli("rm", created.stdout.strip(), host=host)
    env.daemon.cli("exec", "-e", f"TOKEN={SECRET}", env.container.id, "/bin/true", host=host)
    # A steps-proxy exec create carrying the secret: held only while parsed.
    create_exec(env, env.tap.socket, proxy_cmd(env.container.socket), [f"TOKEN={SECRET}"])
    assert SECRET not in env.tap.metrics_text()
    assert SECRET not in env.tap.logs.text()  # so far; the fixture checks them all
    still_serving(env)


def test_a_start_without_upgrade_is_hijacked_with_200_and_tapped(env: Env) -> None:
    """An older client's exec start (no `Upgrade: tcp`): the daemon answers `200 OK` and
    hijacks the connection; through the tap the session is tapped all the same, and a
    gRPC call over it is counted."""
    labels = {
        "grpc_type": "unary",
        "grpc_service": "proto.StepRunner",
        "grpc_method": "Status",
        "grpc_code": "NotFound",
    }
    before = (sessions(env, "tapped"), env.tap.value("grpc_server_handled_total", **labels))
    exec_id = create_exec(env, env.tap.socket, proxy_cmd(env.container.socket))
    status = step_pb2.StatusRequest(id="no-such-job").SerializeToString()
    call = (
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, END_HEADERS, 1, Encoder().encode(request_headers(STATUS_PATH)))
        + frame(DATA, END_STREAM, 1, grpc_message(status))
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(env.tap.socket)
        start = request("POST", f"/v1.24/exec/{exec_id}/start", b'{"Detach":false}', "")
        sock.sendall(start)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        assert b"Content-Length" not in head and b"Transfer-Encoding" not in head
        sock.sendall(call)
        stdout = StdoutReader(sock)
        while not stdout.trailers_of(1):
            stdout.read()
        sock.shutdown(socket.SHUT_WR)
    assert sessions(env, "tapped") == before[0] + 1
    wait_until(
        lambda: env.tap.value("grpc_server_handled_total", **labels) == before[1] + 1,
        what="the Status call counted NotFound",
    )
    still_serving(env)


class StdoutReader:
    """The daemon's side of a hijacked exec: stdcopy frames, stdout kept, and the HTTP/2
    frames it carries."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._raw = b""
        self.stdout = b""

    def read(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the session ended; stdout so far {self.stdout!r}")
        self._raw += chunk
        while len(self._raw) >= 8:
            stream, size = struct.unpack_from(">BxxxI", self._raw)
            if len(self._raw) < 8 + size:
                return
            if stream == 1:
                self.stdout += self._raw[8 : 8 + size]
            self._raw = self._raw[8 + size :]

    def trailers_of(self, stream_id: int) -> bool:
        pos, data = 0, self.stdout
        while pos + 9 <= len(data):
            length = int.from_bytes(data[pos : pos + 3], "big")
            ftype, flags = data[pos + 3], data[pos + 4]
            sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if ftype == HEADERS and flags & END_STREAM and sid == stream_id:
                return True
            pos += 9 + length
        return False
