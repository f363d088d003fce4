"""The demo's two halves as separate processes, so Compose can run the real sidecar
between them: a simulated step-runner serving on a socket, and a simulated GitLab Runner
sending a steady mix of jobs to another.

    python demo_roles.py step-runner --listen unix:///run/step-runner/upstream/step-runner.sock
    python demo_roles.py traffic --target unix:///run/step-runner/step-runner.sock

Both run from the sidecar's image (the simulator ships in the `exporter` package) and stop
cleanly on SIGTERM, which is what `docker compose down` sends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
from collections import Counter
from collections.abc import Sequence

from exporter.simulator import DEFAULT_MIX, SimulatedStepRunner, run_job


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_step_runner(listen: str) -> None:
    stop = _stop_on_signals()
    async with SimulatedStepRunner(listen):
        print(f"simulated step-runner listening on {listen}", flush=True)
        await stop.wait()


async def send_traffic(target: str, *, jobs: int, concurrency: int, pause: float, seed: int) -> int:
    """Run jobs until stopped (or `jobs` of them when it is above 0); returns how many ran.

    Unlike the simulator's run_forever this keeps no per-job records, so a demo left
    running for days does not grow."""
    stop = _stop_on_signals()
    rng = random.Random(seed)
    scenarios, weights = list(DEFAULT_MIX), list(DEFAULT_MIX.values())
    results: Counter[str] = Counter()
    numbers = iter(range(1_000_000 + seed * 10_000_000, sys.maxsize))
    started = 0

    def take() -> bool:
        # Counted when a job starts, not when it ends, so exactly `jobs` jobs run.
        nonlocal started
        if stop.is_set() or 0 < jobs <= started:
            return False
        started += 1
        return True

    async def worker() -> None:
        while take():
            (scenario,) = rng.choices(scenarios, weights=weights)
            record = await run_job(target, scenario, str(next(numbers)))
            results[record.expected.result] += 1
            if results.total() % 100 == 0:
                print(f"jobs sent: {dict(results)}", flush=True)
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    print(f"jobs sent: {dict(results)}", flush=True)
    return results.total()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    roles = parser.add_subparsers(dest="role", required=True)
    server = roles.add_parser("step-runner", help="serve a simulated step-runner")
    server.add_argument("--listen", required=True, help="unix:///abs/path.sock or HOST:PORT")
    traffic = roles.add_parser("traffic", help="send simulated GitLab Runner jobs")
    traffic.add_argument("--target", required=True, help="unix:///abs/path.sock or HOST:PORT")
    traffic.add_argument("--jobs", type=int, default=0, help="stop after N jobs (0: never)")
    traffic.add_argument("--concurrency", type=int, default=4)
    traffic.add_argument("--pause", type=float, default=1.0, help="seconds between a worker's jobs")
    traffic.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.role == "step-runner":
        asyncio.run(serve_step_runner(args.listen))
        return 0
    asyncio.run(
        send_traffic(
            args.target,
            jobs=args.jobs,
            concurrency=args.concurrency,
            pause=args.pause,
            seed=args.seed,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
