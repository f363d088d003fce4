"""`step-runner-exporter demo`: a simulated step-runner, the real sidecar in front of
it and a simulated GitLab Runner sending a realistic mix of jobs, all on this machine.

The terminal shows what the sidecar counted next to what the simulated Runner expects
(its own tally, computed independently of the classifier), refreshed while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from typing import TextIO

from prometheus_client import CollectorRegistry

from .app import Sidecar
from .classifier import ALL_FAILURES, CATEGORIES, RESULTS
from .config import parse_config
from .logs import setup_logging
from .simulator import JobRecord, SimulatedStepRunner, Tally, run_forever, run_jobs

REFRESH_SECONDS = 1.0
SHUTDOWN_GRACE = 5.0


def counted(registry: CollectorRegistry) -> tuple[dict[str, int], Counter[tuple[str, ...]]]:
    """What the sidecar exported: jobs by result, failures by their four labels."""
    results = {
        r: int(registry.get_sample_value("step_runner_jobs_total", {"result": r}) or 0)
        for r in RESULTS
    }
    failures: Counter[tuple[str, ...]] = Counter()
    for f in ALL_FAILURES:
        value = int(registry.get_sample_value("step_runner_job_failures_total", f.labels()) or 0)
        if value:
            failures[(f.failure_reason, f.source, f.kind, f.category)] = value
    return results, failures


def tally_counts(tally: Tally) -> tuple[dict[str, int], Counter[tuple[str, ...]]]:
    results = {r: tally.results.get(r, 0) for r in RESULTS}
    failures: Counter[tuple[str, ...]] = Counter({tuple(k): v for k, v in tally.failures.items()})
    return results, failures


def render(registry: CollectorRegistry, tally: Tally, elapsed: float, web: str) -> str:
    results, failures = counted(registry)
    expected_results, expected_failures = tally_counts(tally)
    total = sum(results.values())
    lines = [
        f"step-runner-exporter demo: {total} jobs classified in {elapsed:.0f}s"
        f" ({total / max(elapsed, 1e-9):.1f} jobs/s); metrics at http://{web}/metrics",
        "",
        f"{'result':<12}{'sidecar':>9}{'runner':>9}",
    ]
    lines += [f"{r:<12}{results[r]:>9}{expected_results[r]:>9}" for r in RESULTS]
    by_category = Counter[str]()
    for labels, n in failures.items():
        by_category[labels[3]] += n
    lines += ["", "failures by category: " + ", ".join(f"{c}={by_category[c]}" for c in CATEGORIES)]
    lines += [
        "",
        f"{'failure_reason':<23}{'source':<19}{'kind':<20}{'category':<16}{'sidecar':>8}{'runner':>8}",
    ]
    for labels in sorted(set(failures) | set(expected_failures)):
        reason, source, kind, category = labels
        lines.append(
            f"{reason:<23}{source:<19}{kind:<20}{category:<16}"
            f"{failures[labels]:>8}{expected_failures[labels]:>8}"
        )
    return "\n".join(lines)


async def _demo(
    jobs: int, concurrency: int, web_listen_address: str, seed: int, out: TextIO
) -> int:
    workdir = tempfile.mkdtemp(prefix="sre-demo-", dir="/tmp")
    try:
        async with SimulatedStepRunner(f"unix://{workdir}/step-runner.sock") as sim:
            config = parse_config(
                {
                    "listen": f"unix://{workdir}/sidecar.sock",
                    "upstream": sim.listen_address,
                    "web": {"listen_address": web_listen_address},
                    "labels": {"runner": "demo"},
                    "shutdown": {"grace_period": SHUTDOWN_GRACE, "final_scrape_wait": 0},
                },
                source="<demo>",
            )
            sidecar = Sidecar(config)
            await sidecar.start()
            assert sidecar.web is not None
            web = f"{sidecar.web.host}:{sidecar.web.port}"
            return await _drive(
                sidecar, f"unix://{workdir}/sidecar.sock", jobs, concurrency, seed, web, out
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _drive(
    sidecar: Sidecar, target: str, jobs: int, concurrency: int, seed: int, web: str, out: TextIO
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    live = Tally()
    started = time.monotonic()
    tty = out.isatty()

    def on_job(record: JobRecord) -> None:
        live.add(record)

    async def refresh() -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            text = render(sidecar.registry, live, time.monotonic() - started, web)
            if tty:
                out.write("\x1b[H\x1b[J" + text + "\n\n(Ctrl-C to stop)\n")
            else:
                out.write(text.splitlines()[0] + "\n")
            out.flush()

    refresher = loop.create_task(refresh())
    try:
        if jobs:
            runner = loop.create_task(
                run_jobs(target, jobs, concurrency=concurrency, seed=seed, on_job=on_job)
            )
            stopper = loop.create_task(stop.wait())
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not runner.done():
                runner.cancel()  # Ctrl-C: its jobs' channels close as it unwinds
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        else:
            await run_forever(
                target, stop, concurrency=concurrency, seed=seed, pause=0.05, on_job=on_job
            )
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
    last_job = time.monotonic()
    # Every simulated job has closed its channel, so the grace period is only waited
    # for a connection something else still holds open.
    await sidecar.stop(grace=SHUTDOWN_GRACE, final_scrape_wait=0)
    stopped_after = time.monotonic() - last_job
    text = render(sidecar.registry, live, time.monotonic() - started, web)
    match = counted(sidecar.registry) == tally_counts(live)
    out.write(("\x1b[H\x1b[J" if tty else "") + text + "\n\n")
    verdict = "equal" if match else "differ from"
    out.write(
        f"tally match: {'yes' if match else 'NO'}: the sidecar's counters {verdict} "
        f"the simulated Runner's own tally of {len(live.jobs)} jobs\n"
        f"stopped {stopped_after:.2f}s after the last job\n"
    )
    out.flush()
    return 0 if match else 1


def run_demo(
    *,
    jobs: int = 0,
    concurrency: int = 8,
    web_listen_address: str = "127.0.0.1:9854",
    seed: int | None = None,
) -> int:
    # Job log lines would scroll the live summary away; warnings still show.
    setup_logging("warning", "text")
    seed = int(time.time()) if seed is None else seed
    coro = _demo(jobs, concurrency, web_listen_address, seed, sys.stdout)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
