"""Regression guard for the sidecar's cost (issue 5): a small run of the real benchmark
(Go client, Go step-runner stand-in, the sidecar as a subprocess) that fails only on
gross regressions, never on the noise of a shared 2-core machine.

A measurement fails only when every interleaved round puts the sidecar below
MIN_RATIO of the direct connection, so one unlucky round cannot fail it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from benchmarks import build, run
from tests.integration.docker_daemon import unavailable

pytestmark = pytest.mark.integration

MIN_RATIO = 0.3
# Three chances for each measurement to show the sidecar is not grossly slow.
ROUNDS = 3
# Gross: the target is 1 s; a sidecar that needs this long to answer /-/ready is broken.
MAX_READY_S = 10.0
GUARDED = (
    ("status_c1", "calls_per_s"),
    ("logs_32k", "mb_per_s"),
    ("jobs_c16", "jobs_per_s"),
    ("jobs_c16_shared_nodl", "jobs_per_s"),
)


def _skip_reason() -> str | None:
    missing = build.missing_prerequisites()
    if missing:
        return f"Go benchmark toolchain missing ({', '.join(missing)}): {build.INSTALL_HINT}"
    if importlib.util.find_spec("exporter.cli") is None:
        return "the sidecar's command line (exporter/cli.py) does not exist yet"
    return None


def benchmark(tmp_path: Path, rounds: int, only: str) -> tuple[str, dict[str, Any]]:
    """A quick run of the real benchmark (`only` its benches, `rounds` interleaved
    rounds): what it printed and its JSON results. No Docker daemon (only a docker
    bench needs one) is unavailable(), any other failure fails the test."""
    out = tmp_path / "bench.json"
    args = ["--quick", "--rounds", str(rounds), "--only", only, "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=build.REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if done.returncode == run.EXIT_NO_DOCKER:
        unavailable(next(line for line in done.stderr.splitlines() if "FAILED" in line))
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout}\n{done.stderr}"
    results: dict[str, Any] = json.loads(out.read_text())
    return done.stdout, results


def assert_not_grossly_slower(
    results: dict[str, Any], guarded: Sequence[tuple[str, str]], rounds: int, proxy: str
) -> None:
    """Each guarded (bench, metric) ran `rounds` rounds through the sidecar (`proxy`
    names it in the message) and reached MIN_RATIO of direct in at least one."""
    for bench, metric in guarded:
        ratios = results["client"][bench]["compare"]["sidecar"][metric]["ratios"]
        assert len(ratios) >= rounds
        assert max(ratios) >= MIN_RATIO, (
            f"{bench} {metric}: {proxy}/direct {ratios} in every round below {MIN_RATIO}"
        )


def test_sidecar_is_not_grossly_slower_than_direct(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    only = ",".join([bench for bench, _ in GUARDED] + ["ready"])
    stdout, results = benchmark(tmp_path, ROUNDS, only)
    assert "targets of issues 5 and 11:" in stdout
    assert results["machine"]["cores"] and results["machine"]["cpu_model"]
    assert_not_grossly_slower(results, GUARDED, ROUNDS, "sidecar")

    # Classification and metric updates were on the measured path: the sidecar counted
    # exactly the jobs the Go client ran, by result.
    accounting = results["accounting"]["sidecar"]
    assert accounting["checked"], "the sidecar exports no step_runner_jobs_total"
    assert accounting["match"], accounting
    assert set(accounting["counted"]) == {"success", "failed", "cancelled"}

    assert results["ready"]["sidecar"]["max_s"] < MAX_READY_S


# The Docker route (issue 9): a test dockerd, the docker tap in front of it, the Go
# client dialing through one exec per job. The daemon's own work dominates that route.
DOCKER_GUARDED = (("docker_jobs", "jobs_per_s"), ("docker_logs_4k", "mb_per_s"))
# Fewer rounds than above: each job is an exec in the daemon, a round takes seconds.
DOCKER_ROUNDS = 2


def test_docker_tap_is_not_grossly_slower_than_direct(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    _, results = benchmark(tmp_path, DOCKER_ROUNDS, "docker")
    assert_not_grossly_slower(results, DOCKER_GUARDED, DOCKER_ROUNDS, "tap")
    accounting = results["accounting"]["sidecar (docker tap)"]
    assert accounting["checked"] and accounting["match"], accounting
