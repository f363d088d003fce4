"""A simulated GitLab step-runner: a real grpc.aio StepRunner server whose answers for
each job are scripted by `RunRequest.env["SCENARIO"]` (see scenarios.py).

Besides step-runner's own behaviour (job state keyed by id, a panic-recovery
interceptor that turns a handler's exception into INTERNAL "panic in <method>"), it
adds test metadata so tests can compare what passes through the sidecar with what
the server sent: the `x-simstep-method` response header (the "header probe", which
also keeps every response out of the trailers-only form), an `x-simstep-echo`
trailer with the request's job id, and every `x-echo-*` request entry echoed back as a
trailer. Its public address is a DropRelay (faults.py) unless `relay=False`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from exporter.methods import service_name
from exporter.proto import step_pb2, step_pb2_grpc

from .faults import DropRelay, Endpoint
from .scenarios import (
    DEFAULT_DURATION_MS,
    DEFAULT_LOG_BYTES,
    DEFAULT_LOG_CHUNK,
    DROP_MARKER,
    ECHO_PREFIX,
    ECHO_TRAILER,
    ENV_DURATION_MS,
    ENV_LOG_BYTES,
    ENV_LOG_CHUNK,
    ENV_SCENARIO,
    JOB_HEADER,
    METHOD_HEADER,
    SCENARIOS,
    STATE_CANCELLED,
    STATE_RUNNING,
    Scenario,
    log_content,
)

Metadata = tuple[tuple[str, str | bytes], ...]
MAX_LOG_CHUNK = 4 * 1024 * 1024 - 64  # under gRPC's default 4 MiB message limit


class SimulatedPanicError(RuntimeError):
    """What a scripted handler raises; the panic-recovery interceptor turns it into INTERNAL."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _google_rpc_status(code: int, message: str) -> bytes:
    # google.rpc.Status{code, message, details: [Any(google.rpc.ErrorInfo)]}, encoded by
    # hand because googleapis-common-protos is not a dependency.
    error_info = _len_field(1, b"SIMULATED_FAILURE") + _len_field(2, b"step-runner.simulator")
    detail = _len_field(1, b"type.googleapis.com/google.rpc.ErrorInfo") + _len_field(2, error_info)
    return _varint(1 << 3) + _varint(code) + _len_field(2, message.encode()) + _len_field(3, detail)


DETAILS_MESSAGE = "simulated failure with details"
# The trailers the `details` scenario adds to its echo trailer, byte for byte.
DETAILS_TRAILERS: Metadata = (
    ("grpc-status-details-bin", _google_rpc_status(9, DETAILS_MESSAGE)),
    ("x-simstep-detail", "precondition: simulated"),
    ("x-simstep-blob-bin", bytes(range(256))),
)


@dataclass
class SimStats:
    """What the simulated step-runner saw, per method name (Run, FollowLogs, ...)."""

    calls: Counter[str] = field(default_factory=Counter)
    cancelled: Counter[str] = field(default_factory=Counter)  # ended by the client/deadline
    panics: Counter[str] = field(default_factory=Counter)
    starts: int = 0


@dataclass
class _Job:
    id: str
    scenario: Scenario
    log_bytes: int
    log_chunk: int
    start_ns: int
    duration_ms: int
    polls: int = 0
    cancelled: bool = False


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


async def _forever() -> NoReturn:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _env_int(env: Any, key: str, default: int) -> int:
    value = env.get(key)
    return default if value is None else int(value)


