"""The benchmark's verdicts: every target on every workload it applies to, and the
worst of them per target (what the README shows), never the best."""

from __future__ import annotations

from typing import Any

from benchmarks import measure, report


def _bench(
    metrics: tuple[measure.Metric, ...], direct: dict[str, float], sidecar: dict[str, float]
) -> dict[str, Any]:
    """A workload's results as the harness records them, from one round's runs."""
    return {"compare": measure.compare_runs({"direct": [direct], "sidecar": [sidecar]}, metrics)}


def _results() -> dict[str, Any]:
    unary = (measure.P50, measure.P99)
    client: dict[str, Any] = {
        "status_c1": _bench(unary, {"p50_us": 100, "p99_us": 200}, {"p50_us": 140, "p99_us": 290}),
        "status_c1_nodl": _bench(
            unary, {"p50_us": 100, "p99_us": 200}, {"p50_us": 190, "p99_us": 800}
        ),
    }
    for name, ratio in zip(report.JOBS_C16, (0.8, 0.7, 0.3, 0.9), strict=True):
        client[name] = {
            **_bench((measure.JOBS,), {"jobs_per_s": 1000}, {"jobs_per_s": 1000 * ratio}),
            "cpu_us_per_job": {"sidecar": 100.0 + 100 * ratio},
        }
    return {"targets": ["direct", "sidecar"], "client": client}


def test_every_workload_a_check_names_is_measured() -> None:
    names = {b.name for b in measure.client_benches(measure.FULL)}
    assert set(report.UNARY) | set(report.JOBS_C16) <= names
    assert set(report.RESOURCES) == set(measure.RESOURCE_SHAPES) <= set(measure.OTHER_BENCHES)


def test_each_target_is_checked_on_every_workload() -> None:
    checks = report.evaluate(_results())
    jobs = [c for c in checks if c["group"] == "jobs c16 vs direct"]
    assert [round(c["value"], 6) for c in jobs] == [0.8, 0.7, 0.3, 0.9]
    assert [c["pass"] for c in jobs] == [True, False, False, True]
    cpu = [c for c in checks if c["group"] == "CPU per job"]
    assert len(cpu) == len(report.JOBS_C16)  # jobs_c1 and resources did not run


def test_the_summary_shows_the_worst_workload_per_target() -> None:
    worst = {c["group"]: c for c in report.worst(report.evaluate(_results()))}
    assert worst["jobs c16 vs direct"]["check"] == "jobs_c16_shared jobs/s vs direct"
    assert worst["unary p50 added"]["check"] == "status_c1_nodl p50 added"
    assert worst["unary p99 added"]["value"] == 600.0
    assert not worst["unary p99 added"]["pass"]
    assert round(worst["CPU per job"]["value"], 6) == 190.0  # jobs_c16_shared_nodl, the most CPU
    table = report.markdown({**_results(), "checks": report.evaluate(_results())})
    assert "| jobs c16 vs direct: `jobs_c16_shared jobs/s vs direct` | 0.30 x" in table
    assert "MISSED (-0.45 x)" in table
