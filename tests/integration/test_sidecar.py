"""The sidecar with real gRPC peers: what clients see through it equals a direct
connection, and every counter equals the simulated Runner's own tally."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Sequence

import grpc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Sidecar
from exporter.classifier import GRPC_INTERNAL, UNKNOWN_FAILURE
from exporter.proto import step_pb2
from exporter.simulator import SCENARIOS, SimulatedStepRunner, run_job, run_jobs
from exporter.simulator.client import CallResult
from exporter.splice import ListenError, bind_unix_socket

from .harness import (
    BackgroundLoop,
    async_wait_until,
    grpc_call,
    run_async,
    scripted_step_runner,
    short_tmpdir,
    simulated_step_runner,
)
from .sidecar import counted, expected, http_get, running_sidecar, sample, target, web_url

pytestmark = pytest.mark.integration


def _comparable(call: CallResult) -> tuple[object, ...]:
    """A call as the client saw it, minus what legitimately differs between two runs
    (Status timestamps are wall-clock times; they are compared as durations)."""
    responses: Sequence[object] = call.responses
    if call.method == "Status" and call.code == "OK":
        decoded = []
        for raw in call.responses:
            msg = step_pb2.StatusResponse.FromString(raw)
            for job in msg.jobs:
                times = (job.HasField("start_time"), job.HasField("end_time"))
                duration = job.end_time.ToNanoseconds() - job.start_time.ToNanoseconds()
                job.ClearField("start_time")
                job.ClearField("end_time")
                decoded.append((job.SerializeToString(), times, duration if all(times) else None))
        responses = decoded
    return (
        call.method,
        call.code,
        call.grpc_code,
        call.details,
        tuple(responses),
        call.initial_metadata,
        call.trailing_metadata,
    )


@pytest.mark.step_runner(relay=True)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_looks_the_same_through_the_sidecar(
    loop: BackgroundLoop, sidecar: Sidecar, scenario: str
) -> None:
    """Codes, details, response bytes, headers and trailers (grpc-status-details-bin
    included) are identical to a direct connection, and the job is counted per SPEC."""

    async def main() -> None:
        async with simulated_step_runner(relay=True) as direct_sim:
            job_id = f"{scenario}-1"
            direct = await run_job(
                direct_sim.address, scenario, job_id, log_bytes=70_000, log_chunk=3000
            )
            proxied = await run_job(
                target(sidecar), scenario, job_id, log_bytes=70_000, log_chunk=3000
            )
            assert direct.problems() == [] and proxied.problems() == []
            # Where timing picks between equally right call sequences (a reconnect in
            # backoff or not), only the calls up to the deciding failure must match.
            same = 1 if SCENARIOS[scenario].also_calls else len(direct.calls)
            assert [_comparable(c) for c in proxied.calls[:same]] == [
                _comparable(c) for c in direct.calls[:same]
            ]
            assert len(proxied.calls) == len(direct.calls)
            assert bytes(proxied.log) == bytes(direct.log)
            want = direct.expected
            await async_wait_until(
                lambda: sum(counted(sidecar)[0].values()) == (0 if want.result is None else 1),
                what="the job to be counted",
            )
            results, failures = counted(sidecar)
            if want.result is not None:
                assert results[want.result] == 1
            assert dict(failures) == ({tuple(want.failure): 1} if want.failure else {})

    loop.run(main(), timeout=30)


def test_details_and_trailing_metadata_pass_unchanged(
    loop: BackgroundLoop, sidecar: Sidecar
) -> None:
    async def main() -> None:
        record = await run_job(target(sidecar), "details", "d-1")
        status = next(c for c in record.calls if c.method == "Status")
        keys = [k for k, _ in status.trailing_metadata]
        assert "grpc-status-details-bin" in keys
        assert status.code == "FailedPrecondition"
        assert status.details

    loop.run(main())


@pytest.mark.step_runner(relay=True)
def test_a_thousand_jobs_counted_exactly(loop: BackgroundLoop, sidecar: Sidecar) -> None:
    async def main() -> None:
        tally = await run_jobs(target(sidecar), 1000, concurrency=16, seed=7)
        assert tally.mismatches == []
        assert len(tally.scenarios) >= 15, "the mix must cover most rows of the table"
        await async_wait_until(
            lambda: counted(sidecar) == expected(tally), within=10, what="counters to settle"
        )
        calls = sum(tally.codes.values())
        started = sum(
            s.value
            for m in sidecar.registry.collect()
            for s in m.samples
            if s.name == "grpc_server_started_total"
        )
        handled = sum(
            s.value
            for m in sidecar.registry.collect()
            for s in m.samples
            if s.name == "grpc_server_handled_total"
        )
        assert started == handled == calls
        assert sample(sidecar, "step_runner_exporter_decode_errors_total", message="http2") == 0
        durations = sum(len(v) for v in tally.durations.values())
        histogram_count = sum(
            sample(sidecar, "step_runner_job_duration_seconds_count", result=r)
            for r in ("success", "failed", "cancelled")
        )
        assert histogram_count == durations

    loop.run(main(), timeout=120)


def test_client_deadline_reaches_the_upstream() -> None:
    seen: list[float | None] = []

    async def status(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(context.time_remaining())
        await asyncio.Event().wait()  # never answers: the deadline cancels it
        return b""

    async def main() -> None:
        async with (
            scripted_step_runner({"Status": status}) as upstream,
            running_sidecar(upstream) as sidecar,
        ):
            request = step_pb2.StatusRequest(id="dl-1")
            started = time.monotonic()
            result = await grpc_call(target(sidecar), "Status", request, deadline=1.0)
            assert result.code == "DeadlineExceeded"
            assert time.monotonic() - started >= 0.95  # not cut early
            # The upstream got the client's deadline (grpc-timeout rounds up to its
            # units, so a hair over 1 s is fine; none would be None).
            assert seen and seen[0] is not None and 0 < seen[0] <= 1.05
            failure = ("script_failure", "grpc_status", "DeadlineExceeded", "infrastructure")
            await async_wait_until(lambda: counted(sidecar)[1] == {failure: 1})

    run_async(main())


def test_client_cancel_cancels_the_upstream_call(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner, sidecar: Sidecar
) -> None:
    async def main() -> None:
        record = await run_job(
            target(sidecar), "client_cancel", "cc-1", log_bytes=1 << 20, log_chunk=1024
        )
        assert record.problems() == []
        await async_wait_until(
            lambda: step_runner.stats.cancelled["FollowLogs"] == 1,
            what="upstream FollowLogs cancelled",
        )
        await async_wait_until(lambda: counted(sidecar)[0]["cancelled"] == 1)

    loop.run(main())


def test_upstream_down_gives_unavailable_like_a_failed_dial() -> None:
    """gRPC clients wait for the server's SETTINGS before sending a call, so when
    step-runner cannot be reached no job id is ever read: the client sees UNAVAILABLE,
    nothing is counted as a job, and upstream_up says why. (Calls already read when
    step-runner's connection dies are counted: the connection_drop scenario.)"""

    async def main() -> None:
        with short_tmpdir() as d:
            async with running_sidecar(f"unix://{d}/nobody-home.sock") as sidecar:
                assert sample(sidecar, "step_runner_exporter_upstream_up") == 0
                record = await run_job(target(sidecar), "success", "down-1")
                assert record.call_labels == ("Run:Unavailable", "Close:Unavailable")
                assert counted(sidecar)[0] == {"success": 0, "failed": 0, "cancelled": 0}
                assert sample(sidecar, "step_runner_exporter_upstream_up") == 0

    run_async(main())


def test_upstream_up_follows_step_runner(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner, sidecar: Sidecar
) -> None:
    async def main() -> None:
        assert sample(sidecar, "step_runner_exporter_upstream_up") == 1
        await step_runner.stop()
        record = await run_job(target(sidecar), "success", "restart-1")
        assert record.calls[0].code == "Unavailable"
        assert sample(sidecar, "step_runner_exporter_upstream_up") == 0
        await step_runner.start()
        record = await run_job(target(sidecar), "success", "restart-2")
        assert record.problems() == []
        assert sample(sidecar, "step_runner_exporter_upstream_up") == 1

    loop.run(main())


@pytest.mark.sidecar(labels={"runner": "r-1"})
def test_metrics_endpoint_over_http(loop: BackgroundLoop, sidecar: Sidecar) -> None:
    async def main() -> None:
        await run_job(target(sidecar), "panic_run", "http-1")
        await async_wait_until(lambda: counted(sidecar)[0]["failed"] == 1)
        status, ctype, body = await asyncio.to_thread(http_get, web_url(sidecar))
        assert status == 200 and ctype.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        jobs = families["step_runner_jobs"]
        failed = [s for s in jobs.samples if s.labels.get("result") == "failed"]
        assert [(s.value, s.labels["runner"]) for s in failed] == [(1.0, "r-1")]
        assert "grpc_server_handled" in families

        status, ctype, body = await asyncio.to_thread(
            http_get, web_url(sidecar), "application/openmetrics-text; version=1.0.0"
        )
        assert status == 200 and ctype.startswith("application/openmetrics-text")
        om = {f.name: f for f in parse_om(body.decode())}
        exemplars = [
            s.exemplar for s in om["step_runner_job_failures"].samples if s.exemplar is not None
        ]
        assert [e.labels for e in exemplars] == [{"job_id": "http-1"}]
        labels = {
            s.labels["kind"]
            for s in om["step_runner_job_failures"].samples
            if s.name.endswith("_total") and s.value
        }
        assert labels == {GRPC_INTERNAL.kind}

        assert (await asyncio.to_thread(http_get, web_url(sidecar, "/-/healthy")))[0] == 200
        assert (await asyncio.to_thread(http_get, web_url(sidecar, "/-/ready")))[0] == 200
        assert (await asyncio.to_thread(http_get, web_url(sidecar, "/nope")))[0] == 404
        sidecar._stopping = True  # as during shutdown: no longer ready, still healthy
        assert (await asyncio.to_thread(http_get, web_url(sidecar, "/-/ready")))[0] == 503
        assert (await asyncio.to_thread(http_get, web_url(sidecar, "/-/healthy")))[0] == 200

    loop.run(main())


def test_running_then_close_is_unknown_failure_through_the_sidecar(
    loop: BackgroundLoop, sidecar: Sidecar
) -> None:
    async def main() -> None:
        await run_job(target(sidecar), "running_then_close", "rc-1")
        labels = (
            UNKNOWN_FAILURE.failure_reason,
            UNKNOWN_FAILURE.source,
            UNKNOWN_FAILURE.kind,
            UNKNOWN_FAILURE.category,
        )
        await async_wait_until(lambda: counted(sidecar)[1] == {labels: 1})

    loop.run(main())


_SCRAMBLE = bytes(b ^ 0x5A for b in range(256))


async def _scrambling_echo_server(path: str) -> asyncio.Server:
    """Answers every byte with a fixed function of it, so the answer does not depend
    on how the bytes were chunked on the way."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.translate(_SCRAMBLE))
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path)


def test_bytes_it_cannot_parse_are_forwarded_exactly_and_counted() -> None:
    async def main() -> None:
        with short_tmpdir() as d:
            server = await _scrambling_echo_server(f"{d}/echo.sock")
            try:
                async with running_sidecar(f"unix://{d}/echo.sock") as sidecar:
                    assert sidecar.splice is not None and sidecar.splice.listen.path
                    reader, writer = await asyncio.open_unix_connection(sidecar.splice.listen.path)
                    payload = os.urandom(3_000_000)
                    writer.write(payload)
                    writer.write_eof()  # the half-close travels through to the server
                    received = await reader.read()  # until the server's close comes back
                    writer.close()
                    assert received == payload.translate(_SCRAMBLE)
                    await async_wait_until(
                        lambda: (
                            sample(
                                sidecar, "step_runner_exporter_decode_errors_total", message="http2"
                            )
                            == 1
                        )
                    )
            finally:
                server.close()
                await server.wait_closed()

    run_async(main())


def test_unix_socket_mode_stale_and_refusals() -> None:
    with short_tmpdir() as d:
        path = f"{d}/s.sock"
        sock = bind_unix_socket(path, 0o660, None, None)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        sock.close()  # leaves a stale socket file: nobody listens any more
        sock = bind_unix_socket(path, 0o600, None, None)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        with pytest.raises(ListenError, match="another process is listening"):
            bind_unix_socket(path, 0o660, None, None)
        sock.close()

        regular = f"{d}/file"
        with open(regular, "w") as f:
            f.write("keep me")
        with pytest.raises(ListenError, match="not a socket"):
            bind_unix_socket(regular, 0o660, None, None)
        with open(regular) as f:
            assert f.read() == "keep me"

        link = f"{d}/link.sock"
        os.symlink(regular, link)
        with pytest.raises(ListenError, match="symlink"):
            bind_unix_socket(link, 0o660, None, None)
        assert os.path.islink(link)
        with open(regular) as f:
            assert f.read() == "keep me"
