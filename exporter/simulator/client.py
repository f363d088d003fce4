"""A simulated GitLab Runner: drives jobs through the StepRunner calls the way Runner
does and keeps its own tally of what each job's outcome must be.

Per job, on its own channel (Runner opens one connection per job): Run, then (only for
cancel_rpc) Cancel, then FollowLogs until EOF reading every byte, then Status, polled
again while the job is running, and Close always, last. It stops at the first call that
fails (a failed Cancel is only logged, as by Runner) and still sends Close.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from exporter.methods import service_name
from exporter.proto import step_pb2

from .scenarios import (
    DEFAULT_DURATION_MS,
    DEFAULT_LOG_BYTES,
    DEFAULT_LOG_CHUNK,
    DEFAULT_MIX,
    JOB_HEADER,
    MAX_STATUS_POLLS,
    SCENARIOS,
    STATE_RUNNING,
    UNARY_TIMEOUT,
    Expected,
    FailureLabels,
    Scenario,
    go_code_name,
    job_env,
    log_content,
    run_request,
)

Metadata = tuple[tuple[str, str | bytes], ...]

RESPONSE_TYPES: dict[str, type[Message]] = {
    "Run": step_pb2.RunResponse,
    "FollowLogs": step_pb2.FollowLogsResponse,
    "Status": step_pb2.StatusResponse,
    "Close": step_pb2.CloseResponse,
    "Cancel": step_pb2.CancelResponse,
}
STREAMING_METHODS = frozenset({"FollowLogs"})

# Without a local pool grpc-core shares one connection between channels to the same
# target, and a job's dropped connection would take other jobs' calls with it.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.use_local_subchannel_pool", 1),)

_job_numbers = itertools.count(1)


@dataclass(frozen=True, slots=True)
class CallResult:
    method: str
    code: str  # the code a Go client reports, e.g. Internal for an undecodable response
    grpc_code: str  # the code the gRPC status carried
    details: str
    responses: tuple[bytes, ...]
    initial_metadata: Metadata
    trailing_metadata: Metadata
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def label(self) -> str:
        return f"{self.method}:{self.code}"


def _metadata(value: Any) -> Metadata:
    return tuple((str(key), val) for key, val in (value or ()))


def _code_name(code: Any) -> str:
    return go_code_name(int(code.value[0]))


async def invoke(
    channel: grpc.aio.Channel,
    method: str,
    request: Message | bytes,
    *,
    package: str = "proto",
    metadata: Metadata = (),
    deadline: float | None = None,
    streaming: bool | None = None,
    cancel_after: int | None = None,
) -> CallResult:
    """One call of any StepRunner method, unary or server-streaming alike; never raises
    for a gRPC error. `deadline` is the call's timeout in seconds (grpc-timeout);
    `cancel_after` cancels a stream after that many messages."""
    path = method if method.startswith("/") else f"/{service_name(package)}/{method}"
    name = path.rpartition("/")[2]
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    if streaming is None:
        streaming = name in STREAMING_METHODS
    started = time.monotonic()
    responses: list[bytes] = []
    if streaming:
        call = channel.unary_stream(path)(payload, metadata=metadata, timeout=deadline)
        stream = call.__aiter__()
        with contextlib.suppress(grpc.aio.AioRpcError):  # the call's status says it all
            async for response in stream:
                responses.append(response)
                if cancel_after is not None and len(responses) >= cancel_after:
                    call.cancel()
                    break
        # grpc.aio's response generator and its call refer to each other. Left suspended
        # (the break above), they wait for the garbage collector, and until then the
        # call holds its connection open although the channel has been closed.
        await stream.aclose()
    else:
        call = channel.unary_unary(path)(payload, metadata=metadata, timeout=deadline)
        with contextlib.suppress(grpc.aio.AioRpcError):
            responses.append(await call)
    grpc_code = _code_name(await call.code())
    details = await call.details() or ""
    code = grpc_code
    response_type = RESPONSE_TYPES.get(name) if path.startswith(f"/{package}.") else None
    if response_type is not None and not _decodes(response_type, responses):
        # A Go client fails such a call INTERNAL: "failed to unmarshal" the response.
        code, details = "Internal", "grpc: failed to unmarshal the received message"
    return CallResult(
        method=name,
        code=code,
        grpc_code=grpc_code,
        details=details,
        responses=tuple(responses),
        initial_metadata=_metadata(await call.initial_metadata()),
        trailing_metadata=_metadata(await call.trailing_metadata()),
        seconds=time.monotonic() - started,
    )


def _decodes(response_type: type[Message], responses: Sequence[bytes]) -> bool:
    try:
        for response in responses:
            response_type.FromString(response)
    except DecodeError:
        return False
    return True


def open_channel(target: str, *, compression: grpc.Compression | None = None) -> Any:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, compression=compression)


async def call_once(
    target: str, method: str, request: Message | bytes, **kwargs: Any
) -> CallResult:
    """`invoke` on a channel of its own (opened and closed around the call)."""
    async with open_channel(target) as channel:
        return await invoke(channel, method, request, **kwargs)


@dataclass(slots=True)
class JobRecord:
    job_id: str
    scenario: Scenario
    calls: list[CallResult] = field(default_factory=list)
    log: bytearray = field(default_factory=bytearray)
    log_messages: int = 0
    expected_log_bytes: int = DEFAULT_LOG_BYTES
    status_state: int | None = None  # of the last Status entry for this job
    status_error_kind: int | None = None
    duration_seconds: float | None = None  # end - start of the deciding Status
    wall_seconds: float = 0.0

    @property
    def expected(self) -> Expected:
        return self.scenario.expected

    @property
    def call_labels(self) -> tuple[str, ...]:
        return tuple(call.label for call in self.calls)

    @property
    def log_ok(self) -> bool:
        """Every byte received is the log's byte at that offset, and a FollowLogs that
        ended OK delivered the whole log."""
        expected = log_content(self.expected_log_bytes)
        if bytes(self.log) != expected[: len(self.log)]:
            return False
        follow_ok = any(c.method == "FollowLogs" and c.ok for c in self.calls)
        return len(self.log) == len(expected) or not follow_ok

    def problems(self) -> list[str]:
        """Where what the client saw differs from what its scenario says."""
        found = []
        if self.call_labels not in (self.scenario.calls, *self.scenario.also_calls):
            found.append(f"calls {self.call_labels} != expected {self.scenario.calls}")
        if not self.log_ok:
            found.append("log bytes differ from the deterministic log")
        if self.scenario.decided_by_status:
            seen = (self.status_state, self.status_error_kind)
            want = (self.scenario.state, self.scenario.error_kind)
            if seen != want:
                found.append(f"terminal Status (state, kind) {seen} != {want}")
        return found

    @property
    def matches(self) -> bool:
        return not self.problems()


@dataclass
class Tally:
    """Expected outcomes per SPEC section 3 of every job run, plus what was seen."""

    results: Counter[str] = field(default_factory=Counter)
    failures: Counter[FailureLabels] = field(default_factory=Counter)
    durations: dict[str, list[float]] = field(default_factory=dict)  # per result
    codes: Counter[str] = field(default_factory=Counter)  # "Method:Code" seen
    scenarios: Counter[str] = field(default_factory=Counter)
    jobs: list[JobRecord] = field(default_factory=list)

    def add(self, record: JobRecord) -> None:
        expected = record.expected
        self.jobs.append(record)
        self.scenarios[record.scenario.name] += 1
        self.results[expected.result] += 1
        if expected.failure is not None:
            self.failures[expected.failure] += 1
        if record.duration_seconds is not None:
            self.durations.setdefault(expected.result, []).append(record.duration_seconds)
        self.codes.update(record.call_labels)

    @property
    def mismatches(self) -> list[JobRecord]:
        return [job for job in self.jobs if not job.matches]

    def summary(self) -> str:
        parts = [f"{result}={count}" for result, count in sorted(self.results.items())]
        return f"jobs={len(self.jobs)} " + " ".join(parts) + f" mismatches={len(self.mismatches)}"


def _status_entry(response: bytes, job_id: str) -> step_pb2.Status | None:
    for entry in step_pb2.StatusResponse.FromString(response).jobs:
        if entry.id == job_id:
            return entry
    return None


async def run_job(
    target: str,
    scenario: str | Scenario,
    job_id: str,
    *,
    log_bytes: int = DEFAULT_LOG_BYTES,
    log_chunk: int = DEFAULT_LOG_CHUNK,
    duration_ms: int = DEFAULT_DURATION_MS,
    package: str = "proto",
    compression: grpc.Compression | None = None,
    metadata: Metadata = (),
    max_status_polls: int = MAX_STATUS_POLLS,
    poll_interval: float = 0.01,
) -> JobRecord:
    """Drive one job through `target` (a step-runner or the sidecar) the Runner way."""
    if isinstance(scenario, str):
        scenario = SCENARIOS[scenario]
    record = JobRecord(job_id, scenario, expected_log_bytes=log_bytes)
    started = time.monotonic()
    request_metadata: Metadata = ((JOB_HEADER, job_id), *metadata)
    async with open_channel(target, compression=compression) as channel:

        async def call(method: str, request: Message, **kwargs: Any) -> CallResult:
            result = await invoke(
                channel, method, request, package=package, metadata=request_metadata, **kwargs
            )
            record.calls.append(result)
            if _connection_lost(result):
                await _until_channel_notices(channel)
            return result

        # A scenario's short deadline applies to Status only: on the other calls it
        # would fire by chance on a loaded machine and make the job's outcome random.
        unary_timeout = UNARY_TIMEOUT
        env = job_env(
            scenario, job_id, log_bytes=log_bytes, log_chunk=log_chunk, duration_ms=duration_ms
        )
        if (await call("Run", run_request(job_id, env), deadline=unary_timeout)).ok:
            if scenario.cancel_rpc:
                await call("Cancel", step_pb2.CancelRequest(id=job_id), deadline=unary_timeout)
            follow = await call(
                "FollowLogs",
                step_pb2.FollowLogsRequest(id=job_id, offset=0),
                cancel_after=1 if scenario.cancel_follow else None,
            )
            for response in follow.responses:
                record.log += step_pb2.FollowLogsResponse.FromString(response).data
            record.log_messages = len(follow.responses)
            if follow.ok:
                status_timeout = scenario.call_timeout or UNARY_TIMEOUT
                await _poll_status(call, record, status_timeout, max_status_polls, poll_interval)
        await call("Close", step_pb2.CloseRequest(id=job_id), deadline=unary_timeout)
    record.wall_seconds = time.monotonic() - started
    return record


def _connection_lost(result: CallResult) -> bool:
    """A call the end of its connection failed: no headers, no trailers, UNAVAILABLE.
    (A status step-runner sends always comes with its trailers.)"""
    return (
        result.grpc_code == "Unavailable"
        and not result.initial_metadata
        and not result.trailing_metadata
    )


# Far longer than grpc-core takes to notice a closed connection; only a bound.
LOST_CONNECTION_NOTICE = 5.0


async def _until_channel_notices(channel: Any) -> None:
    """Wait until the channel has left READY after its connection was lost.

    grpc-core fails the calls of a closed connection before its load balancer learns
    that the connection is gone; a call started in between (the job's Close) is put on
    the dead connection and fails UNAVAILABLE without ever reaching the sidecar or
    step-runner, although the client made it. grpc-go, Runner's library, retries such
    a call transparently on a new connection; waiting here gives the same result: the
    next call reconnects.
    """
    ready = grpc.ChannelConnectivity.READY
    if channel.get_state() == ready:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.wait_for_state_change(ready), LOST_CONNECTION_NOTICE)


async def _poll_status(
    call: Callable[..., Any],
    record: JobRecord,
    deadline: float,
    max_polls: int,
    interval: float,
) -> None:
    for poll in range(max_polls):
        if poll:
            await asyncio.sleep(interval)  # Runner's polling pause, not a test wait
        result: CallResult = await call(
            "Status", step_pb2.StatusRequest(id=record.job_id), deadline=deadline
        )
        if not result.ok:
            return
        entry = _status_entry(result.responses[0], record.job_id)
        if entry is None:
            return
        record.status_state = entry.status
        record.status_error_kind = entry.error.kind if entry.HasField("error") else None
        running = entry.status in (STATE_RUNNING, step_pb2.StepResult.unspecified)
        if running and record.status_error_kind is None:
            continue
        if entry.HasField("start_time") and entry.HasField("end_time"):
            delta = entry.end_time.ToNanoseconds() - entry.start_time.ToNanoseconds()
            record.duration_seconds = delta / 1e9
        return


@dataclass(frozen=True, slots=True)
class PlannedJob:
    job_id: str
    scenario: str
    duration_ms: int


def plan_job(rng: random.Random, mix: Mapping[str, float]) -> PlannedJob:
    """A job id (GitLab's numbers; some nested runs as `<id>-run`), a scenario from the
    weighted mix, and a job duration (log-normal around 30 s, as CI jobs roughly are)."""
    number = next(_job_numbers)
    job_id = f"{number}-run" if rng.random() < 0.1 else str(number)
    (scenario,) = rng.choices(list(mix), weights=list(mix.values()))
    duration_ms = min(int(rng.lognormvariate(math.log(30_000), 1.0)), 6 * 3600 * 1000)
    return PlannedJob(job_id, scenario, duration_ms)


async def run_jobs(
    target: str,
    n: int,
    *,
    concurrency: int = 16,
    mix: Mapping[str, float] | None = None,
    seed: int = 0,
    on_job: Callable[[JobRecord], None] | None = None,
    **job_options: Any,
) -> Tally:
    """Run `n` jobs, `concurrency` at a time, scenarios drawn from `mix` (DEFAULT_MIX).
    `job_options` go to run_job (log_bytes, log_chunk, package, compression, ...)."""
    rng = random.Random(seed)
    plan = iter([plan_job(rng, mix or DEFAULT_MIX) for _ in range(n)])
    tally = Tally()

    async def worker() -> None:
        for job in plan:
            record = await run_job(
                target, job.scenario, job.job_id, duration_ms=job.duration_ms, **job_options
            )
            tally.add(record)
            if on_job is not None:
                on_job(record)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
    return tally


async def run_forever(
    target: str,
    stop: asyncio.Event,
    *,
    concurrency: int = 4,
    mix: Mapping[str, float] | None = None,
    seed: int = 0,
    pause: float = 0.0,
    on_job: Callable[[JobRecord], None] | None = None,
    **job_options: Any,
) -> Tally:
    """Keep running jobs until `stop` is set (the demo); each worker waits `pause`
    seconds between its jobs. Returns the tally of every job that finished."""
    rng = random.Random(seed)
    tally = Tally()

    async def worker() -> None:
        while not stop.is_set():
            job = plan_job(rng, mix or DEFAULT_MIX)
            record = await run_job(
                target, job.scenario, job.job_id, duration_ms=job.duration_ms, **job_options
            )
            tally.add(record)
            if on_job is not None:
                on_job(record)
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return tally
