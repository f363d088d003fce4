"""The two Grafana dashboards: job failures (for SREs triaging) and the sidecar itself."""

from __future__ import annotations

from typing import Any

from . import grafana as g
from .links import JOB_FAILURES, SIDECAR
from .promql import sidecar_matchers, sidecar_series
from .rules import failure_ratio
from .settings import SLO_PERIOD, SLO_TARGET, UNKNOWN_FAILURE_RATIO, error_budget

# The sidecars' series (settings.SIDECAR_SELECTOR) of the selected runners and instances.
RUNNER = 'runner=~"$runner"'
SEL = sidecar_matchers(RUNNER, 'instance=~"$instance"')
JOBS = f"step_runner_jobs_total{{{SEL}}}"
RATE = "[$__rate_interval]"
BUDGET = error_budget()
BUILD_INFO = "step_runner_exporter_build_info"
CATEGORY_COLORS = {"infrastructure": "red", "script": "blue", "unknown": "orange"}
JOBS_PER_SECOND = "suffix: jobs/s"


def failures(extra: str = "") -> str:
    return f"step_runner_job_failures_total{{{SEL}{', ' + extra if extra else ''}}}"


def _ratio_over_range(category: str | None) -> str:
    selected = failures(f'category="{category}"') if category else failures()
    return f"sum(increase({selected}[$__range]))\n/\nsum(increase({JOBS}[$__range]))"


def _variables() -> list[dict[str, Any]]:
    return [
        g.datasource_variable(),
        g.query_variable("runner", "Runner", f"label_values({sidecar_series(BUILD_INFO)}, runner)"),
        g.query_variable(
            "instance",
            "Instance",
            f"label_values({sidecar_series(BUILD_INFO, RUNNER)}, instance)",
        ),
    ]


def _headline() -> list[g.Panel]:
    def ratio(title: str, description: str, category: str | None, steps: Any) -> g.Panel:
        return g.stat(
            title,
            description,
            g.query(_ratio_over_range(category), instant=True),
            unit="percentunit",
            decimals=2,
            steps=steps,
        )

    infra = failures('category="infrastructure"')
    budget_expr = (
        f"1 - (\n  sum(increase({infra}[{SLO_PERIOD}]))\n"
        f"  /\n  sum(increase({JOBS}[{SLO_PERIOD}]))\n) / {BUDGET:g}"
    )
    return [
        g.stat(
            "Jobs/s",
            "Jobs whose outcome the sidecar observed, per second.",
            g.query(f"sum(rate({JOBS}{RATE}))"),
            unit=JOBS_PER_SECOND,
            decimals=2,
        ),
        ratio(
            "Failure ratio",
            "Failed jobs / all jobs over the selected time range, whoever is at fault.",
            None,
            ((None, "green"), (0.05, "orange"), (0.2, "red")),
        ),
        ratio(
            "Infrastructure failures",
            "Jobs that failed because of the runner infrastructure (step-runner panics, lost "
            f"connections, gRPC errors) / all jobs. The SLO allows {BUDGET * 100:g}%.",
            "infrastructure",
            ((None, "green"), (BUDGET, "red")),
        ),
        ratio(
            "Script failures",
            "Jobs whose own steps failed or timed out / all jobs: the users' business, not ours.",
            "script",
            ((None, "blue"),),
        ),
        ratio(
            "Unknown failures",
            "Jobs step-runner failed without saying why / all jobs: a classification gap.",
            "unknown",
            ((None, "green"), (UNKNOWN_FAILURE_RATIO, "orange")),
        ),
        g.gauge(
            f"Error budget remaining ({SLO_PERIOD})",
            f"SLO: {SLO_TARGET * 100:g}% of jobs without an infrastructure failure. The share "
            f"of the {BUDGET * 100:g}% budget left over the last {SLO_PERIOD} (negative: "
            "overspent). Needs that much Prometheus retention.",
            g.query(budget_expr, instant=True),
            unit="percentunit",
            steps=((None, "red"), (0, "orange"), (0.25, "green")),
            minimum=0,
            maximum=1,
        ),
    ]


def _by(labels: str, legend: str, extra: str = "") -> g.Target:
    return g.query(f"sum by ({labels}) (rate({failures(extra)}{RATE}))", legend, exemplar=True)


