"""Faults with exact accounting afterwards (issue 6, item 1): step-runner killed and
restarted mid-job, a client vanishing mid-FollowLogs, a client that stops reading, a
step-runner that never answers, and shutdown on SIGTERM with a real Prometheus.

After each fault every counter equals what SPEC section 3 says for what the clients
saw: the simulated Runner's tally plus, for calls cut by the fault, the rows for the
codes the clients got.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest

from exporter import app
from exporter.app import Sidecar
from exporter.h2 import PREFACE
from exporter.proto import step_pb2
from exporter.simulator import SCENARIOS, SimulatedStepRunner, run_jobs
from exporter.simulator.client import invoke, open_channel
from exporter.simulator.scenarios import job_env, run_request
from tests.wire import frame, grpc_message, request_headers

from .conftest import StartPrometheus
from .harness import (
    BackgroundLoop,
    async_wait_until,
    grpc_call,
    run_async,
    short_tmpdir,
    simulated_step_runner,
    wait_until,
)
from .sidecar import ServeProcess, counted, expected, http_get, running_sidecar, sample, target

pytestmark = pytest.mark.integration

UNAVAILABLE = ("script_failure", "grpc_status", "Unavailable", "infrastructure")
DEADLINE = ("script_failure", "grpc_status", "DeadlineExceeded", "infrastructure")
STEP_FAILURE = ("script_failure", "status_error_kind", "step_failure", "script")

Counts = tuple[dict[str, int], Counter[tuple[str, ...]]]


def plus(counts: Counts, result: str, failure: tuple[str, ...] | None = None, n: int = 1) -> Counts:
    results, failures = dict(counts[0]), Counter(counts[1])
    results[result] = results.get(result, 0) + n
    if failure is not None:
        failures[failure] += n
    return results, failures


def nothing() -> Counts:
    return {"success": 0, "failed": 0, "cancelled": 0}, Counter()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- a raw HTTP/2 client: what a vanishing or stalled process looks like on the wire --------

DATA, HEADERS, SETTINGS, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x8
END_STREAM, END_HEADERS = 0x1, 0x4
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
MAX_WINDOW = 2**31 - 1
FOLLOW_LOGS = "/proto.StepRunner/FollowLogs"


def request_block(encoder: hpack.Encoder, path: str, timeout: str | None = None) -> bytes:
    return bytes(encoder.encode(request_headers(path, timeout)))


class RawClient:
    """An HTTP/2 client that does only what it is told: it never reads unless asked,
    never answers a PING, and grants whatever flow-control window it is given."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.encoder = hpack.Encoder()
        self.next_stream = 1
        self.received = bytearray()

    @classmethod
    async def connect(
        cls, path: str, *, window: int = 65535, rcvbuf: int | None = None
    ) -> RawClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        client = cls(sock)
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window)
        opening = PREFACE + frame(SETTINGS, 0, 0, settings) + frame(SETTINGS, 1, 0)
        if window > 65535:
            opening += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", window - 65535))
        await client.send(opening)
        return client

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def call(self, path: str, message: bytes, grpc_timeout: str | None = None) -> int:
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        block = request_block(self.encoder, path, grpc_timeout)
        await self.send(
            frame(HEADERS, END_HEADERS, stream, block)
            + frame(DATA, END_STREAM, stream, grpc_message(message))
        )
        return stream

    async def read(self, at_most: int) -> bytes:
        data = await self.loop.sock_recv(self.sock, at_most)
        self.received += data
        return data

    def close(self) -> None:
        self.sock.close()


