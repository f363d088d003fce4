"""promtool unit tests, one file per rule group: each alert has cases that fire and
cases that must not."""

from __future__ import annotations

from typing import Any

from exporter.classifier import ALL_FAILURES, GRPC_INTERNAL, UNKNOWN_FAILURE, Failure

from . import rules as r
from .promtool import (
    JOB,
    TestCase,
    alert_test,
    expr_test,
    failures,
    fired,
    jobs,
    selector,
    series,
    target,
    test_file,
    traffic,
)
from .settings import SIDECAR_SELECTOR


def _failure(kind: str) -> Failure:
    return next(f for f in ALL_FAILURES if f.kind == kind)


UNAVAILABLE = _failure("Unavailable")
STEP_FAILURE = _failure("step_failure")
TIMEOUT = _failure("timeout")
KIND_INTERNAL = _failure("internal")

R1 = target("runner-1")
R2 = target("runner-2")


def _slo(runner: str, category: str = "infrastructure") -> dict[str, str]:
    return {"job": JOB, "runner": runner, **SIDECAR_SELECTOR, "category": category}


def _rounded(window: str, runner: str, category: str) -> tuple[str, str]:
    expr = f'round({r.failure_ratio(window)}{{category="{category}"}}, 0.0001)'
    return expr, selector("", _slo(runner, category))


def _per_hour(expr: str) -> str:
    # promtool compares floats exactly: compare rounded hourly rates instead.
    return f"round({expr} * 3600, 0.001)"


def _hourly(rate_per_second: float) -> float:
    return round(rate_per_second * 3600, 3)


def _job_rates_cases() -> list[TestCase]:
    b = target("runner-1", "runner-1b:9854")
    steps = 420
    # Instance A: 10 jobs a minute (6 ok, 4 failed) for 7h; instance B of the same
    # runner: 10 successes a minute. A cancelled job a minute on A from 400m on gives
    # each window a different increase, so a swapped window shows.
    input_series = [
        jobs(f"0+6x{steps}", "success", R1),
        jobs(f"0+4x{steps}", "failed", R1),
        failures(f"0+2x{steps}", UNAVAILABLE, R1),
        failures(f"0+1x{steps}", STEP_FAILURE, R1),
        failures(f"0+1x{steps}", UNKNOWN_FAILURE, R1),
        failures(f"0x{steps}", TIMEOUT, R1),
        jobs("0x400 1+1x19", "cancelled", R1),
        jobs(f"0+10x{steps}", "success", b),
        failures(f"0x{steps}", UNAVAILABLE, b),
    ]
    increases = {"5m": (5, 300), "30m": (20, 1800), "1h": (20, 3600), "6h": (20, 21600)}
    tests = []
    for window, (increase, seconds) in increases.items():
        cancelled = selector("", {**R1, "result": "cancelled"})
        rate = f'{r.jobs_rate(window)}{{result="cancelled"}}'
        tests.append(expr_test("420m", _per_hour(rate), (cancelled, _hourly(increase / seconds))))
        infra = selector("", {**R1, **UNAVAILABLE.labels()})
        rate = (
            f'{r.failures_rate(window)}{{instance="{R1["instance"]}", category="infrastructure"}}'
        )
        tests.append(expr_test("420m", _per_hour(rate), (infra, _hourly(2 / 60))))
    # 20 jobs a minute on runner-1 (both instances): 2 infrastructure, 1 script and 1
    # unknown failure.
    tests.append(
        expr_test(
            "60m",
            f"round({r.failure_ratio('5m')}, 0.0001)",
            (selector("", _slo("runner-1")), 0.1),
            (selector("", _slo("runner-1", "script")), 0.05),
            (selector("", _slo("runner-1", "unknown")), 0.05),
        )
    )
    tests.append(
        expr_test(
            "420m",
            f"round({r.failure_ratio('5m')}, 0.0001)",
            # Cancelled jobs count in the denominator: 21 jobs a minute now.
            (selector("", _slo("runner-1")), round(2 / 21, 4)),
            (selector("", _slo("runner-1", "script")), round(1 / 21, 4)),
            (selector("", _slo("runner-1", "unknown")), round(1 / 21, 4)),
        )
    )
    for window in ("30m", "1h", "6h"):
        expr, labels = _rounded(window, "runner-1", "infrastructure")
        tests.append(expr_test("60m", expr, (labels, 0.1)))
    return [
        {
            "name": "rates keep every label; ratios divide each category by all jobs of the runner",
            "interval": "1m",
            "input_series": input_series,
            "promql_expr_test": tests,
        }
    ]