def _failures_by_category() -> list[g.Panel]:
    return [
        g.timeseries(
            "Failures by category",
            "Failed jobs per second: infrastructure (ours), script (the users') and "
            "unknown. Exemplars link a spike to job ids.",
            [_by("category", "{{category}}")],
            unit=JOBS_PER_SECOND,
            stack=True,
            colors=CATEGORY_COLORS,
        ),
        g.timeseries(
            "Failure ratio by category",
            "Failed jobs of each category / all jobs. The line is the SLO's budget for "
            "infrastructure failures.",
            [
                g.query(
                    f"sum by (category) (rate({failures()}{RATE}))\n"
                    "/ ignoring (category) group_left\n"
                    f"sum(rate({JOBS}{RATE}))",
                    "{{category}}",
                )
            ],
            unit="percentunit",
            colors=CATEGORY_COLORS,
            threshold_lines=((BUDGET, "red"),),
        ),
    ]


def _failures_by_what_was_seen() -> list[g.Panel]:
    return [
        g.timeseries(
            "Failures by source and kind",
            "What the sidecar saw: a gRPC code (grpc_status, grpc_internal) or "
            "step-runner's error kind (status_error_kind).",
            [_by("source, kind", "{{source}} / {{kind}}")],
            unit=JOBS_PER_SECOND,
            stack=True,
        ),
        g.timeseries(
            "Failures by failure_reason",
            "The failure reason GitLab Runner reports for these jobs (job accounting).",
            [_by("failure_reason", "{{failure_reason}}")],
            unit=JOBS_PER_SECOND,
            stack=True,
        ),
    ]


def _panics_and_results() -> list[g.Panel]:
    panics = failures('source="grpc_internal"')
    internal = failures('kind="internal"')
    return [
        g.timeseries(
            "Step-runner panics and internal errors",
            "Jobs ended by step-runner's panic recovery (gRPC INTERNAL) or an "
            "internal error kind: reported as script_failure, but a step-runner bug "
            "(or a job crashing it on purpose).",
            [
                g.query(
                    "sum by (instance, source, kind) (\n"
                    f"  rate({panics}{RATE})\n  or\n"
                    f"  rate({internal}{RATE})\n)",
                    "{{instance}} {{source}} / {{kind}}",
                    exemplar=True,
                )
            ],
            unit=JOBS_PER_SECOND,
        ),
        g.timeseries(
            "Jobs by result",
            "Every job the sidecar saw finish, by result.",
            [g.query(f"sum by (result) (rate({JOBS}{RATE}))", "{{result}}")],
            unit=JOBS_PER_SECOND,
            stack=True,
            colors={"success": "green", "failed": "red", "cancelled": "yellow"},
        ),
    ]


def _burn_rate_and_duration() -> list[g.Panel]:
    burn_windows = ("5m", "1h", "6h")
    return [
        g.timeseries(
            "Infrastructure error budget burn rate",
            "How many times faster than the SLO allows the budget burns, per runner, "
            "over the alerts' windows (all instances of a runner together). Pages at "
            "14.4 (1h and 5m), tickets at 6 (6h and 30m).",
            [
                g.query(
                    f'{failure_ratio(w)}{{category="infrastructure", runner=~"$runner"}}'
                    f" / {BUDGET:g}",
                    f"{{{{runner}}}} {w}",
                )
                for w in burn_windows
            ],
            unit="x",
            threshold_lines=((6, "orange"), (14.4, "red")),
        ),
        g.timeseries(
            "Job duration",
            "Status end_time - start_time, median and 99th percentile by result.",
            [
                g.query(
                    f"histogram_quantile({q}, sum by (le, result) (rate("
                    f"step_runner_job_duration_seconds_bucket{{{SEL}}}{RATE})))",
                    f"p{int(q * 100)} {{{{result}}}}",
                )
                for q in (0.5, 0.99)
            ],
            unit="s",
        ),
    ]


def _top_failures() -> list[g.Panel]:
    return [
        g.table(
            "Top failure kinds",
            "The ten most frequent failure label sets over the selected time range.",
            g.query(
                "topk(10,\n  sum by (category, failure_reason, source, kind) (\n"
                f"    increase({failures()}[$__range])\n  ) > 0\n)",
                instant=True,
                table=True,
            ),
            value_name="Failed jobs",
        ),
        g.bargauge(
            "Failed jobs by failure_reason",
            "Failed jobs over the selected time range, as GitLab Runner reports them.",
            g.query(
                f"sum by (failure_reason) (increase({failures()}[$__range]))",
                "{{failure_reason}}",
                instant=True,
            ),
            unit="short",
        ),
    ]