class FrameCounter:
    """Walks received bytes: DATA payload per stream and which streams have ended."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.data: Counter[int] = Counter()
        self.ended: set[int] = set()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3])
            if len(self._buf) < 9 + length:
                return
            ftype, flags = self._buf[3], self._buf[4]
            stream = int.from_bytes(self._buf[5:9]) & 0x7FFFFFFF
            if ftype == DATA:
                self.data[stream] += length
            if ftype in (DATA, HEADERS) and flags & END_STREAM:
                self.ended.add(stream)
            del self._buf[: 9 + length]


async def start_job(target_: str, scenario: str, job_id: str, **env: int) -> None:
    """Run (only) for a job, so the test can drive its other calls by hand."""
    request = run_request(job_id, job_env(SCENARIOS[scenario], job_id, **env))
    result = await grpc_call(target_, "Run", request, deadline=10)
    assert result.code == "OK", result


# -- step-runner killed and restarted ------------------------------------------------------


async def in_flight_then_killed(sim: SimulatedStepRunner, target_: str, prefix: str) -> list[str]:
    """Four jobs, each on its own channel, with one call in flight when step-runner dies:
    two FollowLogs streams (one message sent, then stalled) and two Status calls that
    never answer. Returns the codes the client saw for those calls, then for Close on
    two of the channels while step-runner is still down."""
    plans = [("client_cancel", "FollowLogs"), ("hang_status", "Status")] * 2
    channels = [open_channel(target_) for _ in plans]
    try:
        for index, (scenario, _) in enumerate(plans):
            await start_job(target_, scenario, f"{prefix}-{index}")
        before = Counter(sim.stats.calls)
        requests = {
            "FollowLogs": lambda job_id: step_pb2.FollowLogsRequest(id=job_id),
            "Status": lambda job_id: step_pb2.StatusRequest(id=job_id),
        }
        calls = [
            asyncio.ensure_future(
                invoke(channels[i], method, requests[method](f"{prefix}-{i}"), deadline=30.0)
            )
            for i, (_, method) in enumerate(plans)
        ]
        await async_wait_until(
            lambda: (
                sim.stats.calls["FollowLogs"] - before["FollowLogs"] == 2
                and sim.stats.calls["Status"] - before["Status"] == 2
            ),
            what="four calls in flight at step-runner",
        )
        await sim.stop()
        codes = [result.code for result in await asyncio.wait_for(asyncio.gather(*calls), 10)]
        for index in (0, 1):
            close = await invoke(
                channels[index], "Close", step_pb2.CloseRequest(id=f"{prefix}-{index}"), deadline=5
            )
            codes.append(f"Close:{close.code}")
        return codes
    finally:
        for channel in channels:
            await channel.close()


@pytest.mark.step_runner(relay=True)
def test_step_runner_killed_and_restarted_with_jobs_in_flight(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner, sidecar: Sidecar
) -> None:
    async def main() -> None:
        # The same fault on a direct connection: what the client must see through ours.
        async with simulated_step_runner(relay=True) as direct:
            direct_codes = await in_flight_then_killed(direct, direct.address, "direct")
        assert direct_codes == ["Unavailable"] * 4 + ["Close:Unavailable"] * 2

        before = await run_jobs(target(sidecar), 20, concurrency=4, seed=11)
        assert before.mismatches == []
        assert sample(sidecar, "step_runner_exporter_upstream_up") == 1

        codes = await in_flight_then_killed(step_runner, target(sidecar), "killed")
        assert codes == direct_codes
        assert sample(sidecar, "step_runner_exporter_upstream_up") == 0

        await step_runner.start()  # the same sidecar, never restarted
        after = await run_jobs(target(sidecar), 20, concurrency=4, seed=12)
        assert after.mismatches == []
        assert sample(sidecar, "step_runner_exporter_upstream_up") == 1
        # Close for the other two killed jobs: step-runner forgot them (NotFound),
        # and a decided job is never counted again.
        for index in (2, 3):
            close = await grpc_call(
                target(sidecar), "Close", step_pb2.CloseRequest(id=f"killed-{index}")
            )
            assert close.code == "NotFound"

        want = merge(expected(before), expected(after))
        want = plus(want, "failed", UNAVAILABLE, n=4)
        await async_wait_until(lambda: counted(sidecar) == want, what="exact counts")
        assert sample(sidecar, "step_runner_exporter_decode_errors_total", message="http2") == 0

    loop.run(main(), timeout=60)


def merge(a: Counts, b: Counts) -> Counts:
    results = {k: a[0].get(k, 0) + b[0].get(k, 0) for k in {*a[0], *b[0]}}
    return results, a[1] + b[1]


def test_upstream_up_follows_step_runner_without_any_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app, "PROBE_INTERVAL", 0.05)

    async def main() -> None:
        async with (
            simulated_step_runner(relay=False) as sim,
            running_sidecar(sim.listen_address) as sidecar,
        ):
            up = lambda: sample(sidecar, "step_runner_exporter_upstream_up")  # noqa: E731
            assert up() == 1
            await sim.stop()
            await async_wait_until(lambda: up() == 0, within=5, what="upstream_up 0")
            await sim.start()
            await async_wait_until(lambda: up() == 1, within=5, what="upstream_up 1")

    run_async(main())


# -- the client vanishing mid-FollowLogs -------------------------------------------------


@pytest.mark.step_runner(relay=False)
def test_client_vanishing_mid_follow_logs_cancels_upstream_and_leaks_nothing(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner, sidecar: Sidecar
) -> None:
    rounds = 5

    async def vanish(job_id: str) -> None:
        await start_job(target(sidecar), "client_cancel", job_id)
        assert sidecar.splice is not None and sidecar.splice.listen.path is not None
        client = await RawClient.connect(sidecar.splice.listen.path, window=MAX_WINDOW)
        cancelled = step_runner.stats.cancelled["FollowLogs"]
        stream = await client.call(
            FOLLOW_LOGS, step_pb2.FollowLogsRequest(id=job_id).SerializeToString()
        )
        frames = FrameCounter()
        while frames.data[stream] < 4096 + 5:  # the first log message has arrived
            frames.feed(await client.read(65536))
        client.close()  # gone: no RST_STREAM, no GOAWAY, just the socket
        # Only the sidecar passing the close on can end the stalled stream upstream.
        await async_wait_until(
            lambda: step_runner.stats.cancelled["FollowLogs"] == cancelled + 1,
            what="step-runner's FollowLogs cancelled",
        )

    async def main() -> None:
        await vanish("warm-up")  # grpc-core's own threads and fds settle
        splice = sidecar.splice
        assert splice is not None
        await async_wait_until(lambda: splice.active_connections == 0)
        tasks, fds = len(asyncio.all_tasks()), open_fds()
        tracked = len(sidecar.accounting.tracker)

        for i in range(rounds):
            await vanish(f"vanish-{i}")

        await async_wait_until(lambda: splice.active_connections == 0, what="pairs closed")
        await async_wait_until(
            lambda: len(asyncio.all_tasks()) <= tasks and open_fds() <= fds,
            what=f"tasks back to {tasks} and fds back to {fds}",
        )
        # Each vanished job is remembered once (decided: its stream died UNAVAILABLE).
        assert len(sidecar.accounting.tracker) == tracked + rounds
        want = plus(nothing(), "failed", UNAVAILABLE, n=rounds + 1)
        assert counted(sidecar) == want
        assert step_runner.stats.cancelled["FollowLogs"] == rounds + 1

    loop.run(main(), timeout=60)


# -- a client that stops reading -----------------------------------------------------------


def _pair(sidecar: Sidecar) -> Any:
    # The splice keeps no public handle on a connection; the test needs its transports.
    assert sidecar.splice is not None
    (pair,) = sidecar.splice._pairs
    return pair


@pytest.mark.step_runner(relay=False)
def test_slow_reader_memory_stays_bounded_while_a_large_log_streams(
    loop: BackgroundLoop, sidecar: Sidecar
) -> None:
    """The reader grants an unlimited HTTP/2 window, so only socket backpressure can
    hold step-runner back: the sidecar must stop reading upstream whenever the client
    is not reading, and never buffer more than a read or two of the log."""
    log_bytes = 16 << 20

    async def main() -> None:
        await start_job(
            target(sidecar), "stream", "slow-1", log_bytes=log_bytes, log_chunk=64 << 10
        )
        splice = sidecar.splice
        assert splice is not None and splice.listen.path is not None
        await async_wait_until(lambda: splice.active_connections == 0, what="Run's pair gone")
        client = await RawClient.connect(splice.listen.path, window=MAX_WINDOW, rcvbuf=16 << 10)
        stream = await client.call(
            FOLLOW_LOGS, step_pb2.FollowLogsRequest(id="slow-1").SerializeToString()
        )
        await async_wait_until(lambda: splice.active_connections == 1)
        pair = _pair(sidecar)
        upstream, downstream = pair.upstream.transport, pair.client.transport

        def handled() -> float:
            return sample(
                sidecar,
                "grpc_server_handled_total",
                grpc_type="server_stream",
                grpc_service="proto.StepRunner",
                grpc_method="FollowLogs",
                grpc_code="OK",
            )

        frames = FrameCounter()
        buffered: list[int] = []
        try:
            while stream not in frames.ended:
                # Not reading: the sidecar must fill up and stop reading step-runner,
                # unless step-runner already sent its last bytes.
                await async_wait_until(
                    lambda: not upstream.is_reading() or handled() == 1,
                    what="backpressure on step-runner",
                )
                buffered.append(downstream.get_write_buffer_size())
                taken = 0
                while taken < 256 << 10 and stream not in frames.ended:
                    chunk = await client.read(65536)
                    assert chunk, "connection closed early"
                    frames.feed(chunk)
                    taken += len(chunk)
        finally:
            client.close()
        # Each message: the gRPC prefix (5) and FollowLogsResponse's tag and length (4).
        assert frames.data[stream] == log_bytes + 9 * (log_bytes // (64 << 10))
        print(f"sidecar write buffer at {len(buffered)} stalls: max {max(buffered)} bytes")
        assert len(buffered) > 20, "backpressure engaged again and again"
        assert max(buffered) < 1 << 20, f"sidecar buffered up to {max(buffered)} bytes"

    loop.run(main(), timeout=60)


# -- a step-runner that never answers -------------------------------------------------------


class _Silent(asyncio.Protocol):
    """Accepts the connection, reads nothing, writes nothing (a wedged process)."""

    transports: list[asyncio.Transport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transports.append(transport)
        transport.pause_reading()


def test_client_deadline_fires_on_time_when_step_runner_never_answers() -> None:
    async def main() -> None:
        with short_tmpdir() as d:
            loop = asyncio.get_running_loop()
            server = await loop.create_unix_server(_Silent, f"{d}/silent.sock")
            try:
                async with running_sidecar(f"unix://{d}/silent.sock") as sidecar:
                    for name, target_ in (
                        ("direct", f"unix://{d}/silent.sock"),
                        ("sidecar", target(sidecar)),
                    ):
                        started = time.monotonic()
                        result = await grpc_call(
                            target_, "Status", step_pb2.StatusRequest(id="s-1"), deadline=0.5
                        )
                        elapsed = time.monotonic() - started
                        assert result.code == "DeadlineExceeded", name
                        assert elapsed >= 0.45, (name, elapsed)  # not cut early
                    # The client never got the server's SETTINGS, so it never sent the
                    # call: there is no job to count, and no call either.
                    assert counted(sidecar) == nothing()
            finally:
                server.close()
                for transport in _Silent.transports:
                    transport.abort()
                await server.wait_closed()

        # A step-runner that speaks HTTP/2 but never answers Status: counted.
        async with simulated_step_runner() as sim, running_sidecar(sim.listen_address) as sidecar:
            tally = await run_jobs(
                target(sidecar), 6, concurrency=6, mix={"hang_status": 1.0}, seed=5
            )
            assert tally.mismatches == []
            waits = [c.seconds for job in tally.jobs for c in job.calls if c.method == "Status"]
            assert len(waits) == 6 and all(w >= 0.19 for w in waits), waits
            await async_wait_until(lambda: counted(sidecar) == expected(tally))
            assert counted(sidecar)[1] == {DEADLINE: 6}

    run_async(main(), timeout=30)


# -- shutdown ----------------------------------------------------------------------------------


@pytest.mark.step_runner(relay=False)
def test_grace_period_cuts_what_does_not_finish_and_counts_it(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner, sidecar: Sidecar
) -> None:
    async def main() -> None:
        await start_job(target(sidecar), "client_cancel", "cut-1")
        async with open_channel(target(sidecar)) as channel:
            call = channel.unary_stream(FOLLOW_LOGS)(
                step_pb2.FollowLogsRequest(id="cut-1").SerializeToString()
            )
            await call.read()  # one message, then step-runner stalls the stream for good
            started = time.monotonic()
            await sidecar.stop(grace=0.3, final_scrape_wait=0)  # so only the cut ends it
            assert time.monotonic() - started >= 0.3
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert counted(sidecar) == plus(nothing(), "failed", UNAVAILABLE)
        await async_wait_until(lambda: step_runner.stats.cancelled["FollowLogs"] == 1)

    loop.run(main())


@pytest.mark.step_runner(relay=False)
def test_final_scrape_wait_expires_without_a_scrape(loop: BackgroundLoop, sidecar: Sidecar) -> None:
    async def main() -> None:
        started = time.monotonic()
        await sidecar.stop(grace=0, final_scrape_wait=0.3)
        assert time.monotonic() - started >= 0.3  # it waited, and nothing but the wait ended it

    loop.run(main())


@pytest.mark.step_runner(relay=False)
@pytest.mark.sidecar(shutdown={"grace_period": "20s", "final_scrape_wait": "30s"})
def test_sigterm_finishes_open_jobs_and_waits_for_prometheus_final_scrape(
    loop: BackgroundLoop, sidecar_process: ServeProcess, prometheus: StartPrometheus
) -> None:
    """A real `serve` process, a real Prometheus scraping it every second. SIGTERM
    arrives while two jobs are mid-way on open connections: new connections are
    refused, the open ones finish within the grace period, and the process exits only
    after Prometheus has scraped the final values, so every job is in Prometheus."""
    proc, listen = sidecar_process.process, sidecar_process.listen
    prom = prometheus([sidecar_process.web], interval="1s")
    prom.wait_scraped(1)
    tally = loop.run(run_jobs(listen, 30, concurrency=6, seed=21), 60)
    assert tally.mismatches == []

    channels = loop.run(_open_channels(listen, 2))
    for index, scenario in enumerate(("success", "step_failure")):
        result = loop.run(
            invoke(channels[index], "Run", _run(scenario, f"term-{index}"), deadline=10)
        )
        assert result.code == "OK"

    sidecar_process.terminate()
    wait_until(lambda: _status(sidecar_process.url("/-/ready")) == 503, what="not ready")
    wait_until(lambda: not sidecar_process.socket_path.exists(), what="listen socket removed")
    refused = loop.run(grpc_call(listen, "Status", step_pb2.StatusRequest(id="late"), deadline=2))
    assert refused.code == "Unavailable"
    assert _status(sidecar_process.url()) == 200  # still served while draining

    # The open connections still work: finish both jobs the Runner way.
    for index, scenario in ((0, "success"), (1, "step_failure")):
        job = f"term-{index}"
        channel = channels[index]
        follow = loop.run(invoke(channel, "FollowLogs", step_pb2.FollowLogsRequest(id=job)))
        status = loop.run(invoke(channel, "Status", step_pb2.StatusRequest(id=job), deadline=10))
        close = loop.run(invoke(channel, "Close", step_pb2.CloseRequest(id=job), deadline=10))
        assert (follow.code, status.code, close.code) == ("OK", "OK", "OK"), scenario
    assert proc.poll() is None, "exited while connections were open"
    loop.run(_close_channels(channels))

    # Bounded only by the two waits it must not need: the last connection's close ended
    # the grace period (nothing was cut) and a scrape ended the final wait.
    assert proc.wait(timeout=60) == 0
    assert sidecar_process.log.record("grace period over; cut open connections") is None
    assert sidecar_process.log.record("final scrape") is not None, sidecar_process.log.text()

    want = plus(plus(expected(tally), "success"), "failed", STEP_FAILURE)

    def stored() -> tuple[dict[str, int], dict[tuple[str, ...], int]]:
        jobs = {
            s["metric"]["result"]: int(s["value"])
            for s in prom.query("max_over_time(step_runner_jobs_total[10m])")
        }
        failures = {
            tuple(s["metric"][k] for k in ("failure_reason", "source", "kind", "category")): int(
                s["value"]
            )
            for s in prom.query("max_over_time(step_runner_job_failures_total[10m]) > 0")
        }
        return jobs, failures

    # The final scrape was answered before the sidecar exited; Prometheus stores what it
    # read a moment later (sooner or later on a loaded machine): polled, not assumed.
    wait_until(lambda: stored() == (want[0], dict(want[1])), what="the final values stored")


def _status(url: str) -> int:
    try:
        return http_get(url)[0]
    except OSError:
        return 0


def _run(scenario: str, job_id: str) -> step_pb2.RunRequest:
    return run_request(job_id, job_env(SCENARIOS[scenario], job_id))


async def _open_channels(target_: str, n: int) -> list[Any]:
    return [open_channel(target_) for _ in range(n)]


async def _close_channels(channels: list[Any]) -> None:
    for channel in channels:
        await channel.close()


# -- soak, short mode --------------------------------------------------------------------------


def test_soak_short_mode() -> None:
    """The soak command's short mode: exact counts, bounded tracker, across restarts."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--short"],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "counts exact" in result.stdout
