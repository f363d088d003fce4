"""The simulated step-runner and the simulated GitLab Runner, against each other
directly (no sidecar): every scenario produces the calls and codes its expectation
says, the tally stays consistent under concurrency, and the faults are real."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Iterator

import pytest

from exporter import classifier
from exporter.proto import step_pb2
from exporter.simulator import SCENARIOS, SimulatedStepRunner, log_content, run_job, run_jobs
from exporter.simulator.client import run_forever
from exporter.simulator.scenarios import (
    ECHO_TRAILER,
    GO_CODE_NAMES,
    JOB_HEADER,
    METHOD_HEADER,
    job_env,
    run_request,
)
from exporter.simulator.server import DETAILS_TRAILERS

from .harness import (
    BackgroundLoop,
    Transport,
    async_wait_until,
    grpc_call,
    run_async,
    simulated_step_runner,
    simulated_step_runner_thread,
    wait_until,
)

pytestmark = pytest.mark.integration

CODE_NUMBERS = {name: number for number, name in GO_CODE_NAMES.items()}


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[SimulatedStepRunner]:
    # One simulator on a background loop for the per-scenario tests: each test's client
    # runs on its own loop, as a test driving a separate sidecar process would.
    with simulated_step_runner_thread() as (sim, _loop):
        yield sim


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_produces_its_expected_calls(shared_sim: SimulatedStepRunner, name: str) -> None:
    scenario = SCENARIOS[name]
    panics_before = sum(shared_sim.stats.panics.values())
    record = run_async(run_job(shared_sim.address, name, f"scn-{name}"))

    assert record.call_labels in (scenario.calls, *scenario.also_calls)
    assert record.problems() == []
    assert record.calls[-1].method == "Close"
    # SPEC section 3: a job decided by a failed call is labelled with that call's code.
    failed = [call for call in record.calls if not call.ok]
    failure = scenario.expected.failure
    if failure is not None and failure[1] in ("grpc_internal", "grpc_status"):
        assert failed[0].code == failure[2]
    if scenario.decided_by_status:
        assert record.duration_seconds == pytest.approx(1.5)
    else:
        assert record.duration_seconds is None
    if scenario.panic is not None:
        assert failed[0].details == f"panic in /proto.StepRunner/{scenario.panic}"
        assert sum(shared_sim.stats.panics.values()) == panics_before + 1
    assert f"scn-{name}" not in shared_sim.jobs  # Close always ran last


def _classifier_view(name: str) -> classifier.Outcome | None:
    """What exporter.classifier makes of the observation that decides the scenario."""
    scenario = SCENARIOS[name]
    if scenario.decided_by_status:
        return classifier.classify(classifier.StatusSeen(scenario.state, scenario.error_kind))
    if scenario.status_raw is not None:
        return classifier.classify(classifier.ResponseUndecodable())
    if scenario.running_polls < 0:
        return classifier.classify(classifier.ClosedWhileRunning())
    first_failure = next(call for call in scenario.calls if not call.endswith(":OK"))
    code = CODE_NUMBERS[first_failure.partition(":")[2]]
    return classifier.classify(classifier.CallFailed(code))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_expectations_agree_with_the_classifier(name: str) -> None:
    # The scenario table and exporter.classifier are two independent writings of SPEC
    # section 3; a disagreement means one of them misread it.
    outcome = _classifier_view(name)
    assert outcome is not None
    expected = SCENARIOS[name].expected
    assert outcome.result == expected.result
    labels = None if outcome.failure is None else tuple(outcome.failure.labels().values())
    assert labels == expected.failure


def test_two_hundred_jobs_default_mix(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner
) -> None:
    async def scenario() -> None:
        tally = await run_jobs(step_runner.address, 200, concurrency=16, seed=7)
        assert tally.mismatches == []
        assert len(tally.jobs) == 200
        assert sum(tally.results.values()) == 200
        assert tally.results["failed"] == sum(tally.failures.values())
        assert tally.results["success"] > 100
        assert len(tally.scenarios) >= 8
        ids = [job.job_id for job in tally.jobs]
        assert len(set(ids)) == 200
        assert any(job_id.endswith("-run") for job_id in ids)
        decided_by_status = sum(job.scenario.decided_by_status for job in tally.jobs)
        assert sum(len(d) for d in tally.durations.values()) == decided_by_status
        # The server saw every call the client made, except the Runs the relay cut.
        sent = Counter(label.partition(":")[0] for label in tally.codes.elements())
        sent["Run"] -= tally.scenarios["connection_drop"]
        assert step_runner.stats.calls == sent
        assert step_runner.drops == tally.scenarios["connection_drop"]
        assert step_runner.jobs == {}

    loop.run(scenario(), timeout=30)


def test_connection_drop_is_unavailable_and_only_for_that_job() -> None:
    async def scenario() -> None:
        async with simulated_step_runner(transport="tcp") as sim:
            drop, other = await asyncio.gather(
                run_job(sim.address, "connection_drop", "drop-1"),
                run_job(sim.address, "success", "drop-2", log_bytes=256 * 1024, log_chunk=1024),
            )
            assert [c.label for c in drop.calls] == ["Run:Unavailable", "Close:NotFound"]
            assert other.problems() == []
            assert sim.drops == 1

        # Without the relay nothing cuts the connection, and the record says so.
        async with simulated_step_runner(relay=False) as sim:
            direct = await run_job(sim.address, "connection_drop", "drop-3")
            assert direct.calls[0].label == "Run:OK"
            assert not direct.matches

    run_async(scenario())


def test_hang_ends_deadline_exceeded_and_the_server_sees_the_cancel(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner
) -> None:
    async def scenario() -> None:
        run = await grpc_call(
            step_runner.address, "Run", run_request("hang-1", _env("hang_status"))
        )
        assert run.ok
        status = await grpc_call(
            step_runner.address, "Status", step_pb2.StatusRequest(id="hang-1"), deadline=0.1
        )
        assert status.code == "DeadlineExceeded"
        await async_wait_until(lambda: step_runner.stats.cancelled["Status"] == 1, what="cancel")

        record = await run_job(step_runner.address, "client_cancel", "hang-2")
        assert record.log == log_content(4096)
        await async_wait_until(
            lambda: step_runner.stats.cancelled["FollowLogs"] == 1, what="cancel"
        )

    loop.run(scenario())


def _env(name: str, **overrides: int) -> dict[str, str]:
    return job_env(SCENARIOS[name], "x", **overrides)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_restart_on_the_same_address(transport: Transport) -> None:
    with simulated_step_runner_thread(transport) as (sim, loop):
        address = sim.address
        assert run_async(run_job(address, "success", f"rs-{transport}-1")).matches
        run_async(grpc_call(address, "Run", run_request(f"rs-{transport}-2", _env("success"))))

        loop.run(sim.stop())
        down = run_async(grpc_call(address, "Status", step_pb2.StatusRequest(id="x")))
        assert down.code == "Unavailable"

        loop.run(sim.start())
        assert sim.address == address
        assert run_async(run_job(address, "success", f"rs-{transport}-3")).matches
        # A restarted step-runner has forgotten its jobs.
        lost = run_async(grpc_call(address, "Close", step_pb2.CloseRequest(id=f"rs-{transport}-2")))
        assert lost.code == "NotFound"
        wait_until(lambda: sim.stats.starts == 2, what="second start")


def test_metadata_echo_and_error_details_in_trailers() -> None:
    async def scenario() -> None:
        extra = (("x-echo-note", "hello"), ("x-echo-blob-bin", b"\x00\xff\x01"))
        async with simulated_step_runner() as sim:
            record = await run_job(sim.address, "details", "md-1", metadata=extra)
        status = record.calls[2]
        assert status.label == "Status:FailedPrecondition"
        assert status.trailing_metadata == ((ECHO_TRAILER, "md-1"), *extra, *DETAILS_TRAILERS)
        for call in record.calls:
            assert (METHOD_HEADER, f"/proto.StepRunner/{call.method}") in call.initial_metadata
            assert call.trailing_metadata[0] == (ECHO_TRAILER, "md-1")

        async with simulated_step_runner(header_probe=False) as sim:
            bare = await grpc_call(
                sim.address,
                "Run",
                run_request("md-2", _env("success")),
                metadata=((JOB_HEADER, "md-2"),),
            )
        assert bare.ok
        assert not any(key == METHOD_HEADER for key, _ in bare.initial_metadata)
        assert bare.trailing_metadata == ((ECHO_TRAILER, "md-2"),)

    run_async(scenario())


def test_log_is_byte_exact_at_any_size_chunk_and_offset(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner
) -> None:
    size, chunk = 1024 * 1024 + 13, 4096

    async def scenario() -> None:
        record = await run_job(
            step_runner.address, "stream", "log-1", log_bytes=size, log_chunk=chunk
        )
        assert record.problems() == []
        assert bytes(record.log) == log_content(size)
        assert record.log_messages == math.ceil(size / chunk)

        env = _env("stream", log_bytes=1000, log_chunk=300)
        assert (await grpc_call(step_runner.address, "Run", run_request("log-2", env))).ok
        follow = await grpc_call(
            step_runner.address, "FollowLogs", step_pb2.FollowLogsRequest(id="log-2", offset=100)
        )
        data = b"".join(step_pb2.FollowLogsResponse.FromString(r).data for r in follow.responses)
        assert data == log_content(1000)[100:]
        assert len(follow.responses) == 3

        empty = await run_job(step_runner.address, "stream", "log-3", log_bytes=0)
        assert empty.problems() == []
        assert empty.log_messages == 0

    loop.run(scenario())


def test_list_all_status_and_bad_requests(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner
) -> None:
    async def scenario() -> None:
        for job_id, name in (("la-1", "success"), ("la-2", "step_failure")):
            assert (await grpc_call(step_runner.address, "Run", run_request(job_id, _env(name)))).ok
        listing = await grpc_call(step_runner.address, "Status", step_pb2.StatusRequest())
        jobs = step_pb2.StatusResponse.FromString(listing.responses[0]).jobs
        assert {(j.id, j.status) for j in jobs} == {
            ("la-1", step_pb2.StepResult.success),
            ("la-2", step_pb2.StepResult.failure),
        }
        duplicate = await grpc_call(
            step_runner.address, "Run", run_request("la-1", _env("success"))
        )
        assert duplicate.code == "AlreadyExists"
        bogus = run_request("la-3", {"SCENARIO": "no-such-scenario"})
        assert (await grpc_call(step_runner.address, "Run", bogus)).code == "InvalidArgument"
        missing = await grpc_call(step_runner.address, "Status", step_pb2.StatusRequest(id="la-9"))
        assert missing.code == "NotFound"

    loop.run(scenario())


def test_run_forever_stops_when_told(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner
) -> None:
    async def scenario() -> None:
        stop = asyncio.Event()

        def on_job(_record: object) -> None:
            if len(tally_seen) >= 20:
                stop.set()
            tally_seen.append(1)

        tally_seen: list[int] = []
        tally = await run_forever(step_runner.address, stop, concurrency=4, on_job=on_job)
        assert len(tally.jobs) == len(tally_seen) >= 20
        assert tally.mismatches == []

    loop.run(scenario())