def _job_rates_3d_cases() -> list[TestCase]:
    # 10-minute steps keep three days of input small.
    steps = 450
    input_series = [
        *traffic(R1, 100, UNAVAILABLE, 5, steps),
        jobs("0x420 1+1x29", "cancelled", R1),
    ]
    expr, labels = _rounded("3d", "runner-1", "infrastructure")
    return [
        {
            "name": "3d rates and ratio",
            "interval": "10m",
            "input_series": input_series,
            "promql_expr_test": [
                expr_test(
                    "75h",
                    _per_hour(f'{r.jobs_rate("3d")}{{result="cancelled"}}'),
                    (selector("", {**R1, "result": "cancelled"}), _hourly(30 / 259200)),
                ),
                expr_test(
                    "75h",
                    _per_hour(f'{r.jobs_rate("3d")}{{result="success"}}'),
                    (selector("", {**R1, "result": "success"}), _hourly(95 * 432 / 259200)),
                ),
                expr_test("75h", expr, (labels, round(5 * 432 / (100 * 432 + 30), 4))),
            ],
        }
    ]


FAST, SLOW = r.SLO_ALERTS.alerts


def _slo_cases() -> list[TestCase]:
    return [
        {
            "name": "10% infrastructure failures page; 5% only tickets",
            "interval": "1m",
            "input_series": [
                *traffic(R1, 10, UNAVAILABLE, 1, 70),
                *traffic(R2, 20, GRPC_INTERNAL, 1, 70),
            ],
            "alert_rule_test": [
                alert_test("1m", FAST),
                alert_test("60m", FAST, fired(FAST, _slo("runner-1"), "10%")),
                alert_test("10m", SLOW),
                alert_test(
                    "60m",
                    SLOW,
                    fired(SLOW, _slo("runner-1"), "10%"),
                    fired(SLOW, _slo("runner-2"), "5%"),
                ),
            ],
        },
        {
            "name": "the page resolves when the 5m window recovers, though the 1h one still burns",
            "interval": "1m",
            "input_series": [
                jobs("0+9x40 370+10x30", "success", R1),
                jobs("0+1x40 40x30", "failed", R1),
                failures("0+1x40 40x30", UNAVAILABLE, R1),
            ],
            "alert_rule_test": [
                alert_test("38m", FAST, fired(FAST, _slo("runner-1"), "10%")),
                alert_test("50m", FAST),
            ],
            "promql_expr_test": [
                expr_test("50m", *_rounded_sample("1h", 0.08)),
                expr_test("50m", *_rounded_sample("5m", 0.0)),
            ],
        },
        {
            "name": "three jobs an hour, all infrastructure failures, page nobody",
            "interval": "1m",
            "input_series": [
                jobs("0x19 1x19 2x19 3x19", "failed", R1),
                failures("0x19 1x19 2x19 3x19", UNAVAILABLE, R1),
                jobs("0x79", "success", R1),
            ],
            "alert_rule_test": [alert_test("64m", FAST), alert_test("64m", SLOW)],
            "promql_expr_test": [
                # Both windows are far over budget: only the traffic guard holds the page.
                expr_test("62m", *_rounded_sample("5m", 1.0)),
                expr_test("62m", *_rounded_sample("1h", 1.0)),
            ],
        },
        {
            "name": "1% over three days is a slow-burn ticket; 0.4% is within budget",
            "interval": "10m",
            "input_series": [
                *traffic(R1, 100, UNAVAILABLE, 1, 450),
                *traffic(R2, 250, UNAVAILABLE, 1, 450),
            ],
            "alert_rule_test": [
                alert_test("75h", SLOW, fired(SLOW, _slo("runner-1"), "1%")),
                alert_test("75h", FAST),
            ],
        },
    ]