def job_failures() -> dict[str, Any]:
    rows = (
        _headline,
        _failures_by_category,
        _failures_by_what_was_seen,
        _panics_and_results,
        _burn_rate_and_duration,
        _top_failures,
    )
    return g.dashboard(
        JOB_FAILURES,
        description="Are we breaking CI jobs, or are users' scripts failing? Job outcomes "
        "classified by step-runner-exporter.",
        variables=_variables(),
        panels=g.layout([row() for row in rows]),
        links=(SIDECAR,),
    )


def _grpc(name: str, extra: str = "") -> str:
    return f"{name}{{{SEL}{', ' + extra if extra else ''}}}"


HANDLED = _grpc("grpc_server_handled_total")
ERRORS = _grpc("grpc_server_handled_total", 'grpc_code!="OK"')


def _sidecar_process(metric: str) -> str:
    # Process metrics exist on every target: keep the sidecars'.
    return f"{metric}\nand on (job, instance)\nstep_runner_exporter_build_info{{{SEL}}}"


def _sidecar_stats() -> list[g.Panel]:
    return [
        g.stat(
            "Upstream",
            "Whether every selected sidecar reaches its step-runner.",
            g.query(f"min(step_runner_exporter_upstream_up{{{SEL}}})"),
            unit="none",
            steps=((None, "red"), (1, "green")),
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "DOWN", "index": 0},
                        "1": {"text": "UP", "index": 1},
                    },
                }
            ],
        ),
        g.stat(
            "RPCs/s",
            "StepRunner calls completed per second.",
            g.query(f"sum(rate({HANDLED}{RATE}))"),
            unit="reqps",
            decimals=2,
        ),
        g.stat(
            "RPC error ratio",
            "Calls that ended with a code other than OK / all calls.",
            g.query(f"sum(rate({ERRORS}{RATE}))\n/\nsum(rate({HANDLED}{RATE}))"),
            unit="percentunit",
            decimals=2,
            steps=((None, "green"), (0.05, "orange")),
        ),
        g.stat(
            "Tracked jobs",
            "Jobs remembered for exactly-once counting.",
            g.query(f"sum(step_runner_exporter_tracked_jobs{{{SEL}}})"),
            unit="short",
        ),
        g.stat(
            "Evicted jobs",
            "Jobs forgotten before their outcome was seen, over the selected range.",
            g.query(
                f"sum(increase(step_runner_exporter_evicted_jobs_total{{{SEL}}}[$__range]))",
                instant=True,
            ),
            unit="short",
            decimals=0,
            steps=((None, "green"), (1, "orange")),
        ),
        g.stat(
            "Sidecars by version",
            "Running step-runner-exporter builds, and which observer core each runs "
            "(c: compiled; python: the pure-Python fallback, several times the CPU per job).",
            g.query(
                f"count by (version, observer_core) (step_runner_exporter_build_info{{{SEL}}})",
                "{{version}} {{observer_core}}",
                instant=True,
            ),
            unit="short",
        ),
    ]


def _rpc_rates() -> list[g.Panel]:
    return [
        g.timeseries(
            "RPC rate by method and code",
            "Calls completed per second (go-grpc-prometheus series).",
            [
                g.query(
                    f"sum by (grpc_method, grpc_code) (rate({HANDLED}{RATE})) > 0",
                    "{{grpc_method}} {{grpc_code}}",
                )
            ],
            unit="reqps",
        ),
        g.timeseries(
            "RPC errors by method and code",
            "Calls that ended with a code other than OK, per second.",
            [
                g.query(
                    f"sum by (grpc_method, grpc_code) (rate({ERRORS}{RATE})) > 0",
                    "{{grpc_method}} {{grpc_code}}",
                )
            ],
            unit="reqps",
        ),
    ]


