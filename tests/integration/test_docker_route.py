"""GitLab Runner's Docker route, end to end on a real daemon: the Go client dials as
Runner's Docker executor does (exec create of `<helper> steps proxy --socket P`, a
hijacked start, stdcopy, one exec per job) into a build container running the Go
stand-in's `steps serve`, once straight to the daemon and once through a real
`step-runner-exporter serve --tap docker` process. What the tap exports must equal the
client's own tally, and the client must see the same results either way.

One daemon, one image and one tap for the module; the faults get their own tap process
where they stop or restart something.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import build
from benchmarks.procs import BENCH_SIDECAR_CONFIG

from .docker_daemon import DockerDaemon, docker_daemon, ping
from .docker_images import BuildContainer, start_build_container, step_runner_image
from .harness import ProcessLog, wait_until
from .sidecar import ServeProcess, docker_tap_process, http_get

pytestmark = pytest.mark.integration

COMMAND = str(Path(sys.executable).with_name("step-runner-exporter"))
SERVICE = "proto.StepRunner"
JOBS = 300
CONCURRENCY = 8

# SPEC section 3, per scenario of the Go stand-in: Runner's result and, for a failed
# job, (failure_reason, source, kind, category). An independent writing of the table
# from exporter/classifier.py, so the two can disagree.
SCRIPT = ("script_failure", "status_error_kind", "step_failure", "script")
UNKNOWN = ("unknown_failure", "status_error_kind", "unknown", "unknown")
GRPC_INTERNAL = ("script_failure", "grpc_internal", "Internal", "infrastructure")


def grpc_status(code: str) -> tuple[str, ...]:
    return ("script_failure", "grpc_status", code, "infrastructure")


EXPECTED: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "success": ("success", None),
    "step_failure": ("failed", SCRIPT),
    "internal": ("failed", ("script_failure", "status_error_kind", "internal", "infrastructure")),
    "timeout": ("failed", ("job_execution_timeout", "status_error_kind", "timeout", "script")),
    "failure_noerror": ("failed", UNKNOWN),
    "unknown_kind": ("failed", UNKNOWN),
    "unrecognized_kind": (
        "failed",
        ("unknown_failure", "status_error_kind", "unrecognized", "unknown"),
    ),
    "cancelled": ("cancelled", None),
    "client_cancel": ("cancelled", None),
    "panic_status": ("failed", GRPC_INTERNAL),
    "undecodable_status": ("failed", GRPC_INTERNAL),
    "unavailable_status": ("failed", grpc_status("Unavailable")),
    "unknown_code": ("failed", grpc_status("Unknown")),
    "deadline": ("failed", grpc_status("DeadlineExceeded")),
}
STREAMING = {"FollowLogs"}
# The masked variable of every job's RunRequest (benchmarks/go/stepclient).
SECRET = "not-a-real-secret"
LOGFMT = re.compile(r'(\w+)=("[^"]*"|\S*)')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Tap:
    proc: subprocess.Popen[bytes]
    socket: str
    base: str  # http://127.0.0.1:PORT
    logs: ProcessLog

    def samples(self) -> Samples:
        status, _, body = http_get(f"{self.base}/metrics")
        assert status == 200
        out: Samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float:
        return self.samples().get((name, tuple(sorted(labels.items()))), 0.0)


def tap_of(process: ServeProcess) -> Tap:
    return Tap(process.process, str(process.socket_path), f"http://{process.web}", process.log)


@dataclass
class Env:
    daemon: DockerDaemon
    image: str
    tap: Tap


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with docker_daemon() as daemon:
        image = step_runner_image(daemon)
        # The mix's 50 ms `deadline` job needs the benchmark sidecar's wider deadline
        # tolerance (BENCH_SIDECAR_CONFIG says why): one setting for both.
        config = "shutdown: {grace_period: 5s, final_scrape_wait: 0s}\n" + BENCH_SIDECAR_CONFIG
        with docker_tap_process(daemon.host, config) as process:
            yield Env(daemon, image, tap_of(process))


def client(
    api: str, container: BuildContainer, id_base: int, **flags: object
) -> subprocess.Popen[str]:
    """The Go client on the Docker route, started; flags as for the client
    (log_bytes= for -log-bytes)."""
    argv = [str(build.ensure_built().client), f"-docker={api}", f"-container={container.id}"]
    argv += [f"-steps-socket={container.socket}", f"-id-base={id_base}"]
    argv += [f"-{k.replace('_', '-')}={v}" for k, v in flags.items()]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc: subprocess.Popen[str], timeout: float = 240) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def run_jobs(api: str, container: BuildContainer, id_base: int, **flags: object) -> dict[str, Any]:
    return result_of(client(api, container, id_base, mode="jobs", **flags))


def grpc_type(method: str) -> str:
    return "server_stream" if method in STREAMING else "unary"


def wire_calls(result: dict[str, Any]) -> Counter[tuple[str, str]]:
    """The client's calls by (method, code) as the wire carried them: a Status answer
    that does not decode went out OK; only the client made it Internal."""
    calls: Counter[tuple[str, str]] = Counter()
    for key, n in result["calls"].items():
        method, code = key.split(":")
        calls[(method, code)] += n
    undecodable = result["scenarios"].get("undecodable_status", 0)
    calls[("Status", "Internal")] -= undecodable
    calls[("Status", "OK")] += undecodable
    return +calls


def expected_jobs(scenarios: dict[str, int]) -> tuple[Counter[str], Counter[tuple[str, ...]]]:
    jobs: Counter[str] = Counter()
    failures: Counter[tuple[str, ...]] = Counter()
    for scenario, n in scenarios.items():
        result, labels = EXPECTED[scenario]
        jobs[result] += n
        if labels is not None:
            failures[labels] += n
    return jobs, failures


FAILURE_LABELS = ("failure_reason", "source", "kind", "category")


@dataclass
class Counted:
    """What the tap counted, in the shapes of the client's tally."""

    jobs: Counter[str] = field(default_factory=Counter)
    failures: Counter[tuple[str, ...]] = field(default_factory=Counter)
    started: Counter[str] = field(default_factory=Counter)
    handled: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (method, grpc_type, grpc_service) of every started call
    types: set[tuple[str, str, str]] = field(default_factory=set)
    sessions: Counter[str] = field(default_factory=Counter)  # by state
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, endpoint)
    decode_errors: Counter[str] = field(default_factory=Counter)
    upstream_up: float = -1.0

    def minus(self, before: Counted) -> Counted:
        """Counter deltas since `before` (the label sets and the gauge as now)."""
        return Counted(
            self.jobs - before.jobs,
            self.failures - before.failures,
            self.started - before.started,
            self.handled - before.handled,
            self.types,
            self.sessions - before.sessions,
            self.requests - before.requests,
            self.decode_errors - before.decode_errors,
            self.upstream_up,
        )