def _rounded_sample(window: str, value: float) -> tuple[str, tuple[str, float]]:
    expr, labels = _rounded(window, "runner-1", "infrastructure")
    return expr, (labels, value)


PANICS, UNKNOWN = r.JOB_FAILURE_ALERTS.alerts


def _job_failure_cases() -> list[TestCase]:
    def panic(failure: Failure) -> dict[str, str]:
        return {**R1, "source": failure.source, "kind": failure.kind}

    return [
        {
            "name": "a step-runner panic or internal error is a ticket; other failures are not",
            "interval": "1m",
            "input_series": [
                failures("0x29 1x30", GRPC_INTERNAL, R1),
                failures("0x39 1x20", KIND_INTERNAL, R1),
                failures("0+1x60", STEP_FAILURE, R1),
                failures("0+1x60", UNAVAILABLE, R1),
            ],
            "alert_rule_test": [
                alert_test("25m", PANICS),
                alert_test("35m", PANICS, fired(PANICS, panic(GRPC_INTERNAL), "1")),
                alert_test("45m", PANICS, fired(PANICS, panic(KIND_INTERNAL), "1")),
                alert_test("55m", PANICS),
            ],
        },
        {
            "name": "10% unknown failures for 30m is a ticket; 0.5% is not",
            "interval": "1m",
            "input_series": [
                *traffic(R1, 10, UNKNOWN_FAILURE, 1, 70),
                *traffic(R2, 200, UNKNOWN_FAILURE, 1, 70),
            ],
            "alert_rule_test": [
                alert_test("20m", UNKNOWN),
                alert_test("45m", UNKNOWN, fired(UNKNOWN, _slo("runner-1", "unknown"), "10%")),
            ],
        },
        {
            "name": "twelve jobs an hour, all unknown, are below the traffic guard",
            "interval": "5m",
            "input_series": traffic(R2, 1, UNKNOWN_FAILURE, 1, 24),
            "alert_rule_test": [alert_test("110m", UNKNOWN)],
            "promql_expr_test": [
                expr_test(
                    "110m",
                    f'{r.failure_ratio("1h")}{{category="unknown"}}',
                    (selector(r.failure_ratio("1h"), _slo("runner-2", "unknown")), 1.0),
                )
            ],
        },
    ]


SCHEMA_DRIFT, DECODE_ERRORS = r.WIRE_FORMAT_ALERTS.alerts
REQUESTS = ("RunRequest", "FollowLogsRequest", "StatusRequest", "CloseRequest", "CancelRequest")


def _wire_format_cases() -> list[TestCase]:
    def counter(name: str, values: str, message: str) -> dict[str, str]:
        return series(name, values, {**R1, "message": message})

    unknown = "step_runner_exporter_unknown_fields_total"
    decode = "step_runner_exporter_decode_errors_total"
    return [
        {
            "name": "unknown fields in StatusResponse can change a classification: a ticket"
            " for 15 minutes",
            "interval": "1m",
            "input_series": [
                counter(unknown, "0x9 1x20", "StatusResponse"),
                counter(unknown, "0x30", "RunRequest"),
            ],
            "alert_rule_test": [
                alert_test("5m", SCHEMA_DRIFT),
                alert_test(
                    "12m",
                    SCHEMA_DRIFT,
                    fired(SCHEMA_DRIFT, {**R1, "message": "StatusResponse"}, "1"),
                ),
                alert_test("26m", SCHEMA_DRIFT),
            ],
        },
        {
            # A newer Runner sending a job timeout in RunRequest: every job drifts, and
            # none can be classified differently for it.
            "name": "unknown fields in requests are counted but raise nothing",
            "interval": "1m",
            "input_series": [
                *(counter(unknown, "0+1x30", m) for m in REQUESTS),
                counter(unknown, "0x30", "StatusResponse"),
            ],
            "alert_rule_test": [alert_test(t, SCHEMA_DRIFT) for t in ("5m", "12m", "26m")],
        },
        {
            "name": "messages that do not decode raise a ticket",
            "interval": "1m",
            "input_series": [
                counter(decode, "0x9 3x20", "http2"),
                counter(decode, "0x30", "StatusResponse"),
            ],
            "alert_rule_test": [
                alert_test("5m", DECODE_ERRORS),
                alert_test(
                    "12m", DECODE_ERRORS, fired(DECODE_ERRORS, {**R1, "message": "http2"}, "3")
                ),
            ],
        },
    ]