def _rpc_latency() -> list[g.Panel]:
    return [
        g.timeseries(
            f"p{int(q * 100)} RPC latency by method",
            "Request HEADERS to end of stream. FollowLogs lasts as long as the job's log.",
            [
                g.query(
                    f"histogram_quantile({q}, sum by (le, grpc_method) (rate("
                    f"{_grpc('grpc_server_handling_seconds_bucket')}{RATE}))) > 0",
                    "{{grpc_method}}",
                )
            ],
            unit="s",
            width=8,
        )
        for q in (0.5, 0.9, 0.99)
    ]


def _rpc_messages() -> list[g.Panel]:
    return [
        g.timeseries(
            "Messages by method",
            "gRPC messages per second, received from the client and sent to it.",
            [
                g.query(
                    f"sum by (grpc_method) (rate({_grpc(m)}{RATE}))",
                    f"{{{{grpc_method}}}} {direction}",
                )
                for m, direction in (
                    ("grpc_server_msg_received_total", "received"),
                    ("grpc_server_msg_sent_total", "sent"),
                )
            ],
            unit="short",
        ),
        g.timeseries(
            "RPCs in flight by method",
            "Calls started but not yet ended.",
            [
                g.query(
                    f"sum by (grpc_method) ({_grpc('grpc_server_started_total')})\n-\n"
                    f"sum by (grpc_method) ({HANDLED})",
                    "{{grpc_method}}",
                )
            ],
            unit="short",
        ),
    ]


def _wire_format() -> list[g.Panel]:
    return [
        g.timeseries(
            "Upstream up",
            "1 while the sidecar reaches step-runner.",
            [
                g.query(
                    f"min by (instance) (step_runner_exporter_upstream_up{{{SEL}}})",
                    "{{instance}}",
                )
            ],
            unit="none",
            width=8,
        ),
        g.timeseries(
            "Decode errors by message",
            "Messages forwarded but not decoded: step-runner speaks a wire format "
            "this build does not know.",
            [
                g.query(
                    "sum by (message) (rate("
                    f"step_runner_exporter_decode_errors_total{{{SEL}}}{RATE})) > 0",
                    "{{message}}",
                )
            ],
            unit="short",
            width=8,
        ),
        g.timeseries(
            "Unknown fields by message",
            "Decoded messages carrying fields this build does not know (schema drift).",
            [
                g.query(
                    "sum by (message) (rate("
                    f"step_runner_exporter_unknown_fields_total{{{SEL}}}{RATE})) > 0",
                    "{{message}}",
                )
            ],
            unit="short",
            width=8,
        ),
    ]


def _sidecar_resources() -> list[g.Panel]:
    return [
        g.timeseries(
            "Tracked jobs",
            "Jobs remembered for exactly-once counting.",
            [
                g.query(
                    f"sum by (instance) (step_runner_exporter_tracked_jobs{{{SEL}}})",
                    "{{instance}}",
                )
            ],
            unit="short",
            width=6,
        ),
        g.timeseries(
            "Evicted jobs",
            "Jobs forgotten before their outcome was seen, per second.",
            [
                g.query(
                    "sum by (instance) (rate("
                    f"step_runner_exporter_evicted_jobs_total{{{SEL}}}{RATE}))",
                    "{{instance}}",
                )
            ],
            unit="short",
            width=6,
        ),
        g.timeseries(
            "Process CPU",
            "CPU time used per second (1 = one core).",
            [
                g.query(
                    _sidecar_process(f"rate({sidecar_series('process_cpu_seconds_total')}{RATE})"),
                    "{{instance}}",
                )
            ],
            unit="percentunit",
            width=6,
        ),
        g.timeseries(
            "Process memory",
            "Resident set size.",
            [
                g.query(
                    _sidecar_process(sidecar_series("process_resident_memory_bytes")),
                    "{{instance}}",
                )
            ],
            unit="bytes",
            width=6,
        ),
    ]


def sidecar() -> dict[str, Any]:
    rows = (
        _sidecar_stats,
        _rpc_rates,
        _rpc_latency,
        _rpc_messages,
        _wire_format,
        _sidecar_resources,
    )
    return g.dashboard(
        SIDECAR,
        description="step-runner-exporter itself: the gRPC traffic it forwards, its view of "
        "step-runner and its own resources.",
        variables=_variables(),
        panels=g.layout([row() for row in rows]),
        links=(JOB_FAILURES,),
    )


DASHBOARDS = {
    "step-runner-job-failures.json": job_failures,
    "step-runner-sidecar.json": sidecar,
}