def exported(samples: Samples) -> Counted:
    c = Counted()
    for (name, labels), value in samples.items():
        label = dict(labels)
        n = int(value)
        if name == "step_runner_jobs_total":
            c.jobs[label["result"]] += n
        elif name == "step_runner_job_failures_total":
            c.failures[tuple(label[k] for k in FAILURE_LABELS)] += n
        elif name == "grpc_server_started_total" and n:
            c.started[label["grpc_method"]] += n
            c.types.add((label["grpc_method"], label["grpc_type"], label["grpc_service"]))
        elif name == "grpc_server_handled_total":
            c.handled[(label["grpc_method"], label["grpc_code"])] += n
        elif name == "step_runner_exporter_docker_exec_sessions_total":
            c.sessions[label["state"]] += n
        elif name == "step_runner_exporter_docker_requests_total":
            c.requests[(label["method"], label["endpoint"])] += n
        elif name == "step_runner_exporter_decode_errors_total":
            c.decode_errors[label["message"]] += n
        elif name == "step_runner_exporter_upstream_up":
            c.upstream_up = value
    return c


def counted(tap: Tap) -> Counted:
    return exported(tap.samples())


def assert_tally(delta: Counted, result: dict[str, Any]) -> None:
    """Every counter of the tap equals the client's own tally of the same run."""
    jobs, failures = expected_jobs(result["scenarios"])
    assert +delta.jobs == jobs == Counter(result["outcomes"])
    assert +delta.failures == failures
    calls = wire_calls(result)
    assert +delta.handled == calls
    per_method: Counter[str] = Counter()
    for (method, _), n in calls.items():
        per_method[method] += n
    assert +delta.started == per_method
    assert all(
        service == SERVICE and kind == grpc_type(method) for method, kind, service in delta.types
    ), delta.types
    assert result["execs"] == result["jobs"]
    assert +delta.sessions == Counter(tapped=result["execs"])
    assert delta.requests[("POST", "exec_create")] == result["execs"]
    assert delta.requests[("POST", "exec_start")] == result["execs"]
    undecodable = result["scenarios"].get("undecodable_status", 0)
    assert +delta.decode_errors == Counter(StatusResponse=undecodable)


