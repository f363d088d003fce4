"""The committed Docker fixtures are what the real CLI and daemon do today: record them
afresh (tests/integration/docker_recorder.py) and compare the shape of every exchange
with the committed recordings (tests/fixtures/docker)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docker_capture import CLIENT, SERVER, Recording, load, read

from .docker_daemon import docker_daemon
from .docker_recorder import record

pytestmark = pytest.mark.integration

_REQUEST = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.1\r\n", re.M)
_STATUS = re.compile(rb"^HTTP/1\.1 (\d{3}) ", re.M)
_ID = re.compile(rb"[0-9a-f]{64}")


def shape(recording: Recording) -> list[tuple[int, list[bytes], list[bytes]]]:
    """Per connection: its request lines (ids replaced) and response status codes."""
    out = []
    for connection in recording.connections():
        client = recording.stream(connection, CLIENT)
        server = recording.stream(connection, SERVER)
        requests = [
            _ID.sub(b"<id>", m.group(1) + b" " + m.group(2)) for m in _REQUEST.finditer(client)
        ]
        out.append((connection, requests, _STATUS.findall(server)))
    return out


def test_fresh_recordings_have_the_shape_of_the_committed_ones(tmp_path: Path) -> None:
    with docker_daemon() as daemon:
        record(daemon, tmp_path)
    for name in ("exec_steps_proxy", "exec_cat", "ps_logs_inspect"):
        fresh, committed = read(tmp_path / f"{name}.json"), load(name)
        assert shape(fresh) == shape(committed), name
        assert fresh.facts["tapped"] == committed.facts["tapped"], name
    # What the tap relies on: create on one connection, the hijacked start on another.
    connections = shape(load("exec_steps_proxy"))
    assert [c[1][-1] for c in connections] == [
        b"GET /v1.41/exec/<id>/json",
        b"POST /v1.41/exec/<id>/start",
    ]
    assert connections[0][2] == [b"200", b"200", b"201", b"200"]
    assert connections[1][2] == [b"101"]
