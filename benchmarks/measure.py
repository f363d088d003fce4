"""The measurements of issue 5. Every Go-client measurement runs interleaved (direct,
sidecar, direct, sidecar, ...), so slow drift of a shared machine hits both sides."""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.build import GoBinaries

DIRECT = "direct"
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    rounds: int
    status_seconds: float
    jobs_seconds: float
    log_bytes: int
    resource_jobs: int
    metrics_gets: int
    ready_starts: int
    # Job runs of the Docker route: an exec per job makes a job take the daemon tens of
    # milliseconds, so a run needs longer than on the socket route to say anything.
    docker_jobs_seconds: float = 5.0


FULL = Profile("full", 3, 2.0, 3.0, 64 * MiB, 100_000, 200, 3, 6.0)
QUICK = Profile("quick", 2, 0.5, 1.0, 8 * MiB, 2_000, 50, 1, 2.0)


@dataclass(frozen=True, slots=True)
class Metric:
    key: str  # field of the Go client's JSON
    unit: str
    latency: bool  # compared as time added (target - direct), else as a ratio


P50 = Metric("p50_us", "p50 us", True)
P90 = Metric("p90_us", "p90 us", True)
P99 = Metric("p99_us", "p99 us", True)
CALLS = Metric("calls_per_s", "calls/s", False)
MBPS = Metric("mb_per_s", "MB/s", False)  # 10^6 bytes
MSGS = Metric("msgs_per_s", "msgs/s", False)
JOBS = Metric("jobs_per_s", "jobs/s", False)
JOB_P50 = Metric("p50_ms", "job p50 ms", True)
JOB_P99 = Metric("p99_ms", "job p99 ms", True)


@dataclass(frozen=True, slots=True)
class ClientBench:
    name: str
    flags: dict[str, object]
    metrics: tuple[Metric, ...]
    # Jobs each run decides with every outcome success, for the accounting check
    # (the jobs mode reports its own outcomes instead).
    success_jobs: int = 0
    # Rounds per profile round: a 64 MiB log streams in about 0.1 s, too short for
    # one pair to say much on a shared machine, so log runs get more pairs.
    round_factor: int = 1


# A job's 4 KiB log comes in four messages, as a log written line by line would.
JOB_LOG = {"log_bytes": 4096, "chunk": 1024}


def client_benches(p: Profile) -> list[ClientBench]:
    status = (P50, P90, P99, CALLS)
    logs = (MBPS, MSGS)
    jobs = (JOBS, JOB_P50, JOB_P99)
    secs = {"duration": f"{p.status_seconds}s"}
    job_secs = {"duration": f"{p.jobs_seconds}s"}
    status_c1 = {"mode": "status", "concurrency": 1, **secs}
    return [
        ClientBench("status_c1", status_c1, status, 1),
        ClientBench("status_c16", {"mode": "status", "concurrency": 16, **secs}, status, 16),
        *(
            ClientBench(
                f"logs_{label}",
                {"mode": "logs", "chunk": size, "log_bytes": p.log_bytes},
                logs,
                success_jobs=1,
                round_factor=3,
            )
            for label, size in (("128", 128), ("4k", 4096), ("32k", 32768))
        ),
        ClientBench("jobs_c1", {"mode": "jobs", "concurrency": 1, **job_secs, **JOB_LOG}, jobs),
        *(
            ClientBench(name, {"mode": "jobs", "concurrency": 16, **job_secs, **JOB_LOG, **f}, jobs)
            for name, f in JOB_SHAPES.items()
        ),
        ClientBench("status_c1_nodl", {**status_c1, **NO_DEADLINE}, status, 1),
    ]


NO_DEADLINE: dict[str, object] = {"deadlines": False}
SHARED: dict[str, object] = {"shared": True}
# Issue 11: job lifecycles as clients really run them. One connection per job with a
# deadline on every unary call is GitLab Runner; a client that keeps one connection
# for every job (with 16 in flight on it) gives the sidecar HPACK state that never
# repeats; without deadlines the requests carry no grpc-timeout.
JOB_SHAPES: dict[str, dict[str, object]] = {
    "jobs_c16": {},
    "jobs_c16_nodl": NO_DEADLINE,
    "jobs_c16_shared": SHARED,
    "jobs_c16_shared_nodl": {**SHARED, **NO_DEADLINE},
}


