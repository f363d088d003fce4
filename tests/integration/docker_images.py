"""The image of the Docker tap's tests: the Go step-runner stand-in as GitLab Runner's
helper binary, plus a few static tools, imported into a test daemon.

There is no registry here, so the image is a `docker import` of static binaries built
from benchmarks/go (benchmarks/build.py, cached while the sources are unchanged):

- `/usr/bin/gitlab-runner-helper`: the stand-in with Runner's two subcommands,
  `steps serve [--socket P]` (prints `step-runner is listening on socket P` to stderr)
  and `steps proxy --socket P` (stdio to the socket, with half-closes), so an exec's
  `Cmd` has exactly the shape of Runner's (Runner itself bootstraps the helper to
  /opt/gitlab-runner/gitlab-runner-helper; only the path differs);
- `/bin/citool` and the same binary as `/bin/echo`, `/bin/echoerr`, `/bin/cat`,
  `/bin/sleep`, `/bin/emit`, `/bin/lines`, `/bin/exit`, `/bin/true` (see
  benchmarks/go/citool/main.go for what each does).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import build
from tests.integration.docker_daemon import DockerDaemon

HELPER = "/usr/bin/gitlab-runner-helper"
READY_PREFIX = "step-runner is listening on socket "
TOOLS = ("echo", "echoerr", "cat", "sleep", "emit", "lines", "exit", "true")
SERVE_CMD = (HELPER, "steps", "serve")
READY_TIMEOUT = 30.0


def proxy_cmd(socket: str) -> list[str]:
    """The exec `Cmd` GitLab Runner's Docker executor sends for one gRPC connection."""
    return [HELPER, "steps", "proxy", "--socket", socket]


def _files(binaries: build.GoBinaries) -> dict[str, Path | bytes]:
    files: dict[str, Path | bytes] = {HELPER: binaries.server, "/bin/citool": binaries.citool}
    files.update({f"/bin/{tool}": binaries.citool for tool in TOOLS})
    return files


def step_runner_image(daemon: DockerDaemon) -> str:
    """The image's name in `daemon`, imported unless it is there already. The tag is a
    digest of the binaries, so a rebuilt stand-in never hides behind an old image."""
    binaries = build.ensure_built()
    digest = hashlib.sha256()
    for path in (binaries.server, binaries.citool):
        digest.update(path.read_bytes())
    name = f"step-runner-test:{digest.hexdigest()[:12]}"
    if daemon.cli("image", "inspect", name, check=False).returncode != 0:
        daemon.import_image(name, _files(binaries))
    return name


@dataclass(frozen=True, slots=True)
class BuildContainer:
    """A running build container whose main process is `steps serve`."""

    id: str
    socket: str  # the path serve reported, which Runner passes to `steps proxy --socket`


def ready_socket(logs: str) -> str | None:
    """The socket of the first ready line in a container's output, as Runner reads it."""
    for line in logs.splitlines():
        if line.startswith(READY_PREFIX):
            return line[len(READY_PREFIX) :]
    return None


def start_build_container(
    daemon: DockerDaemon, image: str, *extra: str, host: str | None = None
) -> BuildContainer:
    """`docker run -d --network none IMAGE <helper> steps serve EXTRA...` and wait for
    its ready line on stderr (through `host` if given, e.g. the tap)."""
    run = daemon.cli("run", "-d", "--network", "none", image, *SERVE_CMD, *extra, host=host)
    container = run.stdout.strip()
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        logs = daemon.cli("logs", container, host=host)
        socket = ready_socket(logs.stderr)
        if socket:
            return BuildContainer(container, socket)
        if time.monotonic() > deadline:
            state = daemon.cli("inspect", "-f", "{{.State.Status}}", container, check=False)
            raise AssertionError(
                f"no ready line from {container[:12]} in {READY_TIMEOUT:.0f} s "
                f"(state {state.stdout.strip()}): {logs.stdout!r} {logs.stderr!r}"
            )
        time.sleep(0.02)