def settled(tap: Tap, before: Counted, jobs: int) -> Counted:
    """The tap's counters once it has classified `jobs` more jobs (a job's last bytes
    may reach the tap's observer just after the client saw them)."""
    snapshot: list[Counted] = []

    def done() -> bool:
        snapshot.append(counted(tap).minus(before))
        return snapshot[-1].jobs.total() >= jobs

    wait_until(done, timeout=20, what=f"{jobs} jobs counted")
    return snapshot[-1]


def test_jobs_through_the_tap_match_the_client_tally_and_the_direct_run(env: Env) -> None:
    container = start_build_container(env.daemon, env.image)
    before = counted(env.tap)
    tapped = run_jobs(env.tap.socket, container, 1_000_000, jobs=JOBS, concurrency=CONCURRENCY)
    assert tapped["errors"] == 0, tapped.get("first_error")
    assert tapped["jobs"] == JOBS
    # The mix reaches every row of SPEC section 3 a job's own calls can produce.
    assert set(tapped["scenarios"]) == set(EXPECTED)
    assert_tally(settled(env.tap, before, JOBS), tapped)
    assert counted(env.tap).upstream_up == 1
    # One log line per job, naming the container and the job's own exec session.
    lines = [
        dict(LOGFMT.findall(line))
        for line in list(env.tap.logs.lines)
        if 'msg="job classified"' in line and f"container_id={container.id}" in line
    ]
    assert sorted(int(line["job_id"]) for line in lines) == list(range(1_000_000, 1_000_000 + JOBS))
    assert len({line["exec_id"] for line in lines}) == JOBS
    # The jobs' masked variable went through the tap in every RunRequest, never out.
    assert not any(SECRET in line for line in env.tap.logs.lines)
    assert SECRET.encode() not in http_get(f"{env.tap.base}/metrics")[2]

    direct = run_jobs(env.daemon.socket, container, 1_000_000, jobs=JOBS, concurrency=CONCURRENCY)
    for key in ("jobs", "outcomes", "scenarios", "calls", "execs", "errors"):
        assert direct[key] == tapped[key], key
    # The direct run went around the tap.
    assert counted(env.tap).minus(before).jobs.total() == JOBS


def test_build_container_killed_mid_job(env: Env) -> None:
    """`docker kill` while every job streams its log: the exec sessions end, each call
    in flight ends Unavailable for the client and for the tap, and each job counts as
    failed, grpc_status Unavailable."""
    container = start_build_container(env.daemon, env.image)
    before = counted(env.tap)
    n = 4
    proc = client(
        env.tap.socket,
        container,
        2_000_000,
        mode="jobs",
        scenario="success",
        jobs=n,
        concurrency=n,
        log_bytes=1 << 40,
        chunk=4096,
    )

    def streaming() -> bool:
        return counted(env.tap).minus(before).started["FollowLogs"] == n

    wait_until(streaming, timeout=30, what="every job streaming its log")
    env.daemon.cli("kill", container.id)
    result = result_of(proc, timeout=60)
    assert result["errors"] == n and result["jobs"] == 0
    assert result["calls"] == {"Run:OK": n, "FollowLogs:Unavailable": n}
    delta = settled(env.tap, before, n)
    assert +delta.jobs == Counter(failed=n)
    assert +delta.failures == Counter({grpc_status("Unavailable"): n})
    assert +delta.handled == Counter({("Run", "OK"): n, ("FollowLogs", "Unavailable"): n})
    # grpc-go may redial once its connection died, and an exec started just before the
    # kill is a session like any other: what the client started is what was tapped.
    assert result["execs"] >= n
    assert +delta.sessions == Counter(tapped=result["execs"])
    assert env.tap.proc.poll() is None
    assert ping(env.tap.socket)


