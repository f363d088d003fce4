"""What was behind a one-off miss of the monitoring end-to-end test (issue 10, item 4):
`sum(grpc_server_handled_total)` 794 against the 795 calls the simulated Runner made.

In the connection_drop scenario the fault relay cuts the connection under Run. grpc-core
fails the connection's calls before its load balancer learns the connection is gone, so
a Close started at once was put on the dead connection and failed UNAVAILABLE without
reaching the sidecar or step-runner; the tally still counted it as a call made (and
the scenario accepted `Close:Unavailable` as a variant). Here it happened to 52 of 300
such jobs run one at a time against the simulator and to 3 of 300 through the sidecar.
grpc-go, Runner's library, retries such a call on a new connection; the simulated Runner
now waits until its channel has noticed the loss, and its Close always reconnects.
"""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from exporter.simulator import SCENARIOS, run_jobs

from .harness import async_wait_until, run_async, simulated_step_runner
from .sidecar import running_sidecar, target

pytestmark = pytest.mark.integration

JOBS = 150
CALLS = SCENARIOS["connection_drop"].calls  # Run:Unavailable, then Close:NotFound


def _handled(registry: CollectorRegistry) -> Counter[str]:
    found: Counter[str] = Counter()
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "grpc_server_handled_total" and s.value:
                found[f"{s.labels['grpc_method']}:{s.labels['grpc_code']}"] += int(s.value)
    return found


def test_close_after_a_cut_connection_reaches_step_runner_and_the_sidecar() -> None:
    async def main() -> None:
        async with (
            simulated_step_runner() as sim,
            running_sidecar(sim.listen_address) as sidecar,
        ):
            # One job at a time, where the race was most frequent.
            mix = {"connection_drop": 1.0}
            direct = await run_jobs(sim.address, JOBS, concurrency=1, mix=mix, seed=1)
            assert Counter(job.call_labels for job in direct.jobs) == {CALLS: JOBS}
            assert sim.stats.calls["Close"] == JOBS

            proxied = await run_jobs(target(sidecar), JOBS, concurrency=1, mix=mix, seed=2)
            assert Counter(job.call_labels for job in proxied.jobs) == {CALLS: JOBS}
            # Every call the client made was seen and ended by the sidecar.
            await async_wait_until(
                lambda: _handled(sidecar.registry) == proxied.codes,
                what=f"the sidecar to end the calls {dict(proxied.codes)}",
            )
            assert sim.drops == 2 * JOBS
            assert sim.stats.calls["Close"] == 2 * JOBS

    run_async(main(), timeout=120)
