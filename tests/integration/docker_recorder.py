"""Record real Docker CLI traffic against a real daemon, for the docker tap's fixtures.

`recording_splice(upstream)` is the sidecar's own splice with a watcher that keeps every
chunk of every connection (tests/docker_capture.py's format). `GrpcOverExec` is a
scripted gRPC client speaking HTTP/2 with prior knowledge over the stdin and stdout of
`docker exec -i C <helper> steps proxy --socket P`, one call after another, the way
GitLab Runner drives a job: Run, FollowLogs, Status, Close.

    python -m tests.integration.docker_recorder     # rewrites tests/fixtures/docker/

records the fixtures (one daemon, the test image, the Docker CLI on PATH). They hold
nothing secret: the test daemon's ids, the test image's name, a made-up job.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from hpack import Encoder

from exporter.proto import step_pb2
from exporter.splice import Endpoint, Splice
from tests.docker_capture import CLIENT, FIXTURES, SERVER, Chunk, Recording, dump
from tests.wire import frame, grpc_message, request_headers

from .docker_daemon import DockerDaemon, docker_daemon
from .docker_images import proxy_cmd, start_build_container, step_runner_image
from .harness import BackgroundLoop, background_loop, short_tmpdir

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SERVICE = "/proto.StepRunner/"
# Large windows, so the client never has to send WINDOW_UPDATE while it reads.
WINDOW = 1 << 24
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
HEADERS, DATA, SETTINGS, WINDOW_UPDATE = 0x1, 0x0, 0x4, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


class Recorder:
    """The splice's watcher factory: one `_Watcher` per connection, all into `chunks`."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._connections = 0

    def watcher(self) -> _Watcher:
        with self._lock:
            self._connections += 1
            return _Watcher(self, self._connections - 1)

    def add(self, connection: int, direction: int, data: bytes) -> None:
        with self._lock:
            self.chunks.append(Chunk(connection, direction, time.monotonic() - self._start, data))

    def take(self) -> tuple[Chunk, ...]:
        """The chunks so far, renumbered from connection 0, and forget them."""
        with self._lock:
            chunks, self.chunks = self.chunks, []
        order = {c: i for i, c in enumerate(dict.fromkeys(ch.connection for ch in chunks))}
        start = chunks[0].time if chunks else 0.0
        return tuple(
            Chunk(order[c.connection], c.direction, c.time - start, c.data) for c in chunks
        )


class _Watcher:
    def __init__(self, recorder: Recorder, connection: int) -> None:
        self._recorder = recorder
        self._connection = connection

    def client_data(self, data: bytes, now: float) -> None:
        self._recorder.add(self._connection, CLIENT, bytes(data))

    def server_data(self, data: bytes, now: float) -> None:
        self._recorder.add(self._connection, SERVER, bytes(data))

    def connection_lost(self, now: float) -> None:
        pass


@contextlib.contextmanager
def recording_splice(upstream: str) -> Iterator[tuple[str, Recorder]]:
    """A splice in front of the daemon socket `upstream`: (its host URL, the recorder)."""
    recorder = Recorder()
    with short_tmpdir("srx-rec-") as directory, background_loop() as loop:
        path = f"{directory}/rec.sock"

        async def start() -> Splice:
            splice = Splice(Endpoint(path=path), Endpoint(path=upstream), recorder.watcher)
            await splice.start()
            return splice

        splice = loop.run(start())
        try:
            yield f"unix://{path}", recorder
        finally:
            _close(loop, splice)


def _close(loop: BackgroundLoop, splice: Splice) -> None:
    loop.run(splice.close(grace=5.0), timeout=10.0)


