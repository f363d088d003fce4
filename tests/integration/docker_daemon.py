"""A real Docker daemon for the docker tap's tests, started and stopped by the test.

Debian's `docker.io` runs containers on these machines as root with the vfs storage
driver and no networking set up (`--iptables=false --bridge=none`); every path lives
in one short temp directory (unix socket paths are limited to about 100 bytes), so a
test daemon never touches the machine's own `/var/lib/docker` or `/var/run/docker.sock`,
and stopping it stops only what it started. There is no registry here: images come
from `docker import` of a tarball of static binaries (`import_image`).

In CI (`CI=true`) a daemon that cannot start fails the test; elsewhere the test is
skipped with the reason printed (`unavailable_reason`).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


class DaemonUnavailableError(RuntimeError):
    """dockerd is missing or did not come up; the message says why (with its log tail)."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: the Docker Engine API as any client speaks it."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def ping(path: str, timeout: float = 2.0) -> bool:
    """True when a Docker Engine API at `path` answers `GET /_ping` with 200 OK."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class DockerDaemon:
    """One dockerd with every path under a fresh temp directory.

    `socket` is the daemon's API socket; `cli()` runs the docker CLI against it (or
    against another `host`, such as the tap in front of it).
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="srd-", dir="/tmp")
        self.socket = f"{self.dir}/docker.sock"
        self.log_path = Path(self.dir, "dockerd.log")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise DaemonUnavailableError("dockerd is not installed (Debian package docker.io)")
        if os.geteuid() != 0:
            raise DaemonUnavailableError("dockerd needs root here")
        argv = [dockerd, "--storage-driver", "vfs", "--data-root", f"{self.dir}/root"]
        argv += ["--exec-root", f"{self.dir}/exec", "--pidfile", f"{self.dir}/dockerd.pid"]
        argv += ["-H", self.host, "--iptables=false", "--ip6tables=false", "--bridge=none"]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.socket):
            if self._process.poll() is not None:
                raise DaemonUnavailableError(
                    f"dockerd exited {self._process.returncode}: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DaemonUnavailableError(
                    f"dockerd not ready in {START_TIMEOUT:.0f} s: {self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def restart(self) -> None:
        """Stop the daemon (its containers stop with it) and start it again on the same
        paths, as `systemctl restart docker` does."""
        self._terminate()
        self.start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._remove_all_containers()
        self._terminate()
        # vfs layers of containers may hold mounts under exec-root; unmount before removal.
        subprocess.run(
            [
                "sh",
                "-c",
                f"grep -o ' {self.dir}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
            ],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.dir, ignore_errors=True)

    def _terminate(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)

    def _remove_all_containers(self) -> None:
        ids = self.cli("ps", "-aq").stdout.split()
        if ids:
            self.cli("rm", "-f", *ids, check=False)

    def cli(
        self,
        *args: str,
        host: str | None = None,
        input: bytes | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker -H HOST ARGS...` (HOST: this daemon unless given) and return it,
        its output as text; `run_cli` for bytes."""
        result = run_cli(host or self.host, *args, input=input, check=check, timeout=timeout)
        return subprocess.CompletedProcess(
            result.args, result.returncode, _text(result.stdout), _text(result.stderr)
        )

    def import_image(self, name: str, files: Mapping[str, Path | bytes]) -> str:
        """`docker import` an image made of `files` (path in the image -> a local file,
        such as a static binary, or its bytes), every file executable. Returns the id."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            dirs = {str(Path(p).parent) for p in files} | {"tmp"}
            for directory in sorted(d.lstrip("/") for d in dirs if d not in ("", "/", ".")):
                info = tarfile.TarInfo(directory)
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if directory == "tmp" else 0o755
                tar.addfile(info)
            for path, content in sorted(files.items()):
                data = content.read_bytes() if isinstance(content, Path) else content
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size = len(data)
                info.mode = 0o755
                tar.addfile(info, io.BytesIO(data))
        result = run_cli(self.host, "import", "-", name, input=buffer.getvalue(), timeout=120)
        return result.stdout.decode().strip()


def run_cli(
    host: str,
    *args: str,
    input: bytes | None = None,
    check: bool = True,
    timeout: float = 60.0,
    client: str = "docker",
) -> subprocess.CompletedProcess[bytes]:
    """Run `CLIENT -H HOST ARGS...`, bytes in and out; a failure fails the test if `check`."""
    result = subprocess.run(
        [client, "-H", host, *args], input=input, capture_output=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {_text(result.stderr).strip()}")
    return result


def _text(output: bytes) -> str:
    # What subprocess's text mode makes of it: decoded, universal newlines.
    return output.decode().replace("\r\n", "\n").replace("\r", "\n")


def unavailable(reason: str) -> None:
    """Fail in CI (the tests must run there), skip with the reason elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"a real Docker daemon is required in CI: {reason}")
    pytest.skip(f"no Docker daemon here: {reason}")


@contextlib.contextmanager
def docker_daemon() -> Iterator[DockerDaemon]:
    """A started DockerDaemon, always stopped afterwards (or the test skipped/failed)."""
    daemon = DockerDaemon()
    try:
        try:
            daemon.start()
        except DaemonUnavailableError as exc:
            unavailable(str(exc))
        yield daemon
    finally:
        daemon.stop()
