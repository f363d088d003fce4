"""Shared helpers for integration tests: real servers on short temp unix sockets or
127.0.0.1:0 that are always stopped, polling with a deadline, and one call helper
that hides whether a StepRunner method is unary or server-streaming.

Unix socket paths are limited to about 100 bytes, so temp dirs live directly in /tmp.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Literal, TypeVar

from google.protobuf.message import Message

from exporter.simulator import SimulatedStepRunner, call_once
from exporter.simulator.client import CallResult

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
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEFAULT_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()


@contextlib.contextmanager
def background_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    try:
        yield loop
    finally:
        loop.close()


@contextlib.contextmanager
def simulated_step_runner_thread(
    transport: Transport = "unix", **kwargs: Any
) -> Iterator[tuple[SimulatedStepRunner, BackgroundLoop]]:
    """A SimulatedStepRunner serving from a background thread: use `loop.run(sim.stop())`
    and `loop.run(sim.start())` to kill and restart it from a sync test."""
    with short_tmpdir() as directory, background_loop() as loop:
        address = unix_address(directory) if transport == "unix" else "127.0.0.1:0"
        sim = SimulatedStepRunner(address, **kwargs)
        loop.run(sim.start())
        try:
            yield sim, loop
        finally:
            loop.run(sim.close())


def wait_until(
    condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


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
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
