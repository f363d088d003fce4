"""Limits and hostile input through the real sidecar (issue 6, items 2 and 3).

- `limits.max_connections`: at the limit a new client connection is closed at once
  (the client sees UNAVAILABLE, as for a refused dial), never reaches step-runner, and
  is counted in step_runner_exporter_rejected_connections_total; a freed slot is
  usable again.
- `observer.max_message_bytes`: larger messages (up to 64 MiB here) are forwarded
  untouched, skipped by the observer and counted as decode errors.
- Ten thousand distinct method paths and job ids, hostile strings from jobs, and
  garbage from either side never change the set of exported series, never reach a
  label, and never break the exposition format.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import hpack
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Sidecar
from exporter.events import STEP_RUNNER_METHODS
from exporter.h2 import PREFACE
from exporter.proto import step_pb2
from exporter.simulator import SimulatedStepRunner, run_job
from tests.labels import ALLOWED, SERVICE
from tests.wire import frame, varint

from .harness import (
    BackgroundLoop,
    async_wait_until,
    grpc_call,
    run_async,
    scripted_step_runner,
    short_tmpdir,
)
from .sidecar import counted, http_get, running_sidecar, sample, target, web_url
from .test_faults import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    SETTINGS,
    RawClient,
    request_block,
)

pytestmark = pytest.mark.integration


SeriesKey = tuple[str, frozenset[tuple[str, str]]]


def exported_series(sidecar: Sidecar) -> set[SeriesKey]:
    """Every series of /metrics (text format), after checking every label value."""
    status, _, body = http_get(web_url(sidecar))
    assert status == 200
    keys: set[SeriesKey] = set()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            for label, value in s.labels.items():
                assert value != "runner_system_failure"
                if label in ALLOWED:
                    assert value in ALLOWED[label], (s.name, label, value)
            keys.add((s.name, frozenset(s.labels.items())))
    return keys


async def _ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


BIG = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))


async def _call_big(target_: str, method: str, request: bytes) -> bytes:
    async with grpc.aio.insecure_channel(target_, options=BIG) as channel:
        response: bytes = await channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=30)
        return response


# -- connection limit --------------------------------------------------------------------------


@pytest.mark.step_runner(relay=True)
@pytest.mark.sidecar(limits={"max_connections": 2})
def test_connections_over_the_limit_are_closed_at_once_and_counted(
    loop: BackgroundLoop, step_runner: SimulatedStepRunner, sidecar: Sidecar
) -> None:
    async def main() -> None:
        splice = sidecar.splice
        assert splice is not None and splice.listen.path is not None
        path = splice.listen.path
        base = step_runner.connections  # the sidecar's reachability probe connected once
        held = [await RawClient.connect(path) for _ in range(2)]
        await async_wait_until(
            lambda: step_runner.connections == base + 2, what="two upstream connections"
        )

        for _ in range(2):  # over the limit: closed straight away, nothing upstream
            assert await asyncio.wait_for(_closed_at_once(path), 5)
        assert sample(sidecar, "step_runner_exporter_rejected_connections_total") == 2
        assert step_runner.connections == base + 2

        # A gRPC client over the limit fails fast with UNAVAILABLE: at its deadline
        # it would have been DEADLINE_EXCEEDED.
        refused = await grpc_call(
            target(sidecar), "Status", step_pb2.StatusRequest(id="x"), deadline=20
        )
        assert refused.code == "Unavailable"
        rejected = sample(sidecar, "step_runner_exporter_rejected_connections_total")
        assert rejected >= 3
        assert counted(sidecar)[0] == {"success": 0, "failed": 0, "cancelled": 0}

        held.pop().close()  # a slot frees up: the next job goes through
        await async_wait_until(lambda: splice.active_connections == 1)
        record = await run_job(target(sidecar), "success", "after-limit")
        assert record.problems() == []
        await async_wait_until(lambda: counted(sidecar)[0]["success"] == 1)
        for client in held:
            client.close()

    loop.run(main())


async def _closed_at_once(path: str) -> bool:
    """Connect and send nothing: the sidecar's close shows as end of file."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, path)
        return await loop.sock_recv(sock, 1) == b""


# -- message size limit ------------------------------------------------------------------------


def _status_response(job_id: str, padding: int) -> bytes:
    status = step_pb2.Status(id=job_id, status=step_pb2.StepResult.success, message="p" * padding)
    return step_pb2.StatusResponse(jobs=[status]).SerializeToString()


