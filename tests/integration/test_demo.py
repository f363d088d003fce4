"""`step-runner-exporter demo` as a newcomer runs it (issue 10, item 9): a clean terminal
(no traceback, no asyncio error log) and a prompt exit after the last job.

Behind the noise: the fault relay wrote an EOF to a connection it had just cut (uvloop
raises there, asyncio does not), and its tasks died with "Task exception was never
retrieved ... handler is closed". Behind the wait: a log stream the simulated Runner
cancels left grpc.aio's response generator suspended, in a reference cycle with its
call, and until the garbage collector came by the call held its connection open
although the channel was closed, so the sidecar waited out its grace period for it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.demo import SHUTDOWN_GRACE
from exporter.simulator import run_jobs

from .harness import async_wait_until, run_async, simulated_step_runner
from .sidecar import running_sidecar, target

pytestmark = pytest.mark.integration

COMMAND = str(Path(sys.executable).with_name("step-runner-exporter"))
# Enough jobs that connection_drop (0.5% of the mix), whose relay tasks printed the
# tracebacks, and client_cancel (1%), whose connections outlived their channels, occur.
JOBS = 1000


def test_the_demo_prints_no_error_and_stops_right_after_the_last_job() -> None:
    result = subprocess.run(
        [COMMAND, "demo", "--jobs", str(JOBS), "--seed", "1",
         "--web.listen-address", "127.0.0.1:0"],
        check=False, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # The demo logs at warning level: a clean run says nothing on stderr at all.
    assert result.stderr == "", result.stderr[:4000]
    assert f"tally of {JOBS} jobs" in result.stdout
    assert "tally match: yes" in result.stdout
    match = re.search(r"stopped (\d+\.\d+)s after the last job", result.stdout)
    assert match is not None, result.stdout[-2000:]
    # With nothing open the grace period is not waited.
    assert float(match.group(1)) < SHUTDOWN_GRACE / 2, match.group(0)


def test_no_connection_outlives_a_job_whose_log_stream_the_runner_cancelled() -> None:
    async def main() -> None:
        async with (
            simulated_step_runner() as sim,
            running_sidecar(sim.listen_address) as sidecar,
        ):
            assert sidecar.splice is not None
            splice = sidecar.splice
            tally = await run_jobs(
                target(sidecar), 200, concurrency=8, mix={"client_cancel": 1.0}, seed=4
            )
            assert tally.mismatches == []
            # Every channel is closed: their connections end within moments, not at the
            # next garbage collection.
            await async_wait_until(
                lambda: splice.active_connections == 0,
                within=SHUTDOWN_GRACE / 2,
                what="every connection to end",
            )

    run_async(main(), timeout=120)
