"""Failures to start (SPEC section 6, issue 10 item 8): a real `step-runner-exporter
serve` process prints ONE line on stderr that says what failed and where, exits
non-zero, prints no traceback and leaves nothing behind."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import short_tmpdir

pytestmark = pytest.mark.integration

COMMAND = str(Path(sys.executable).with_name("step-runner-exporter"))


@dataclass
class Setup:
    """A temp directory with a socket path for the sidecar, and a TCP port this test
    holds, so that nothing else can take it in between."""

    directory: Path
    busy_port: int
    stack: contextlib.ExitStack

    @property
    def listen(self) -> str:
        return f"unix://{self.directory}/sidecar.sock"

    @property
    def upstream(self) -> str:
        return f"unix://{self.directory}/step-runner.sock"

    def file(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text)
        return path


@contextlib.contextmanager
def _setup() -> Iterator[Setup]:
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(short_tmpdir("srx-start-")))
        busy = stack.enter_context(socket.socket())
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield Setup(directory, busy.getsockname()[1], stack)


# (name, serve's arguments from a Setup, what the one line must contain, exit code)
Case = tuple[str, Callable[[Setup], list[str]], Callable[[Setup], list[str]], int]


def _args(s: Setup, flags: dict[str, str] | None = None) -> list[str]:
    args = {"--listen": s.listen, "--upstream": s.upstream, "--web.listen-address": "127.0.0.1:0"}
    args.update(flags or {})
    return [item for pair in args.items() for item in pair]


def _web_port_in_use(s: Setup) -> list[str]:
    return _args(s, {"--web.listen-address": f"127.0.0.1:{s.busy_port}"})


def _tcp_listen_in_use(s: Setup) -> list[str]:
    return _args(s, {"--listen": f"127.0.0.1:{s.busy_port}"})


def _unix_listen_in_use(s: Setup) -> list[str]:
    # This test process is the live one listening on the sidecar's path.
    live = s.stack.enter_context(socket.socket(socket.AF_UNIX))
    live.bind(str(s.directory / "sidecar.sock"))
    live.listen()
    return _args(s)


def _config_is_a_directory(s: Setup) -> list[str]:
    (s.directory / "config.yml").mkdir()
    return ["--config.file", str(s.directory / "config.yml")]


def _config_missing(s: Setup) -> list[str]:
    return ["--config.file", str(s.directory / "missing.yml")]


def _config_not_utf8(s: Setup) -> list[str]:
    path = s.directory / "config.yml"
    path.write_bytes(b"listen: \xff\xfe\n")
    return ["--config.file", str(path)]


def _config_invalid(s: Setup) -> list[str]:
    path = s.file("config.yml", "listen: somewhere\nupstream: unix:///x.sock\nsurprise: 1\n")
    return ["--config.file", str(path)]


def _web_config_unknown_key(s: Setup) -> list[str]:
    path = s.file("web.yml", "tls_server_config: {}\nbogus: 1\n")
    return _args(s, {"--web.config.file": str(path)})


def _web_config_missing_cert(s: Setup) -> list[str]:
    path = s.file("web.yml", "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n")
    return _args(s, {"--web.config.file": str(path)})


def _web_config_missing(s: Setup) -> list[str]:
    return _args(s, {"--web.config.file": str(s.directory / "web.yml")})


def _upstream_is_a_directory(s: Setup) -> list[str]:
    (s.directory / "step-runner.sock").mkdir()
    return _args(s)


def _unknown_socket_owner(s: Setup) -> list[str]:
    path = s.file(
        "config.yml",
        f"listen: {s.listen}\nupstream: {s.upstream}\n"
        "web: {listen_address: '127.0.0.1:0'}\n"
        "socket: {owner: no-such-user-srx}\n",
    )
    return ["--config.file", str(path)]


CASES: list[Case] = [
    (
        "web listen address in use",
        _web_port_in_use,
        lambda s: [f"127.0.0.1:{s.busy_port}", "web.listen_address", "in use"],
        1,
    ),
    (
        "tcp listen address in use",
        _tcp_listen_in_use,
        lambda s: [f"127.0.0.1:{s.busy_port}", "in use"],
        1,
    ),
    (
        "listen socket path in use by a live process",
        _unix_listen_in_use,
        lambda s: [str(s.directory / "sidecar.sock"), "another process is listening"],
        1,
    ),
    (
        "config file is a directory",
        _config_is_a_directory,
        lambda s: [str(s.directory / "config.yml"), "cannot read"],
        2,
    ),
    (
        "config file missing",
        _config_missing,
        lambda s: [str(s.directory / "missing.yml"), "cannot read"],
        2,
    ),
    (
        "config file not UTF-8",
        _config_not_utf8,
        lambda s: [str(s.directory / "config.yml"), "UTF-8"],
        2,
    ),
    (
        "config file invalid",
        _config_invalid,
        lambda s: [f"{s.directory / 'config.yml'}:1: listen", ":3: surprise"],
        2,
    ),
    (
        "web config unknown key",
        _web_config_unknown_key,
        lambda s: [f"{s.directory / 'web.yml'}:", "bogus"],
        2,
    ),
    (
        "web config names a missing certificate",
        _web_config_missing_cert,
        lambda s: [f"{s.directory / 'web.yml'}:", "nope.crt"],
        2,
    ),
    (
        "web config missing",
        _web_config_missing,
        lambda s: [str(s.directory / "web.yml"), "cannot read"],
        2,
    ),
    (
        "upstream path is a directory",
        _upstream_is_a_directory,
        lambda s: [str(s.directory / "step-runner.sock"), "is a directory"],
        1,
    ),
    (
        "unknown socket owner",
        _unknown_socket_owner,
        lambda s: ["socket.owner", "no-such-user-srx"],
        1,
    ),
]


@pytest.mark.parametrize(("name", "arguments", "says", "code"), CASES, ids=[c[0] for c in CASES])
def test_a_failure_to_start_is_one_line_and_a_non_zero_exit(
    name: str,
    arguments: Callable[[Setup], list[str]],
    says: Callable[[Setup], list[str]],
    code: int,
) -> None:
    with _setup() as s:
        result = subprocess.run(
            [COMMAND, "serve", *arguments(s)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        err = result.stderr
        assert result.returncode == code, (result.returncode, err)
        assert "Traceback" not in err, err
        assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
        assert err.startswith("step-runner-exporter: "), err
        for part in says(s):
            assert part in err, (part, err)
        assert result.stdout == ""
        # Nothing was left behind, and nothing another process owns was taken away.
        live = name == "listen socket path in use by a live process"
        assert (s.directory / "sidecar.sock").exists() == live