OTHER_BENCHES = ("resources", "resources_shared", "metrics", "ready")
# The client flags of each resources measurement: Runner's connection per job, and one
# long-lived connection per tenth of the jobs.
RESOURCE_SHAPES: dict[str, dict[str, object]] = {"resources": {}, "resources_shared": SHARED}


def _ids() -> Iterator[int]:
    # Job ids stay unique across every client run against one sidecar; a run uses
    # fewer than 10^7 of them.
    base = 1_000_000
    while True:
        yield base
        base += 10_000_000


@dataclass
class Context:
    binaries: GoBinaries
    workdir: Path
    upstream: Path
    profile: Profile
    proxies: dict[str, procs.Proxy]
    log: Callable[[str], None]
    ids: Iterator[int] = field(default_factory=_ids)
    # Jobs each proxy should have counted, by result, for the accounting check.
    expected: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return [DIRECT, *self.proxies]

    def socket(self, target: str) -> Path:
        return self.upstream if target == DIRECT else self.proxies[target].socket

    def route(self, target: str) -> dict[str, object]:
        """The client flags that point it at `target`."""
        return {"socket": self.socket(target)}

    def client(self, target: str, **flags: object) -> dict[str, Any]:
        route = self.route(target)
        result = procs.run_client(self.binaries, id_base=next(self.ids), **route, **flags)
        counted = self.expected.setdefault(target, Counter())
        counted.update(result.get("outcomes", {}))
        return result


def run_client_bench(ctx: Context, bench: ClientBench) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in ctx.targets}
    for r in range(ctx.profile.rounds * bench.round_factor):
        for target in ctx.targets:
            result = _client_with_cpu(ctx, target, bench.flags)
            ctx.expected[target]["success"] += bench.success_jobs
            runs[target].append(result)
            ctx.log(f"  {bench.name} round {r + 1} {target}: " + _brief(bench, result))
    out: dict[str, Any] = {"runs": runs, "compare": compare_runs(runs, bench.metrics)}
    cpu = {
        t: statistics.median(run["cpu_us_per_job"] for run in target_runs)
        for t, target_runs in runs.items()
        if target_runs and all("cpu_us_per_job" in run for run in target_runs)
    }
    if cpu:
        out["cpu_us_per_job"] = cpu
    return out


def _client_with_cpu(ctx: Context, target: str, flags: dict[str, object]) -> dict[str, Any]:
    """One client run; for a proxy running jobs, also the proxy's CPU per job in it."""
    proxy = ctx.proxies.get(target)
    if proxy is None or flags.get("mode") != "jobs":
        return ctx.client(target, **flags)
    cpu0 = procs.cpu_seconds(proxy.proc.pid)
    result = ctx.client(target, **flags)
    if result.get("jobs"):
        result["cpu_us_per_job"] = (procs.cpu_seconds(proxy.proc.pid) - cpu0) / result["jobs"] * 1e6
    return result


def _brief(bench: ClientBench, result: dict[str, Any]) -> str:
    return ", ".join(f"{m.unit} {result[m.key]:.1f}" for m in bench.metrics)


