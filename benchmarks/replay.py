"""CPU the observer alone spends per connection, without sockets (issues 10-12).

    python -m benchmarks.replay [--rounds N] [--jobs N] [--workload NAME]

Workloads:

- `captures`: every recorded connection of the test corpus, replayed in record order
  through a fresh observer each (the process-wide HPACK memos warm, as in a running
  sidecar): microseconds of CPU per connection.
- `shared`, `shared_deadline`: one long-lived connection carrying `--jobs` job
  lifecycles (Run, FollowLogs with a 4 KiB log, Status, Close), 16 in flight, its
  header blocks written by one hpack encoder per side as grpc-go writes them
  (without and with a per-call grpc-timeout): microseconds of CPU per job.
- `per_job`, `per_job_deadline`: the same lifecycles, one connection each (GitLab
  Runner's way). Each connection writes the same grpc-timeout values: a grpc-go
  client's do repeat from connection to connection (the live sidecar's memo hits
  about 90% of the blocks of `jobs_c16` in `benchmarks.run`).

Each figure is the median of `--rounds` runs, measured with time.process_time, on the
observer core this process runs (STEP_RUNNER_EXPORTER_PURE_PYTHON=1 forces pure Python).
`--sink accounting` gives the observer the sidecar's own sink (Accounting with real
Metrics, the job log line written as text to /dev/null) instead of one that drops the
events: the whole per-job path but the sockets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as `python benchmarks/replay.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hpack

from exporter import native
from exporter.events import CallEnded, Method, ObserverSink
from exporter.h2 import PREFACE
from exporter.observer import ConnectionObserver
from exporter.proto import step_pb2
from tests.unit.captures import CAPTURES, CLIENT, SERVER, read_h2cap
from tests.wire import frame, grpc_message, request_headers

DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4
IN_FLIGHT = 16


class NullSink:
    def call_started(self, method: Method) -> None:
        pass

    def call_ended(self, call: CallEnded) -> None:
        pass

    def decode_error(self, message: str) -> None:
        pass

    def unknown_fields(self, message: str) -> None:
        pass


Feed = list[tuple[int, bytes]]  # (direction, bytes)


def _captures() -> list[Feed]:
    feeds = []
    for path in sorted(CAPTURES.glob("*.h2cap")):
        feeds.append([(r.direction, r.data) for r in read_h2cap(path) if r.direction <= SERVER])
    if not feeds:
        raise SystemExit(f"no captures at {CAPTURES}")
    return feeds


def shared_connection(jobs: int, *, deadline: bool, first_job: int = 0) -> Feed:
    """One connection, `jobs` lifecycles with IN_FLIGHT interleaved, as bytes."""
    client, server = hpack.Encoder(), hpack.Encoder()
    out: Feed = [(CLIENT, PREFACE + frame(SETTINGS, 0, 0)), (SERVER, frame(SETTINGS, 0, 0))]
    response = [(":status", "200"), ("content-type", "application/grpc")]
    log = grpc_message(step_pb2.FollowLogsResponse(data=b"L" * 1024).SerializeToString())
    calls = ("Run", "FollowLogs", "Status", "Close")
    stream = 1
    for first in range(0, jobs, IN_FLIGHT):
        batch = range(first, min(jobs, first + IN_FLIGHT))
        for name in calls:
            for job in batch:
                # grpc-go writes the time left, which differs from call to call.
                timeout = f"{59_999_000 + (stream * 7919) % 1000}u" if deadline else None
                headers = request_headers(f"/proto.StepRunner/{name}", timeout)
                body = step_pb2.RunRequest(id=str(first_job + job)).SerializeToString()
                out.append(
                    (
                        CLIENT,
                        frame(HEADERS, END_HEADERS, stream, client.encode(headers))
                        + frame(DATA, END_STREAM, stream, grpc_message(body)),
                    )
                )
                reply = frame(HEADERS, END_HEADERS, stream, server.encode(response))
                if name == "FollowLogs":
                    reply += frame(DATA, 0, stream, log * 4)
                elif name == "Status":
                    status = step_pb2.Status(
                        id=str(first_job + job), status=step_pb2.StepResult.success
                    )
                    message = step_pb2.StatusResponse(jobs=[status]).SerializeToString()
                    reply += frame(DATA, 0, stream, grpc_message(message))
                else:
                    reply += frame(DATA, 0, stream, grpc_message(b""))
                trailers = [("grpc-status", "0"), ("grpc-message", "")]
                reply += frame(HEADERS, END_HEADERS | END_STREAM, stream, server.encode(trailers))
                out.append((SERVER, reply))
                stream += 2
    return out


def _run(feeds: list[Feed], sink: ObserverSink) -> float:
    start = time.process_time()
    for feed in feeds:
        observer = ConnectionObserver(sink)
        for direction, data in feed:
            if direction == CLIENT:
                observer.client_data(data, 0.0)
            else:
                observer.server_data(data, 0.0)
        observer.connection_lost(0.0)
        assert not observer.failed
    return time.process_time() - start


def accounting_sink() -> ObserverSink:
    """The sidecar's sink as the application builds it, logging job lines as text."""
    from prometheus_client import CollectorRegistry

    from exporter.accounting import Accounting
    from exporter.logs import setup_logging
    from exporter.metrics import Metrics

    setup_logging("info", "text", open(os.devnull, "w"))  # noqa: SIM115 - for the process
    return Accounting(Metrics(CollectorRegistry()), upstream="unix:///run/step-runner.sock")


def measure(name: str, rounds: int, jobs: int, sink: ObserverSink) -> tuple[float, str]:
    per: Callable[[float], float]
    if name == "captures":
        feeds = _captures() * 20
        per, unit = (lambda t: t / len(feeds)), "connection"
    elif name.startswith("per_job"):
        deadline = name == "per_job_deadline"
        feeds = [shared_connection(1, deadline=deadline, first_job=i) for i in range(jobs)]
        per, unit = (lambda t: t / jobs), "job"
    else:
        feeds = [shared_connection(jobs, deadline=name == "shared_deadline")]
        per, unit = (lambda t: t / jobs), "job"
    _run(feeds, sink)  # warm the memos as a running sidecar has them
    return statistics.median(per(_run(feeds, sink)) for _ in range(rounds)) * 1e6, unit


WORKLOADS = ("captures", "shared", "shared_deadline", "per_job", "per_job_deadline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replay")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workload", choices=WORKLOADS, action="append")
    parser.add_argument("--sink", choices=("null", "accounting"), default="null")
    args = parser.parse_args(argv)
    for name in args.workload or WORKLOADS:
        sink = accounting_sink() if args.sink == "accounting" else NullSink()
        us, unit = measure(name, args.rounds, args.jobs, sink)
        print(f"{name:16} {us:8.1f} us CPU per {unit} (observer core: {native.NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