def test_daemon_restart_with_the_tap_running(env: Env) -> None:
    """The daemon goes away and comes back: the tap keeps serving, upstream_up drops
    while the daemon is down and returns, and jobs afterwards are counted as before."""
    before = counted(env.tap)
    assert before.upstream_up == 1
    saw_down = threading.Event()
    restarting = threading.Thread(target=env.daemon.restart)
    restarting.start()
    try:
        # Each ping through the tap makes it dial the daemon; while the daemon is
        # down that fails, and upstream_up must say so.
        def down() -> bool:
            if (
                not ping(env.tap.socket, timeout=1)
                and env.tap.value("step_runner_exporter_upstream_up") == 0
            ):
                saw_down.set()
            return saw_down.is_set() or not restarting.is_alive()

        wait_until(down, timeout=90, what="upstream_up 0 while the daemon restarts")
    finally:
        restarting.join(90)
    assert saw_down.is_set(), "the daemon was never seen down through the tap"
    assert env.tap.proc.poll() is None
    wait_until(lambda: ping(env.tap.socket), timeout=30, what="the daemon through the tap")
    wait_until(lambda: env.tap.value("step_runner_exporter_upstream_up") == 1, what="upstream_up 1")

    container = start_build_container(env.daemon, env.image, host=f"unix://{env.tap.socket}")
    before = counted(env.tap)
    result = run_jobs(env.tap.socket, container, 3_000_000, jobs=20, concurrency=4)
    assert result["errors"] == 0, result.get("first_error")
    assert_tally(settled(env.tap, before, 20), result)


def test_sigterm_with_an_exec_in_flight_drains_and_waits_for_a_final_scrape(env: Env) -> None:
    """SIGTERM while a job's log streams through an exec session: the tap stops
    accepting (ready 503, socket gone), the session runs to its end, and the tap exits
    only after a scrape that shows the job."""
    config = "shutdown: {grace_period: 30s, final_scrape_wait: 30s}\n"
    with docker_tap_process(env.daemon.host, config) as process:
        tap = tap_of(process)
        container = start_build_container(env.daemon, env.image)
        proc = client(
            tap.socket, container, 4_000_000, mode="logs", chunk=4096, log_bytes=256 << 20
        )
        wait_until(
            lambda: (
                tap.value(
                    "grpc_server_started_total",
                    grpc_method="FollowLogs",
                    grpc_service=SERVICE,
                    grpc_type="server_stream",
                )
                == 1
            ),
            timeout=30,
            what="the log streaming",
        )
        tap.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: http_get(f"{tap.base}/-/ready")[0] == 503, what="not ready")
        wait_until(lambda: not Path(tap.socket).exists(), what="the tap's socket removed")
        assert tap.value("step_runner_jobs_total", result="success") == 0
        assert proc.poll() is None, "the log ended before SIGTERM: make it longer"

        result = result_of(proc, timeout=120)
        assert result["bytes"] == 256 << 20
        assert tap.proc.poll() is None, "exited before its final scrape"
        # Scrape until the tap exits: the first scrape after the drain is its final one.
        last: list[float] = []

        def scraped_and_exited() -> bool:
            with contextlib.suppress(OSError):
                last.append(tap.value("step_runner_jobs_total", result="success"))
            return tap.proc.poll() is not None

        wait_until(scraped_and_exited, timeout=30, what="the final scrape and exit")
        assert tap.proc.returncode == 0
        assert last[-1] == 1, "the final scrape did not show the drained job"
        assert tap.logs.find('msg="final scrape"') is not None, tap.logs.lines