class StepRunnerService(step_pb2_grpc.StepRunnerServicer):
    """The scripted handlers. Status may return raw bytes (see _serialize)."""

    def __init__(self) -> None:
        self.jobs: dict[str, _Job] = {}

    async def _job(self, job_id: str, context: grpc.aio.ServicerContext) -> _Job:
        job = self.jobs.get(job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {job_id!r} not found")
        assert job is not None
        return job

    async def Run(  # noqa: N802 (gRPC method name)
        self, request: step_pb2.RunRequest, context: grpc.aio.ServicerContext
    ) -> step_pb2.RunResponse:
        scenario = SCENARIOS.get(request.env.get(ENV_SCENARIO, "success"))
        if scenario is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown SCENARIO")
        assert scenario is not None
        if scenario.hang == "Run":
            await _forever()
        if scenario.panic == "Run":
            raise SimulatedPanicError("Run")
        if request.id in self.jobs:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"job {request.id!r} exists")
        try:
            log_bytes = _env_int(request.env, ENV_LOG_BYTES, DEFAULT_LOG_BYTES)
            log_chunk = _env_int(request.env, ENV_LOG_CHUNK, DEFAULT_LOG_CHUNK)
            duration_ms = _env_int(request.env, ENV_DURATION_MS, DEFAULT_DURATION_MS)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "env values must be integers")
        if log_bytes < 0 or not 0 < log_chunk <= MAX_LOG_CHUNK or duration_ms < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "env values out of range")
        self.jobs[request.id] = _Job(
            request.id, scenario, log_bytes, log_chunk, time.time_ns(), duration_ms
        )
        return step_pb2.RunResponse()

    async def FollowLogs(  # noqa: N802
        self, request: step_pb2.FollowLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[step_pb2.FollowLogsResponse]:
        job = await self._job(request.id, context)
        scenario = job.scenario
        if scenario.hang == "FollowLogs":
            await _forever()
        log = log_content(job.log_bytes)
        for start in range(max(0, request.offset), len(log), job.log_chunk):
            yield step_pb2.FollowLogsResponse(data=log[start : start + job.log_chunk])
            await self._after_first_message(scenario)
        # An empty log still panics or stalls, just without a message first.
        await self._after_first_message(scenario)

    @staticmethod
    async def _after_first_message(scenario: Scenario) -> None:
        if scenario.panic == "FollowLogs":
            raise SimulatedPanicError("FollowLogs")
        if scenario.follow_stall:
            await _forever()

    async def Status(  # noqa: N802
        self, request: step_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> step_pb2.StatusResponse | bytes:
        if not request.id:
            entries = [self._entry(job, advance=False) for job in self.jobs.values()]
            return step_pb2.StatusResponse(jobs=entries)
        job = await self._job(request.id, context)
        scenario = job.scenario
        if scenario.hang == "Status":
            await _forever()
        if scenario.panic == "Status":
            raise SimulatedPanicError("Status")
        if scenario.status_abort is not None:
            trailers: Metadata = tuple(context.trailing_metadata() or ())
            if scenario.status_details:
                trailers += DETAILS_TRAILERS
            code = grpc.StatusCode[scenario.status_abort]
            message = DETAILS_MESSAGE if scenario.status_details else f"simulated {code.name}"
            await context.abort(code, message, trailing_metadata=trailers)
        if scenario.status_raw is not None:
            return scenario.status_raw
        entry = self._entry(job, advance=True)
        if scenario.status_extra_field and entry.status != STATE_RUNNING:
            # Field 99 is in no schema: the sidecar has to count it as drift.
            drifted = entry.SerializeToString() + _len_field(99, b"schema drift")
            return _len_field(1, drifted)
        return step_pb2.StatusResponse(jobs=[entry])

    @staticmethod
    def _entry(job: _Job, *, advance: bool) -> step_pb2.Status:
        scenario = job.scenario
        entry = step_pb2.Status(id=job.id, start_time=_timestamp(job.start_ns))
        polls = job.polls
        if advance:
            job.polls += 1
        if job.cancelled:
            entry.status = STATE_CANCELLED
            entry.message = "cancelled"
        elif scenario.running_polls < 0 or polls < scenario.running_polls:
            entry.status = STATE_RUNNING
            entry.message = "running"
            return entry
        else:
            entry.status = cast("step_pb2.StepResult.Status", scenario.state)
            entry.message = scenario.name
            if scenario.error_kind is not None:
                entry.error.kind = cast("step_pb2.StatusError.ErrorKind", scenario.error_kind)
                entry.error.message = f"simulated {scenario.name}"
        entry.end_time.CopyFrom(_timestamp(job.start_ns + job.duration_ms * 1_000_000))
        return entry

    async def Close(  # noqa: N802
        self, request: step_pb2.CloseRequest, context: grpc.aio.ServicerContext
    ) -> step_pb2.CloseResponse:
        await self._job(request.id, context)
        del self.jobs[request.id]
        return step_pb2.CloseResponse()

    async def Cancel(  # noqa: N802
        self, request: step_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> step_pb2.CancelResponse:
        job = await self._job(request.id, context)
        job.cancelled = True
        return step_pb2.CancelResponse()


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


def _handlers(service: StepRunnerService) -> dict[str, grpc.RpcMethodHandler]:
    def unary(behaviour: Any, request_type: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=request_type.FromString, response_serializer=_serialize
        )

    return {
        "Run": unary(service.Run, step_pb2.RunRequest),
        "FollowLogs": grpc.unary_stream_rpc_method_handler(
            service.FollowLogs,
            request_deserializer=step_pb2.FollowLogsRequest.FromString,
            response_serializer=_serialize,
        ),
        "Status": unary(service.Status, step_pb2.StatusRequest),
        "Close": unary(service.Close, step_pb2.CloseRequest),
        "Cancel": unary(service.Cancel, step_pb2.CancelRequest),
    }


Guard = Callable[[grpc.aio.ServicerContext, str], AbstractAsyncContextManager[None]]


def _wrap(handler: Any, guard: Guard, method: str) -> Any:
    """The same handler with its behaviour run inside `guard(context, method)`."""
    if handler is None:
        return None
    if handler.unary_unary is not None:
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context, method):
                return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with guard(context, method):
                async for response in inner_stream(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class PanicRecoveryInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """step-runner's recovery: a handler that raises ends INTERNAL "panic in <method>"."""

    def __init__(self, stats: SimStats) -> None:
        self._stats = stats

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        return _wrap(await continuation(details), self._recover, details.method)

    @asynccontextmanager
    async def _recover(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception:
            self._stats.panics[method.rpartition("/")[2]] += 1
            await context.abort(grpc.StatusCode.INTERNAL, f"panic in {method}")


class ProbeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Test metadata and call counting (not step-runner behaviour)."""

    def __init__(self, stats: SimStats, *, header_probe: bool) -> None:
        self._stats = stats
        self._header_probe = header_probe

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        return _wrap(await continuation(details), self._probe, details.method)

    @asynccontextmanager
    async def _probe(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        name = method.rpartition("/")[2]
        self._stats.calls[name] += 1
        trailers: list[tuple[str, str | bytes]] = []
        for key, value in context.invocation_metadata() or ():
            if key == JOB_HEADER:
                trailers.insert(0, (ECHO_TRAILER, value))
            elif key.startswith(ECHO_PREFIX):
                trailers.append((key, value))
        context.set_trailing_metadata(tuple(trailers))
        if self._header_probe:
            await context.send_initial_metadata(((METHOD_HEADER, method),))
        try:
            yield
        except asyncio.CancelledError:
            self._stats.cancelled[name] += 1
            raise


class SimulatedStepRunner:
    """`async with SimulatedStepRunner("unix:///abs/x.sock") as sim:` or "127.0.0.1:0".

    `stop()` kills it (connections aborted, calls cancelled, jobs lost, as when the
    process dies) and `start()` brings it back on the same address.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        relay: bool = True,
        header_probe: bool = True,
        package: str = "proto",
    ) -> None:
        self._public = Endpoint.parse(address)
        self._use_relay = relay
        self._header_probe = header_probe
        self._service_name = service_name(package)
        self._workdir: str | None = None
        self._server: grpc.aio.Server | None = None
        self._relay: DropRelay | None = None
        self._service = StepRunnerService()
        self.stats = SimStats()

    @property
    def address(self) -> str:
        """The target for grpc.aio.insecure_channel."""
        return str(self._public)

    @property
    def listen_address(self) -> str:
        """The same address in the exporter's ADDR syntax (unix:///abs or HOST:PORT)."""
        return str(self._public)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def jobs(self) -> dict[str, _Job]:
        """Jobs that ran and were not closed yet."""
        return self._service.jobs

    @property
    def connections(self) -> int:
        """Connections the relay accepted, over all restarts (0 without the relay)."""
        return self._relay.connections if self._relay is not None else 0

    @property
    def drops(self) -> int:
        """Connections the relay cut for the connection_drop scenario, over all restarts."""
        return self._relay.drops if self._relay is not None else 0

    async def start(self) -> None:
        if self._server is not None:
            return
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="simsr-", dir="/tmp")
        self._service = StepRunnerService()
        server = grpc.aio.server(
            interceptors=(
                ProbeInterceptor(self.stats, header_probe=self._header_probe),
                PanicRecoveryInterceptor(self.stats),
            ),
            options=(("grpc.so_reuseport", 0),),
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self._service_name, _handlers(self._service)),)
        )
        internal = Endpoint(path=os.path.join(self._workdir, "grpc.sock"))
        bind = internal if self._use_relay else self._public
        if bind.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bind.path)
        port = server.add_insecure_port(str(bind))
        if bind.path is None:
            self._public = self._public.with_port(port)  # keep the port for a restart
        await server.start()
        self._server = server
        self.stats.starts += 1
        if self._use_relay:
            if self._relay is None:
                self._relay = DropRelay(self._public, internal, DROP_MARKER.encode())
            try:
                self._public = await self._relay.start()
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        """Die: abort every connection, cancel every call, forget every job."""
        if self._relay is not None:
            await self._relay.stop()
        server, self._server = self._server, None
        if server is not None:
            await server.stop(None)
        self._service.jobs.clear()

    async def close(self) -> None:
        await self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    async def __aenter__(self) -> SimulatedStepRunner:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