class GrpcOverExec:
    """A scripted HTTP/2 gRPC client on the stdio of a `docker exec -i` process."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._encoder = Encoder()
        self._stream = 1
        self._buffer = b""
        settings = SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + WINDOW.to_bytes(4, "big")
        self._write(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, (WINDOW - 65535).to_bytes(4, "big"))
        )

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def call(self, method: str, request: bytes, timeout: str = "30S") -> list[bytes]:
        """One call: its response frames' payloads up to the trailers (END_STREAM)."""
        stream, self._stream = self._stream, self._stream + 2
        block = self._encoder.encode(request_headers(SERVICE + method, timeout))
        self._write(
            frame(HEADERS, END_HEADERS, stream, block)
            + frame(DATA, END_STREAM, stream, grpc_message(request))
        )
        payloads = []
        while True:
            ftype, flags, sid, payload = self._frame()
            if ftype == SETTINGS and not flags & ACK:
                self._write(frame(SETTINGS, ACK, 0))
            if sid == stream:
                payloads.append(payload)
                if flags & END_STREAM:
                    return payloads

    def _frame(self) -> tuple[int, int, int, bytes]:
        head = self._read(9)
        length = int.from_bytes(head[:3], "big")
        sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        return head[3], head[4], sid, self._read(length)

    def _read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        while len(self._buffer) < n:
            data = cast(io.BufferedReader, self.proc.stdout).read1(65536)
            if not data:
                raise AssertionError("the exec ended before the answer")
            self._buffer += data
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def finish(self, timeout: float = 30.0) -> int:
        """Half-close stdin (as Runner does when its connection ends) and wait."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.stdout.read()
        return self.proc.wait(timeout)


JOB = "4242"
LOG_BYTES = 80_000  # a few of the daemon's 32 KiB stdout frames


def job_over_exec(argv: list[str]) -> None:
    """Run, FollowLogs, Status and Close of one job over one exec session."""
    client = GrpcOverExec(argv)
    run = step_pb2.RunRequest(id=JOB, env={"SCENARIO": "success", "LOG_BYTES": str(LOG_BYTES)})
    client.call("Run", run.SerializeToString())
    client.call("FollowLogs", step_pb2.FollowLogsRequest(id=JOB).SerializeToString())
    client.call("Status", step_pb2.StatusRequest(id=JOB).SerializeToString())
    client.call("Close", step_pb2.CloseRequest(id=JOB).SerializeToString())
    code = client.finish()
    if code != 0:
        raise AssertionError(f"docker exec ended {code}")


def record(daemon: DockerDaemon, directory: Path) -> None:
    image = step_runner_image(daemon)
    container = start_build_container(daemon, image)
    with recording_splice(daemon.socket) as (host, recorder):
        argv = ["docker", "-H", host, "exec", "-i", container.id, *proxy_cmd(container.socket)]
        job_over_exec(argv)
        facts = {
            "container_id": container.id,
            "job_id": JOB,
            "log_bytes": LOG_BYTES,
            "cli": daemon.cli("version", "-f", "{{.Client.Version}}").stdout.strip(),
            "daemon": daemon.cli("version", "-f", "{{.Server.Version}}").stdout.strip(),
            "tapped": 1,
        }
        dump(
            Recording(
                "docker exec -i C gitlab-runner-helper steps proxy --socket P: one job's "
                "Run, FollowLogs, Status and Close (the exec created on one API connection, "
                "started on a second one)",
                facts,
                recorder.take(),
            ),
            directory / "exec_steps_proxy.json",
        )
        daemon.cli("exec", "-i", container.id, "/bin/cat", host=host, input=b"not gRPC\n")
        dump(
            Recording(
                "docker exec -i C /bin/cat with stdin 'not gRPC': an exec that is not step-runner",
                {"container_id": container.id, "tapped": 0, "not_step_runner": 1},
                recorder.take(),
            ),
            directory / "exec_cat.json",
        )
        daemon.cli("ps", "-a", host=host)
        daemon.cli("logs", container.id, host=host)
        daemon.cli("inspect", container.id, host=host)
        dump(
            Recording(
                "docker ps -a, docker logs C, docker inspect C",
                {"container_id": container.id, "tapped": 0, "not_step_runner": 0},
                recorder.take(),
            ),
            directory / "ps_logs_inspect.json",
        )


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES
    directory.mkdir(parents=True, exist_ok=True)
    with docker_daemon() as daemon:
        record(daemon, directory)


if __name__ == "__main__":
    main()