def compare_runs(
    runs: dict[str, list[dict[str, Any]]], metrics: tuple[Metric, ...]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per target and metric: medians, and the per-round ratio (or time added) against
    the direct run of the same round."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for target, target_runs in runs.items():
        if target == DIRECT:
            continue
        out[target] = {}
        for m in metrics:
            direct = [run[m.key] for run in runs[DIRECT]]
            mine = [run[m.key] for run in target_runs]
            ratios = [b / a if a else 0.0 for a, b in zip(direct, mine, strict=True)]
            added = [b - a for a, b in zip(direct, mine, strict=True)]
            out[target][m.key] = {
                "unit": m.unit,
                "latency": m.latency,
                "direct": statistics.median(direct),
                "value": statistics.median(mine),
                "ratio": statistics.median(ratios),
                "added": statistics.median(added),
                "ratios": ratios,
                "added_per_round": added,
            }
    return out


# What "flat after warm-up" means: after the first WARMUP_SHARE of the jobs, RSS may
# grow by at most FLAT_GROWTH of itself or FLAT_SLACK bytes, whichever is larger.
CHUNKS = 10
WARMUP_CHUNKS = 2
FLAT_GROWTH = 0.05
FLAT_SLACK = 2 * MiB


def run_resources(
    ctx: Context, target: str, flags: dict[str, object] | None = None
) -> dict[str, Any]:
    """Sidecar CPU per job and resident memory over `resource_jobs` lifecycles at
    concurrency 16 (with the client's `flags`), sampled after each tenth."""
    pid = ctx.proxies[target].proc.pid
    per_chunk = max(1, ctx.profile.resource_jobs // CHUNKS)
    rss = [procs.rss_bytes(pid)]
    cpu0 = procs.cpu_seconds(pid)
    t0 = time.monotonic()
    jobs = 0
    for i in range(CHUNKS):
        result = ctx.client(
            target, mode="jobs", concurrency=16, jobs=per_chunk, **JOB_LOG, **(flags or {})
        )
        jobs += result["jobs"]
        rss.append(procs.rss_bytes(pid))
        ctx.log(f"  resources {flags or ''} {target}: {jobs} jobs, RSS {rss[-1] / MiB:.1f} MiB")
        if i == WARMUP_CHUNKS - 1:
            warm_rss = rss[-1]
    cpu = procs.cpu_seconds(pid) - cpu0
    growth = rss[-1] - warm_rss
    return {
        "jobs": jobs,
        "seconds": time.monotonic() - t0,
        "cpu_seconds": cpu,
        "cpu_seconds_per_1000_jobs": cpu / jobs * 1000,
        "cpu_us_per_job": cpu / jobs * 1e6,
        "rss_bytes": rss[-1],
        "rss_mib": rss[-1] / MiB,
        "rss_samples_mib": [round(b / MiB, 2) for b in rss],
        "rss_after_warmup_mib": warm_rss / MiB,
        "rss_growth_after_warmup_mib": growth / MiB,
        "rss_flat_limit_mib": max(FLAT_SLACK, FLAT_GROWTH * warm_rss) / MiB,
        "rss_flat": growth <= max(FLAT_SLACK, FLAT_GROWTH * warm_rss),
    }


def populate(ctx: Context, target: str) -> None:
    """Enough jobs for every outcome of the mix, so every series is present."""
    ctx.client(target, mode="jobs", concurrency=4, jobs=200, **JOB_LOG)


OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def run_metrics_render(ctx: Context, target: str) -> dict[str, Any]:
    web = ctx.proxies[target].web
    out: dict[str, Any] = {}
    for fmt, accept in (("text", None), ("openmetrics", OPENMETRICS)):
        times, body = [], b""
        for _ in range(ctx.profile.metrics_gets):
            t0 = time.perf_counter()
            status, body = procs.http_get(web, "/metrics", accept)
            times.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise procs.BenchError(f"{target} /metrics answered {status}")
        times.sort()
        out[fmt] = {
            "gets": len(times),
            "p50_ms": statistics.median(times),
            "p90_ms": times[int(0.9 * (len(times) - 1))],
            "max_ms": times[-1],
            "bytes": len(body),
            "series": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
        }
    return out


def run_ready(ctx: Context, target: str) -> dict[str, Any]:
    times = []
    for i in range(ctx.profile.ready_starts):
        proxy = procs.launch_proxy(target, ctx.workdir, ctx.upstream, f"ready{i}")
        try:
            times.append(procs.wait_ready(proxy))
        finally:
            procs.stop(proxy.proc, proxy.web)
    return {"starts": len(times), "median_s": statistics.median(times), "max_s": max(times)}


_JOBS_TOTAL = re.compile(rb'^step_runner_jobs_total\{[^}]*result="(\w+)"[^}]*\} (\S+)', re.M)


def counted_jobs(web: str) -> Counter[str] | None:
    """step_runner_jobs_total by result, or None when the target exports no such series."""
    status, body = procs.http_get(web, "/metrics")
    if status != 200:
        return None
    found = _JOBS_TOTAL.findall(body)
    if not found:
        return None
    counts: Counter[str] = Counter()
    for result, value in found:
        counts[result.decode()] += int(float(value))
    return counts


def check_accounting(ctx: Context, target: str, timeout: float = 10.0) -> dict[str, Any]:
    """Whether the proxy counted exactly the jobs the client saw, by result: proof that
    classification and metric updates were on the measured path."""
    expected = {k: v for k, v in ctx.expected.get(target, Counter()).items() if v}
    web = ctx.proxies[target].web
    counted = counted_jobs(web)
    if counted is None:
        return {"checked": False, "expected": expected}
    deadline = time.monotonic() + timeout
    while dict(+counted) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        counted = counted_jobs(web) or Counter()
    return {
        "checked": True,
        "expected": expected,
        "counted": dict(+counted),
        "match": dict(+counted) == expected,
    }
