"""The test Docker daemon itself: starts on temp paths, imports an image of a static
binary, runs a container with no network, and stops only what it started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .docker_daemon import docker_daemon, ping

HELLO = """package main

import (
\t"fmt"
\t"os"
)

func main() { fmt.Println("hello", os.Args[1:]) }
"""


def test_daemon_runs_a_container_from_an_imported_static_binary(tmp_path: Path) -> None:
    source = tmp_path / "hello.go"
    source.write_text(HELLO)
    binary = tmp_path / "hello"
    env = {**os.environ, "CGO_ENABLED": "0", "GO111MODULE": "off", "GOCACHE": str(tmp_path / "c")}
    subprocess.run(["go", "build", "-o", str(binary), str(source)], check=True, env=env)
    with docker_daemon() as daemon:
        assert ping(daemon.socket)
        daemon.import_image("srx-test/hello:1", {"/bin/hello": binary})
        out = daemon.cli("run", "--rm", "--network", "none", "srx-test/hello:1", "/bin/hello", "a")
        assert out.stdout == "hello [a]\n"
        directory = daemon.dir
    assert not ping(f"{directory}/docker.sock")
    assert not os.path.exists(directory)