UPSTREAM_DOWN, EXPORTER_DOWN, EXPORTER_ABSENT, EVICTED = r.AVAILABILITY_ALERTS.alerts


def _availability_cases() -> list[TestCase]:
    build_info = {**R1, "version": "0.1.0"}
    node = {"job": "node", "instance": "node-1:9100"}
    r2_busy = target("runner-2")
    return [
        {
            "name": "upstream unreachable for 5 minutes pages, and resolves",
            "interval": "1m",
            "input_series": [series("step_runner_exporter_upstream_up", "1x9 0x9 1x10", R1)],
            "alert_rule_test": [
                alert_test("13m", UPSTREAM_DOWN),
                alert_test("16m", UPSTREAM_DOWN, fired(UPSTREAM_DOWN, R1)),
                alert_test("22m", UPSTREAM_DOWN),
            ],
        },
        {
            "name": "a sidecar that stops being scraped pages; other targets do not",
            "interval": "1m",
            "input_series": [
                series("up", "1x9 0x20", {k: v for k, v in R1.items() if k != "runner"}),
                series("step_runner_exporter_build_info", "1x9 _x20", build_info),
                series("up", "0x29", node),
            ],
            "alert_rule_test": [
                alert_test("12m", EXPORTER_DOWN),
                alert_test("16m", EXPORTER_DOWN, fired(EXPORTER_DOWN, R1)),
            ],
        },
        {
            "name": "no sidecar at all is a ticket after 15 minutes",
            "interval": "1m",
            "input_series": [series("up", "1x29", node)],
            "alert_rule_test": [
                alert_test("10m", EXPORTER_ABSENT),
                # absent() has the labels its selector matches on equality.
                alert_test("20m", EXPORTER_ABSENT, fired(EXPORTER_ABSENT, SIDECAR_SELECTOR)),
            ],
        },
        {
            "name": "a scraped sidecar is not absent",
            "interval": "1m",
            "input_series": [series("step_runner_exporter_build_info", "1x29", build_info)],
            "alert_rule_test": [alert_test("20m", EXPORTER_ABSENT)],
        },
        {
            "name": "10% of jobs evicted is a ticket; 1% is not",
            "interval": "1m",
            "input_series": [
                series("step_runner_exporter_evicted_jobs_total", "0+1x40", R1),
                jobs("0+9x40", "success", R1),
                series("step_runner_exporter_evicted_jobs_total", "0+1x40", r2_busy),
                jobs("0+99x40", "success", r2_busy),
            ],
            "alert_rule_test": [
                alert_test("10m", EVICTED),
                alert_test("30m", EVICTED, fired(EVICTED, R1, "10%")),
            ],
        },
    ]


CASES = {
    r.JOB_RATES.name: _job_rates_cases,
    r.JOB_RATES_3D.name: _job_rates_3d_cases,
    r.SLO_ALERTS.name: _slo_cases,
    r.JOB_FAILURE_ALERTS.name: _job_failure_cases,
    r.WIRE_FORMAT_ALERTS.name: _wire_format_cases,
    r.AVAILABILITY_ALERTS.name: _availability_cases,
}


def test_files() -> dict[str, dict[str, Any]]:
    """Group name to its promtool test file, evaluated as often as the group is."""
    return {
        group.name: test_file(CASES[group.name](), group.interval or "1m") for group in r.GROUPS
    }
