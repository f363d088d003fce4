"""The test image on a real daemon: `steps serve` reports its socket as Runner expects,
`steps proxy` carries HTTP/2 over an exec's stdio with half-closes, the tools run."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.docker_daemon import DockerDaemon, docker_daemon
from tests.integration.docker_images import (
    BuildContainer,
    proxy_cmd,
    start_build_container,
    step_runner_image,
)

pytestmark = pytest.mark.integration

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DockerDaemon]:
    with docker_daemon() as d:
        yield d


@pytest.fixture(scope="module")
def image(daemon: DockerDaemon) -> str:
    return step_runner_image(daemon)


@pytest.fixture(scope="module")
def serving(daemon: DockerDaemon, image: str) -> BuildContainer:
    return start_build_container(daemon, image)


def test_image_is_imported_once(daemon: DockerDaemon, image: str) -> None:
    assert step_runner_image(daemon) == image
    listed = daemon.cli("images", "-q", image.partition(":")[0]).stdout.split()
    assert len(listed) == 1


def test_serve_prints_the_ready_line_on_stderr(daemon: DockerDaemon, image: str) -> None:
    container = start_build_container(daemon, image, "--socket", "/tmp/elsewhere.sock")
    assert container.socket == "/tmp/elsewhere.sock"
    logs = daemon.cli("logs", container.id)
    assert logs.stdout == ""
    assert logs.stderr == "step-runner is listening on socket /tmp/elsewhere.sock\n"


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(type, stream id) of each HTTP/2 frame in data, which must hold whole frames."""
    frames, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind = data[pos + 3]
        (stream,) = struct.unpack(">I", data[pos + 5 : pos + 9])
        frames.append((kind, stream & 0x7FFFFFFF))
        pos += 9 + length
    assert pos == len(data), "a truncated frame"
    return frames


def test_proxy_carries_http2_and_ends_after_stdin_eof(
    daemon: DockerDaemon, serving: BuildContainer
) -> None:
    # The client half-closes after its preface; the server must see that end of stream
    # (the proxy's CloseWrite), close its side, and so end the exec: without the
    # half-closes this would hang until the timeout.
    done = subprocess.run(
        ["docker", "-H", daemon.host, "exec", "-i", serving.id, *proxy_cmd(serving.socket)],
        input=PREFACE + EMPTY_SETTINGS,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # grpc-go's server speaks first: its SETTINGS on stream 0.
    assert _frames(done.stdout)[0] == (0x4, 0)


def test_proxy_to_a_missing_socket_fails_on_stderr(
    daemon: DockerDaemon, serving: BuildContainer
) -> None:
    done = daemon.cli("exec", serving.id, *proxy_cmd("/tmp/nothing.sock"), check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "dialing" in done.stderr


def test_tools(daemon: DockerDaemon, image: str) -> None:
    run = daemon.cli("run", "--rm", "--network", "none", image, "echo", "hello", "world")
    assert run.stdout == "hello world\n"
    run = daemon.cli("run", "--rm", "-i", "--network", "none", image, "cat", input=b"abc")
    assert run.stdout == "abc"
    run = daemon.cli("run", "--rm", "--network", "none", image, "emit", "100000", "4096")
    assert len(run.stdout) == 100000
    run = daemon.cli("run", "--rm", "--network", "none", image, "lines", "3", "1ms")
    assert run.stdout == "line 1\nline 2\nline 3\n"
    run = daemon.cli("run", "--rm", "--network", "none", image, "exit", "7", check=False)
    assert run.returncode == 7
    run = daemon.cli("run", "--rm", "--network", "none", image, "echoerr", "oops")
    assert (run.stdout, run.stderr) == ("", "oops\n")
    stopped = daemon.cli("run", "-d", "--network", "none", image, "sleep", "600")
    # sleep handles SIGTERM, so stop does not wait out its 10 s kill timeout.
    daemon.cli("stop", "-t", "30", stopped.stdout.strip(), timeout=20)
