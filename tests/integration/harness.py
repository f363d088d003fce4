"""Shared helpers for integration tests: real servers on short temp unix sockets or
127.0.0.1:0 that are always stopped, child processes that report the ports they bound
themselves, polling with a deadline, and one call helper that hides whether a
StepRunner method is unary or server-streaming.

Each helper is a context manager that starts the real thing and always stops it; the
fixtures in conftest.py are thin wrappers around them.

Unix socket paths are limited to about 100 bytes, so temp dirs live directly in /tmp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
from google.protobuf.message import Message

from exporter.simulator import SimulatedStepRunner, call_once
from exporter.simulator.client import CallResult
from tests.labels import SERVICE as STEP_RUNNER_SERVICE

T = TypeVar("T")
Transport = Literal["unix", "tcp"]

DEFAULT_TIMEOUT = 10.0


@contextlib.contextmanager
def short_tmpdir(prefix: str = "srx-") -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unix_address(directory: str, name: str = "sr.sock") -> str:
    return f"unix://{directory}/{name}"


@contextlib.asynccontextmanager
async def simulated_step_runner(
    transport: Transport = "unix", **kwargs: Any
) -> AsyncIterator[SimulatedStepRunner]:
    """A started SimulatedStepRunner (kwargs: relay, header_probe, package)."""
    with short_tmpdir() as directory:
        address = unix_address(directory) if transport == "unix" else "127.0.0.1:0"
        async with SimulatedStepRunner(address, **kwargs) as sim:
            yield sim


@contextlib.asynccontextmanager
async def scripted_step_runner(
    handlers: Mapping[str, Callable[..., Any]], options: Sequence[tuple[str, Any]] = ()
) -> AsyncIterator[str]:
    """A grpc.aio server for answers the simulator does not give: its StepRunner methods
    (FollowLogs streaming, the rest unary) take and return raw bytes. Yields its target."""
    server = grpc.aio.server(options=tuple(options))
    wrapped = {
        name: (
            grpc.unary_stream_rpc_method_handler(handler)
            if name == "FollowLogs"
            else grpc.unary_unary_rpc_method_handler(handler)
        )
        for name, handler in handlers.items()
    }
    service = grpc.method_handlers_generic_handler(STEP_RUNNER_SERVICE, wrapped)
    server.add_generic_rpc_handlers((service,))
    with short_tmpdir() as directory:
        address = unix_address(directory, "scripted.sock")
        server.add_insecure_port(address)
        await server.start()
        try:
            yield address
        finally:
            await server.stop(None)


def run_async(coro: Coroutine[Any, Any, T], timeout: float = DEFAULT_TIMEOUT) -> T:
    """Run a coroutine from a sync test on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class BackgroundLoop:
    """An event loop on its own thread, for servers that a sync test (or a test that
    drives a subprocess) needs running while it does blocking work."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = DEFAULT_TIMEOUT) -> T:
        """Run `coro` on the loop and wait for it; after `timeout` it is cancelled (so
        nothing of it goes on running behind the next test) and TimeoutError raised."""
        bounded = asyncio.wait_for(coro, timeout)
        return asyncio.run_coroutine_threadsafe(bounded, self.loop).result()

    def close(self) -> None:
        """Cancel what is left and close the loop, as asyncio.run does at its end."""
        if self._thread.is_alive():
            cancel = asyncio.run_coroutine_threadsafe(self._cancel_the_rest(), self.loop)
            with contextlib.suppress(TimeoutError):
                cancel.result(DEFAULT_TIMEOUT)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(DEFAULT_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    async def _cancel_the_rest(self) -> None:
        this = asyncio.current_task()
        rest = [task for task in asyncio.all_tasks() if task is not this]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


@contextlib.contextmanager
def background_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    try:
        yield loop
    finally:
        loop.close()


@contextlib.contextmanager
def entered_on(loop: BackgroundLoop, manager: AbstractAsyncContextManager[T]) -> Iterator[T]:
    """An async context manager entered and always exited on `loop`, from sync code."""
    value = loop.run(manager.__aenter__())
    try:
        yield value
    finally:
        loop.run(manager.__aexit__(None, None, None))


@contextlib.contextmanager
def simulated_step_runner_thread(
    transport: Transport = "unix", **kwargs: Any
) -> Iterator[tuple[SimulatedStepRunner, BackgroundLoop]]:
    """A SimulatedStepRunner serving from a background thread: use `loop.run(sim.stop())`
    and `loop.run(sim.start())` to kill and restart it from a sync test."""
    with (
        background_loop() as loop,
        entered_on(loop, simulated_step_runner(transport, **kwargs)) as sim,
    ):
        yield sim, loop


def poll(
    probe: Callable[[], T | None],
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "condition",
    interval: float = 0.005,
) -> T:
    """Call `probe` until it returns something other than None; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_until(
    condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    poll(lambda: True if condition() else None, timeout, what)


async def async_wait_until(
    condition: Callable[[], bool], within: float = DEFAULT_TIMEOUT, what: str = "condition"
) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.005)


async def grpc_call(
    target: str, method: str, request: Message | bytes, **kwargs: Any
) -> CallResult:
    """Call a StepRunner method ("Run", "FollowLogs", ... or a full path) on its own
    channel and return code, details, raw responses and metadata, never raising for a
    gRPC error. kwargs: metadata, deadline (seconds), package, streaming, cancel_after."""
    return await call_once(target, method, request, **kwargs)


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM a child process and wait for it; SIGKILL it if it does not go in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


# -- child processes ----------------------------------------------------------------------

_LOGFMT_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def log_fields(line: str) -> dict[str, Any]:
    """The fields of one log line, in logfmt (the sidecar's text format, Prometheus'
    format) or JSON (the sidecar's json format); {} for anything else."""
    line = line.strip()
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            fields = json.loads(line)
            return fields if isinstance(fields, dict) else {}
        return {}
    return {
        key: json.loads(value) if value.startswith('"') else value
        for key, value in _LOGFMT_FIELD.findall(line)
    }


class ProcessLog:
    """Everything a child process writes (stdout and stderr as one stream), in a file:
    the child never blocks on a pipe nobody reads, and the log can be read at any time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def lines(self) -> list[str]:
        return self.text().splitlines()

    def find(self, pattern: str) -> re.Match[str] | None:
        """The first line matching the regular expression `pattern`, or None."""
        for line in self.lines:
            if match := re.search(pattern, line):
                return match
        return None

    def record(self, msg: str) -> dict[str, Any] | None:
        """The fields of the first line logged with this message, or None."""
        for line in self.lines:
            fields = log_fields(line)
            if fields.get("msg") == msg:
                return fields
        return None


@contextlib.contextmanager
def child_process(
    argv: Sequence[str],
    ready: Callable[[ProcessLog], T | None],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    log_file: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], ProcessLog, T]]:
    """A child process, its log and what `ready(log)` returned once it stopped returning
    None (typically the address the child bound itself and logged); stopped on exit.
    A child that exits first fails the test with its log. The log is a temp file gone
    afterwards, unless `log_file` says where to keep it."""
    with short_tmpdir("srx-log-") as directory:
        log = ProcessLog(log_file or Path(directory, "output.log"))
        with log.path.open("wb") as output:
            process = subprocess.Popen(
                list(argv),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
            )
        try:

            def probe() -> T | None:
                value = ready(log)
                if value is None and process.poll() is not None:
                    raise AssertionError(f"{what} exited {process.returncode}:\n{log.text()}")
                return value

            value = poll(probe, timeout, f"{what} to be ready", interval=0.02)
            yield process, log, value
        finally:
            stop_process(process)
