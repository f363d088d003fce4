"""Soak: many simulated jobs through a real `step-runner-exporter serve` process, with
mixed outcomes and periodic step-runner restarts.

    python -m tests.soak --jobs 100000     # the full soak (several minutes)
    python -m tests.soak --short           # a few seconds, run by the test suite

The simulated step-runner and the simulated GitLab Runner run in this process; the
sidecar runs in its own, so its resident memory is measured alone. Step-runner is
restarted between batches while no job is in flight, so the simulated Runner's tally
stays the exact expectation (faults in the middle of calls are tests/integration/
test_faults.py's business). Jobs keep flowing through the same sidecar process.

Prints the RSS curve and exits non-zero unless every counter equals the tally, the
tracked-job gauge stayed within `jobs.max_tracked`, and (full mode) resident memory
after warm-up grew less than --rss-growth-limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from exporter.classifier import RESULTS
from exporter.simulator import SimulatedStepRunner, Tally, run_jobs
from tests.integration.harness import log_fields
from tests.integration.sidecar import ServeProcess, serve_argv, serve_process

COMMAND = str(Path(sys.executable).with_name("step-runner-exporter"))
FAILURE_LABELS = ("failure_reason", "source", "kind", "category")


@dataclass
class Totals:
    """The tallies of every batch, without the per-job records (100,000 of those, each
    with its log, would make this process the thing that grows)."""

    results: Counter[str] = field(default_factory=Counter)
    failures: Counter[tuple[str, ...]] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)  # calls made, by method
    mismatches: int = 0
    # Close calls that failed Unavailable right after a dropped connection: the client's
    # channel may still be in reconnect backoff, and then the call fails inside the
    # client without ever reaching the wire (or the sidecar).
    maybe_unsent: int = 0

    def add(self, tally: Tally) -> None:
        self.results.update(tally.results)
        self.failures.update({tuple(k): v for k, v in tally.failures.items()})
        for label, count in tally.codes.items():
            self.methods[label.partition(":")[0]] += count
        self.mismatches += len(tally.mismatches)
        self.maybe_unsent += sum(
            1 for job in tally.jobs if job.call_labels == ("Run:Unavailable", "Close:Unavailable")
        )

    def calls_seen(self, seen: Counter[str]) -> bool:
        """Whether the sidecar saw every call the client made that reached the wire."""
        made = self.methods
        unsent = made["Close"] - seen["Close"]
        others_equal = all(seen[m] == made[m] for m in set(made) | set(seen) if m != "Close")
        return others_equal and 0 <= unsent <= self.maybe_unsent

    @property
    def calls(self) -> int:
        return sum(self.methods.values())

    @property
    def jobs(self) -> int:
        return sum(self.results.values())


@dataclass(frozen=True)
class Exported:
    results: dict[str, int]
    failures: Counter[tuple[str, ...]]
    started: Counter[str]  # by grpc_method
    handled: Counter[str]
    tracked: int
    evicted: int
    http2_errors: int
    upstream_up: int


def scrape(url: str) -> Exported:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    results: dict[str, int] = dict.fromkeys(RESULTS, 0)
    failures: Counter[tuple[str, ...]] = Counter()
    sums: Counter[str] = Counter()
    started: Counter[str] = Counter()
    handled: Counter[str] = Counter()
    http2 = 0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            value = int(s.value)
            if s.name == "step_runner_jobs_total":
                results[s.labels["result"]] = value
            elif s.name == "step_runner_job_failures_total" and value:
                failures[tuple(s.labels[k] for k in FAILURE_LABELS)] = value
            elif s.name == "step_runner_exporter_decode_errors_total":
                http2 += value if s.labels["message"] == "http2" else 0
            elif s.name == "grpc_server_started_total" and value:
                started[s.labels["grpc_method"]] += value
            elif s.name == "grpc_server_handled_total" and value:
                handled[s.labels["grpc_method"]] += value
            elif s.name in (
                "step_runner_exporter_tracked_jobs",
                "step_runner_exporter_evicted_jobs_total",
                "step_runner_exporter_upstream_up",
            ):
                sums[s.name] += value
    return Exported(
        results,
        failures,
        started,
        handled,
        sums["step_runner_exporter_tracked_jobs"],
        sums["step_runner_exporter_evicted_jobs_total"],
        http2,
        sums["step_runner_exporter_upstream_up"],
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def sidecar_process(directory: Path, upstream: str, max_tracked: int) -> Iterator[ServeProcess]:
    """The sidecar, its web endpoint on a port it picks; its log kept in the directory."""
    config = directory / "config.yml"
    config.write_text(
        f"listen: unix://{directory}/sidecar.sock\n"
        f"upstream: {upstream}\n"
        f"jobs: {{max_tracked: {max_tracked}}}\n"
        "shutdown: {grace_period: 5s, final_scrape_wait: 0s}\n"
    )
    argv = serve_argv(config=config)
    with serve_process(argv, log_file=directory / "sidecar.log") as sidecar:
        yield sidecar


async def soak(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="srx-soak-", dir="/tmp"))
    try:
        async with SimulatedStepRunner(f"unix://{directory}/sr.sock", relay=True) as sim:
            with sidecar_process(directory, sim.listen_address, args.max_tracked) as sidecar:
                status = await _run(args, sim, sidecar.process, sidecar.listen, sidecar.url())
        print_sidecar_log(directory / "sidecar.log")
        return status
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def print_sidecar_log(path: Path) -> None:
    """Anything the sidecar said above info (a line of no level, a traceback, too)."""
    messages: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        fields = log_fields(line)
        if line.strip() and fields.get("level") not in ("debug", "info"):
            messages[str(fields.get("msg", line.strip()))] += 1
    print(f"sidecar warnings/errors: {sum(messages.values())}")
    for message, count in messages.most_common(10):
        print(f"  {count:>6} {message}")


async def _run(
    args: argparse.Namespace,
    sim: SimulatedStepRunner,
    proc: subprocess.Popen[bytes],
    target: str,
    metrics_url: str,
) -> int:
    print(
        f"soak: {args.jobs} jobs, concurrency {args.concurrency}, step-runner restarted every "
        f"{args.restart_every} jobs, jobs.max_tracked {args.max_tracked}",
        flush=True,
    )
    print(f"{'jobs':>8} {'seconds':>8} {'jobs/s':>7} {'tracked':>8} {'rss_mib':>8} {'exported':>9}")
    totals = Totals()
    curve: list[tuple[int, float]] = [(0, rss_mib(proc.pid))]
    max_tracked_seen = restarts = 0
    started = time.monotonic()
    batch_number = 0
    diverged = False
    while totals.jobs < args.jobs:
        batch = min(args.batch, args.jobs - totals.jobs)
        tally = await run_jobs(target, batch, concurrency=args.concurrency, seed=batch_number)
        batch_number += 1
        totals.add(tally)
        exported = await asyncio.to_thread(_settled, metrics_url, totals)
        if not totals.calls_seen(exported.started) and not diverged:
            diverged = True  # the first batch where a call went unseen (or was doubled)
            print(f"  calls differ after {totals.jobs} jobs: sidecar {dict(exported.started)}")
            print(f"  {'':>20} simulated Runner {dict(totals.methods)}")
            print(f"  {'':>20} simulated step-runner {dict(sim.stats.calls)}")
        max_tracked_seen = max(max_tracked_seen, exported.tracked)
        curve.append((totals.jobs, rss_mib(proc.pid)))
        elapsed = time.monotonic() - started
        print(
            f"{totals.jobs:>8} {elapsed:>8.1f} {totals.jobs / elapsed:>7.1f} "
            f"{exported.tracked:>8} {curve[-1][1]:>8.1f} {sum(exported.results.values()):>9}",
            flush=True,
        )
        if totals.jobs < args.jobs and totals.jobs % args.restart_every == 0:
            await sim.stop()  # between batches: no call is in flight
            await sim.start()
            restarts += 1

    exported = await asyncio.to_thread(_settled, metrics_url, totals)
    return report(args, totals, exported, curve, max_tracked_seen, restarts, sim.drops)


def _settled(url: str, totals: Totals) -> Exported:
    """The last calls' ends travel through the sidecar a moment after the client saw
    them; wait (bounded) until the exported counts have caught up."""
    deadline = time.monotonic() + 10
    while True:
        exported = scrape(url)
        # Every call's HEADERS passed the sidecar before its client saw an answer, so
        # `started` is complete already; `handled` may trail by the last trailers.
        caught_up = sum(exported.results.values()) >= totals.jobs
        if caught_up and exported.started == exported.handled:
            return exported
        if time.monotonic() > deadline:
            return exported
        time.sleep(0.05)  # polling another process's counters, with a deadline


def report(
    args: argparse.Namespace,
    totals: Totals,
    exported: Exported,
    curve: list[tuple[int, float]],
    max_tracked_seen: int,
    restarts: int,
    drops: int,
) -> int:
    ok = True
    want_results = {r: totals.results.get(r, 0) for r in RESULTS}
    exact = (
        exported.results == want_results
        and exported.failures == totals.failures
        and exported.started == exported.handled
        and totals.calls_seen(exported.started)
        and totals.mismatches == 0
        and exported.http2_errors == 0
    )
    print(f"restarts: {restarts}; connections cut by the fault relay: {drops}")
    if exact:
        print(
            "counts exact: "
            + " ".join(f"{r}={n}" for r, n in want_results.items())
            + f"; {len(totals.failures)} failure label sets equal; "
            f"calls started=handled={sum(exported.started.values())}"
        )
    else:
        ok = False
        print(f"COUNTS DIFFER: exported {exported}\n  expected results {want_results}")
        print(f"  expected failures {dict(totals.failures)}; calls {dict(totals.methods)}")
        print(f"  simulated-runner mismatches {totals.mismatches}")
    print(f"tracked jobs: max {max_tracked_seen} (jobs.max_tracked {args.max_tracked})")
    if max_tracked_seen > args.max_tracked:
        ok = False
    warm = next((i for i, (jobs, _) in enumerate(curve) if jobs >= args.warm_up), len(curve) - 1)
    base, last = curve[warm][1], curve[-1][1]
    growth = (last - base) / base
    print("rss curve (jobs:MiB): " + " ".join(f"{jobs}:{mib:.1f}" for jobs, mib in curve))
    print(
        f"rss after warm-up ({curve[warm][0]} jobs): {base:.1f} -> {last:.1f} MiB "
        f"({growth:+.1%}, peak {max(m for _, m in curve[warm:]):.1f})"
    )
    if not args.short and growth > args.rss_growth_limit:
        ok = False
        print(f"RSS GREW more than {args.rss_growth_limit:.0%} after warm-up")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=5000, help="jobs between samples")
    parser.add_argument("--restart-every", type=int, default=10_000)
    parser.add_argument("--max-tracked", type=int, default=10_000)
    parser.add_argument(
        "--warm-up",
        type=int,
        default=0,
        help="jobs before RSS must stay flat (default 2 x max-tracked)",
    )
    parser.add_argument("--rss-growth-limit", type=float, default=0.10)
    parser.add_argument("--short", action="store_true", help="a few seconds, for the test suite")
    args = parser.parse_args(argv)
    if args.short:
        args.jobs, args.batch, args.restart_every, args.max_tracked = 600, 100, 200, 150
        args.concurrency = 8
    if args.restart_every % args.batch:
        parser.error("--restart-every must be a multiple of --batch")
    args.warm_up = args.warm_up or 2 * args.max_tracked
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