@pytest.mark.parametrize(
    ("size", "limit"),
    [(64 << 20, None), (2 << 20, 1 << 20)],
    ids=["64MiB-default-limit", "2MiB-configured-1MiB"],
)
def test_messages_over_the_limit_are_forwarded_untouched_skipped_and_counted(
    size: int, limit: int | None
) -> None:
    body = _status_response("big-1", size)

    async def status(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return body

    async def main() -> None:
        handlers = {"Status": status, "Close": _ok}
        observer = {} if limit is None else {"observer": {"max_message_bytes": limit}}
        async with (
            scripted_step_runner(handlers, BIG) as upstream,
            running_sidecar(upstream, **observer) as sidecar,
        ):
            request = step_pb2.StatusRequest(id="big-1").SerializeToString()
            received = await _call_big(target(sidecar), "Status", request)
            assert received == body  # byte for byte
            await grpc_call(target(sidecar), "Close", step_pb2.CloseRequest(id="big-1"))
            await async_wait_until(
                lambda: sample(sidecar, "step_runner_exporter_evicted_jobs_total") == 1,
                what="the job closed without a seen outcome",
            )
            errors = sample(
                sidecar, "step_runner_exporter_decode_errors_total", message="grpc_frame"
            )
            assert errors == 1
            # Never guessed: the outcome inside the skipped message is not counted.
            assert counted(sidecar)[0] == {"success": 0, "failed": 0, "cancelled": 0}

    run_async(main(), timeout=60)


def test_the_same_message_under_the_limit_is_decoded() -> None:
    """The counterpart of the 2 MiB case: only the limit made the difference."""
    body = _status_response("fits-1", 2 << 20)

    async def status(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return body

    async def main() -> None:
        async with (
            scripted_step_runner({"Status": status}, BIG) as upstream,
            running_sidecar(upstream, observer={"max_message_bytes": 4 << 20}) as sidecar,
        ):
            request = step_pb2.StatusRequest(id="fits-1").SerializeToString()
            assert await _call_big(target(sidecar), "Status", request) == body
            await async_wait_until(lambda: counted(sidecar)[0]["success"] == 1)

    run_async(main())


# -- the label set is bounded --------------------------------------------------------------------


@pytest.mark.step_runner(relay=False)
@pytest.mark.sidecar(jobs={"max_tracked": 1000})
def test_ten_thousand_paths_and_job_ids_leave_the_series_unchanged(
    loop: BackgroundLoop, sidecar: Sidecar
) -> None:
    async def main() -> None:
        before = await asyncio.to_thread(exported_series, sidecar)
        limit = asyncio.Semaphore(64)

        async def one(channel: Any, i: int) -> None:
            async with limit:
                if i % 2:
                    call = channel.unary_unary(f"/evil{i}.Svc{i}/Method{i}")(b"x", timeout=30)
                else:
                    request = step_pb2.StatusRequest(id=f'job-{i}"\n{{le="{i}"}}')
                    call = channel.unary_unary(f"/{SERVICE}/Status")(
                        request.SerializeToString(), timeout=30
                    )
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call
                codes[i % 2][await call.code()] += 1

        codes: tuple[Counter[Any], Counter[Any]] = (Counter(), Counter())
        async with grpc.aio.insecure_channel(target(sidecar)) as channel:
            await asyncio.gather(*(one(channel, i) for i in range(10_000)))
        assert codes == (
            Counter({grpc.StatusCode.NOT_FOUND: 5000}),
            Counter({grpc.StatusCode.UNIMPLEMENTED: 5000}),
        )
        handled = {
            (labels["grpc_method"], labels["grpc_code"]): value
            for labels, value in _samples(sidecar, "grpc_server_handled_total")
            if value
        }
        assert handled == {("unknown", "Unimplemented"): 5000, ("Status", "NotFound"): 5000}
        after = await asyncio.to_thread(exported_series, sidecar)
        assert after == before
        # 5,000 job ids, each failed NotFound once; the tracker stays bounded.
        assert counted(sidecar)[0]["failed"] == 5000
        assert sample(sidecar, "step_runner_exporter_tracked_jobs") <= 1000

    loop.run(main(), timeout=120)


def _samples(sidecar: Sidecar, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for metric in sidecar.registry.collect()
        for s in metric.samples
        if s.name == name
    ]


# -- strings a job controls ------------------------------------------------------------------------

HOSTILE = [
    'q"uote',
    "new\nline\n# HELP step_runner_jobs_total pwned",
    'brace} 1\nstep_runner_jobs_total{result="success"} 99',
    "back\\slash",
    "tab\there",
    "日本語のジョブ",
    "\x7f\x1b[31mred",
    "x" * 2000,
]


def test_job_controlled_strings_never_reach_a_label_or_break_the_exposition() -> None:
    def log_bytes() -> bytes:
        return "".join(HOSTILE).encode() + b"\xff\xfe\x00invalid utf-8"

    async def follow(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield step_pb2.FollowLogsResponse(data=log_bytes()).SerializeToString()

    async def status(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        job_id = step_pb2.StatusRequest.FromString(request).id
        index = int(job_id.rsplit("#", 1)[1])
        if index % 3 == 2:
            await context.abort(
                grpc.StatusCode.INTERNAL,
                HOSTILE[index % len(HOSTILE)],
                trailing_metadata=(("x-hostile", HOSTILE[0]), ("x-bin", b'\xff\n"')),
            )
        entry = step_pb2.Status(
            id=job_id, status=step_pb2.StepResult.failure, message=HOSTILE[index % len(HOSTILE)]
        )
        entry.error.kind = (
            step_pb2.StatusError.internal if index % 3 else step_pb2.StatusError.step_failure
        )
        entry.error.message = HOSTILE[(index + 1) % len(HOSTILE)]
        return step_pb2.StatusResponse(jobs=[entry]).SerializeToString()

    async def main() -> None:
        handlers = {"Run": _ok, "FollowLogs": follow, "Status": status, "Close": _ok}
        async with (
            scripted_step_runner(handlers) as upstream,
            running_sidecar(upstream, labels={"runner": "r1"}) as sidecar,
        ):
            before = await asyncio.to_thread(exported_series, sidecar)
            ids = [f"{text}#{i}" for i, text in enumerate(HOSTILE)]
            for job_id in ids:
                async with grpc.aio.insecure_channel(target(sidecar)) as channel:
                    await channel.unary_unary(f"/{SERVICE}/Run")(
                        step_pb2.RunRequest(id=job_id, steps=job_id).SerializeToString()
                    )
                    logs = channel.unary_stream(f"/{SERVICE}/FollowLogs")(
                        step_pb2.FollowLogsRequest(id=job_id).SerializeToString()
                    )
                    assert [step_pb2.FollowLogsResponse.FromString(m).data async for m in logs] == [
                        log_bytes()
                    ]
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await channel.unary_unary(f"/{SERVICE}/Status")(
                            step_pb2.StatusRequest(id=job_id).SerializeToString()
                        )
                    await channel.unary_unary(f"/{SERVICE}/Close")(
                        step_pb2.CloseRequest(id=job_id).SerializeToString()
                    )
            await async_wait_until(lambda: sum(counted(sidecar)[0].values()) == len(ids))
            assert await asyncio.to_thread(exported_series, sidecar) == before

            for accept in ("", "application/openmetrics-text; version=1.0.0"):
                status_code, _, body = await asyncio.to_thread(http_get, web_url(sidecar), accept)
                assert status_code == 200
                text = body.decode()
                for hostile in HOSTILE:
                    for fragment in hostile.split("\n"):  # no line of it, injected or not
                        assert len(fragment) < 5 or fragment not in text, fragment
                if accept:
                    families = {f.name: f for f in parse_om(text)}
                    exemplars = [
                        s.exemplar.labels["job_id"]
                        for s in families["step_runner_job_failures"].samples
                        if s.exemplar is not None
                    ]
                    assert exemplars and all(
                        set(e)
                        <= set(
                            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/-"
                        )
                        and len(e) <= 122
                        for e in exemplars
                    )

    run_async(main(), timeout=60)


# -- garbage from either side, end to end ---------------------------------------------------------


class _ScriptedPeer(asyncio.Protocol):
    """A raw upstream: on the client's first bytes it takes the next script, sends it,
    half-closes, and records everything it receives until the client half-closes.
    (Connections that send nothing, such as the sidecar's reachability probe, take
    no script.)"""

    def __init__(self, next_script: Callable[[], tuple[bytes, bytearray]]) -> None:
        self._next_script = next_script
        self._received: bytearray | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._received is None:
            assert self._transport is not None
            script, self._received = self._next_script()
            self._transport.write(script)
            self._transport.write_eof()
        self._received += data


def _client_script(rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return rng.randbytes(rng.randrange(1, 4096))
    encoder = hpack.Encoder()
    out = bytearray(PREFACE + frame(SETTINGS, 0, 0))
    for stream in range(1, 2 * rng.randrange(1, 6), 2):
        path = f"/{SERVICE}/{rng.choice([*STEP_RUNNER_METHODS, 'Nope'])}"
        block = request_block(encoder, path, rng.choice([None, "5S", "1n"]))
        out += frame(HEADERS, END_HEADERS, stream, block)
        if rng.random() < 0.5:
            message = step_pb2.StatusRequest(id=str(rng.randrange(20))).SerializeToString()
        else:
            message = rng.randbytes(rng.randrange(0, 64))
        out += frame(DATA, END_STREAM, stream, _grpc(message, rng.choice([0, 0, 1])))
    if rng.random() < 0.3:
        out += rng.randbytes(rng.randrange(0, 512))
    return bytes(out)


def _grpc(message: bytes, flag: int) -> bytes:
    return bytes([flag]) + struct.pack(">I", len(message)) + message


def _server_script(rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return rng.randbytes(rng.randrange(0, 8192))
    encoder = hpack.Encoder()
    out = bytearray(frame(SETTINGS, 0, 0))
    for stream in range(1, 12, 2):
        status = rng.choice(["200", "200", "503", "x"])
        headers = [(":status", status), ("content-type", "application/grpc")]
        out += frame(HEADERS, END_HEADERS, stream, encoder.encode(headers))
        for _ in range(rng.randrange(0, 3)):
            if rng.random() < 0.5:
                body = _any_status_response(rng)
            else:
                body = rng.randbytes(rng.randrange(0, 200))
            out += frame(DATA, 0, stream, _grpc(body, rng.choice([0, 0, 1])))
        code = rng.choice(["0", "1", "2", "4", "13", "14", "99", "", "-3"])
        out += frame(
            HEADERS, END_HEADERS | END_STREAM, stream, encoder.encode([("grpc-status", code)])
        )
    if rng.random() < 0.3:
        out += rng.randbytes(rng.randrange(0, 512))
    return bytes(out)


def _any_status_response(rng: random.Random) -> bytes:
    """Any state and error kind numbers, known or not, written field by field."""
    entry = b"\x0a\x01" + str(rng.randrange(10)).encode()
    entry += b"\x18" + varint(rng.randrange(0, 2**32))
    if rng.random() < 0.5:
        kind = b"\x10" + varint(rng.randrange(0, 2**32))
        entry += b"\x3a" + varint(len(kind)) + kind
    return b"\x0a" + varint(len(entry)) + entry


FUZZ_CONNECTIONS = 300


def _volume(scripts: list[tuple[bytes, bytes]]) -> int:
    return sum(len(c) + len(s) for c, s in scripts)


def test_garbage_from_either_side_is_forwarded_exactly_and_never_forges_anything() -> None:
    rng = random.Random(20261125)
    scripts = [(_client_script(rng), _server_script(rng)) for _ in range(FUZZ_CONNECTIONS)]
    received: list[bytearray] = []

    def next_script() -> tuple[bytes, bytearray]:
        # Connections run one after another, so the n-th to send is the n-th script.
        received.append(bytearray())
        return scripts[len(received) - 1][1], received[-1]

    async def exchange(path: str, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, path)
            await loop.sock_sendall(sock, data)
            sock.shutdown(socket.SHUT_WR)
            answer = bytearray()
            while chunk := await loop.sock_recv(sock, 65536):
                answer += chunk
            return bytes(answer)

    async def main() -> None:
        with short_tmpdir() as d:
            loop = asyncio.get_running_loop()
            server = await loop.create_unix_server(
                lambda: _ScriptedPeer(next_script), f"{d}/raw.sock"
            )
            try:
                async with running_sidecar(f"unix://{d}/raw.sock") as sidecar:
                    splice = sidecar.splice
                    assert splice is not None and splice.listen.path is not None
                    before = await asyncio.to_thread(exported_series, sidecar)
                    for index, (client_bytes, server_bytes) in enumerate(scripts):
                        answer = await asyncio.wait_for(
                            exchange(splice.listen.path, client_bytes), 10
                        )
                        assert answer == server_bytes, index
                        await async_wait_until(lambda: splice.active_connections == 0)
                        assert bytes(received[index]) == client_bytes, index
                    assert await asyncio.to_thread(exported_series, sidecar) == before
                    errors = {
                        labels["message"]: value
                        for labels, value in _samples(
                            sidecar, "step_runner_exporter_decode_errors_total"
                        )
                    }
                    # Garbage was seen at every layer: frames, gRPC framing, messages.
                    assert errors["http2"] > 0 and errors["grpc_frame"] > 0
                    assert errors["StatusResponse"] > 0 and errors["StatusRequest"] > 0
                    jobs = counted(sidecar)[0]
                    print(
                        f"fuzz: {len(scripts)} connections, {_volume(scripts)} bytes; "
                        f"decode errors {errors}; jobs {jobs}"
                    )
            finally:
                server.close()
                await server.wait_closed()

    run_async(main(), timeout=120)
