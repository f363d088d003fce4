"""Recording rules and alerts: the one source of rules/step-runner.rules.yml and of
the PrometheusRule manifest."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

from .links import JOB_FAILURES, SIDECAR, DashboardRef, dashboard_url, runbook_url
from .promql import sidecar_series
from .settings import (
    EVICTED_JOB_RATIO,
    MIN_JOBS_PER_HOUR,
    RATE_WINDOWS,
    SEVERITY_PAGE,
    SEVERITY_TICKET,
    SIDECAR_SELECTOR,
    SLO_LABELS,
    SLO_TARGET,
    UNKNOWN_FAILURE_RATIO,
    error_budget,
)


def _keeping_selector(*labels: str) -> str:
    # SIDECAR_SELECTOR's labels (a cluster, say) hold one value each: aggregations keep
    # them, so alerts and ratios still say which setup they are about.
    return ", ".join(dict.fromkeys((*labels, *SIDECAR_SELECTOR)))


SLO_BY = _keeping_selector(*SLO_LABELS)
FAILURES_METRIC = "step_runner_job_failures_total"
# The raw series the rules read, as the sidecars export them (settings.SIDECAR_SELECTOR).
JOBS = sidecar_series("step_runner_jobs_total")
FAILURES = sidecar_series(FAILURES_METRIC)
BUILD_INFO = sidecar_series("step_runner_exporter_build_info")
EVICTED = sidecar_series("step_runner_exporter_evicted_jobs_total")
# Per-sidecar alerts keep the sidecar's identity.
INSTANCE_BY = _keeping_selector("job", "runner", "instance")


def _expr(text: str) -> str:
    return textwrap.dedent(text).strip()


def jobs_rate(window: str) -> str:
    return f"step_runner:jobs:rate{window}"


def failures_rate(window: str) -> str:
    return f"step_runner:job_failures:rate{window}"


def failure_ratio(window: str) -> str:
    return f"step_runner:job_failures_per_job:ratio_rate{window}"


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    expr: str

    def to_rule(self) -> dict[str, Any]:
        return {"record": self.name, "expr": self.expr}


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    expr: str
    severity: str
    summary: str
    description: str
    dashboard: DashboardRef
    # Alert labels handed to the dashboard as its template variables.
    dashboard_vars: tuple[str, ...] = ("runner",)
    for_: str | None = None

    def to_rule(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_:
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity}
        rule["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": runbook_url(self.name),
            "dashboard_url": dashboard_url(self.dashboard, self.dashboard_vars),
        }
        return rule


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    rules: tuple[Record | Alert, ...]
    interval: str | None = None

    @property
    def alerts(self) -> tuple[Alert, ...]:
        return tuple(r for r in self.rules if isinstance(r, Alert))

    @property
    def records(self) -> tuple[Record, ...]:
        return tuple(r for r in self.rules if isinstance(r, Record))

    def to_dict(self) -> dict[str, Any]:
        group: dict[str, Any] = {"name": self.name}
        if self.interval:
            group["interval"] = self.interval
        group["rules"] = [r.to_rule() for r in self.rules]
        return group


def _window_rules(window: str) -> tuple[Record, ...]:
    return (
        Record(jobs_rate(window), f"rate({JOBS}[{window}])"),
        Record(failures_rate(window), f"rate({FAILURES}[{window}])"),
        # Divided by all jobs, whatever their result, as GitLab's CI runner SLI does.
        Record(
            failure_ratio(window),
            _expr(f"""
                sum by ({SLO_BY}, category) ({failures_rate(window)})
                / ignoring (category) group_left
                sum by ({SLO_BY}) ({jobs_rate(window)})
            """),
        ),
    )


FAST_WINDOWS = tuple(w for w in RATE_WINDOWS if w != "3d")
JOB_RATES = Group("step_runner_job_rates", tuple(r for w in FAST_WINDOWS for r in _window_rules(w)))
# Three days of raw samples per evaluation is the costliest read here, and a slow-burn
# ticket does not need it every minute.
JOB_RATES_3D = Group("step_runner_job_rates_3d", _window_rules("3d"), interval="5m")

BUDGET = error_budget()
BUDGET_TEXT = f"{BUDGET * 100:g}%"
SLO_TEXT = f"{SLO_TARGET * 100:g}%"


def _burn(long: str, short: str, factor: float) -> str:
    """Workbook multi-window burn: both windows over `factor` x budget, enough traffic."""
    threshold = f"({factor:g} * {BUDGET:g})"
    return _expr(f"""
        {failure_ratio(long)}{{category="infrastructure"}} > {threshold}
        and on ({SLO_BY})
        {failure_ratio(short)}{{category="infrastructure"}} > {threshold}
        and on ({SLO_BY})
        sum by ({SLO_BY}) ({jobs_rate(long)}) * 3600 >= {MIN_JOBS_PER_HOUR}
    """)


def _indent(text: str) -> str:
    return textwrap.indent(text, "  ")


SLO_ALERTS = Group(
    "step_runner_slo_alerts",
    (
        Alert(
            "StepRunnerInfraErrorBudgetFastBurn",
            _burn("1h", "5m", 14.4),
            SEVERITY_PAGE,
            "Runner {{ $labels.runner }} is burning its job error budget 14.4x too fast",
            "Infrastructure failures are {{ $value | humanizePercentage }} of all jobs on "
            f"runner {{{{ $labels.runner }}}} over the last hour (and over 5m); the SLO "
            f"allows {BUDGET_TEXT} ({SLO_TEXT} of jobs without an infrastructure failure). "
            "At this rate a 30-day budget is gone in about two days.",
            JOB_FAILURES,
            for_="2m",
        ),
        Alert(
            "StepRunnerInfraErrorBudgetSlowBurn",
            f"(\n{_indent(_burn('6h', '30m', 6))}\n)\nor\n(\n{_indent(_burn('3d', '6h', 1))}\n)",
            SEVERITY_TICKET,
            "Runner {{ $labels.runner }} is steadily burning its job error budget",
            "Infrastructure failures are {{ $value | humanizePercentage }} of all jobs on "
            f"runner {{{{ $labels.runner }}}} over the last 6h (6x the budget) or 3d (1x); "
            f"the SLO allows {BUDGET_TEXT}. Nothing is on fire, but the month's budget will "
            "not last.",
            JOB_FAILURES,
            for_="15m",
        ),
    ),
)

JOB_FAILURE_ALERTS = Group(
    "step_runner_job_failure_alerts",
    (
        Alert(
            "StepRunnerPanics",
            # grpc_internal is step-runner's panic-recovery interceptor; kind="internal"
            # is step-runner reporting its own internal error in Status.
            _expr(f"""
                sum by ({INSTANCE_BY}, source, kind) (
                  increase({sidecar_series(FAILURES_METRIC, 'source="grpc_internal"')}[10m])
                  or
                  increase({sidecar_series(FAILURES_METRIC, 'kind="internal"')}[10m])
                ) > 0
            """),
            SEVERITY_TICKET,
            "step-runner on {{ $labels.instance }} failed jobs with internal errors",
            "{{ $value | humanize }} jobs on {{ $labels.instance }} (runner "
            "{{ $labels.runner }}) ended in a step-runner internal error "
            "(source={{ $labels.source }}, kind={{ $labels.kind }}) in the last 10 minutes. "
            "GitLab Runner reports them as script_failure, but they are a step-runner bug, "
            "or a job deliberately crashing it.",
            JOB_FAILURES,
            dashboard_vars=("runner", "instance"),
        ),
        Alert(
            "StepRunnerUnknownFailuresHigh",
            _expr(f"""
                {failure_ratio("1h")}{{category="unknown"}} > {UNKNOWN_FAILURE_RATIO:g}
                and on ({SLO_BY})
                sum by ({SLO_BY}) ({jobs_rate("1h")}) * 3600 >= {MIN_JOBS_PER_HOUR}
            """),
            SEVERITY_TICKET,
            "Many jobs on runner {{ $labels.runner }} fail for an unknown reason",
            "{{ $value | humanizePercentage }} of all jobs on runner {{ $labels.runner }} "
            "ended as unknown_failure over the last hour (threshold "
            f"{UNKNOWN_FAILURE_RATIO * 100:g}%): step-runner reports failures without saying "
            "whose fault they are, or with an error kind this build does not know.",
            JOB_FAILURES,
            for_="30m",
        ),
    ),
)


# Unknown fields that can change a classification (SPEC section 8): those of
# StatusResponse, Status and StatusError. Status and StatusError only arrive inside a
# StatusResponse, and the observer counts the unknown fields of nested messages under the
# message it decoded, so `StatusResponse` covers all three. Drift anywhere else (a newer
# Runner sending a job timeout in RunRequest) is counted, and shown on the dashboard, but
# cannot change an outcome: it must not raise the alert.
CLASSIFYING_MESSAGES: tuple[str, ...] = ("StatusResponse",)


def _message_matcher(messages: tuple[str, ...]) -> str:
    if len(messages) == 1:
        return f'message="{messages[0]}"'
    return f'message=~"{"|".join(messages)}"'


def _wire_alert(name: str, selector: str, summary: str, what: str, why: str) -> Alert:
    return Alert(
        name,
        f"increase({selector}[15m]) > 0",
        SEVERITY_TICKET,
        summary,
        f"{{{{ $value | humanize }}}} {{{{ $labels.message }}}} messages {what} on "
        "{{ $labels.instance }} (runner {{ $labels.runner }}) in the last 15 minutes: "
        f"the step-runner in production speaks a wire format this build of "
        f"step-runner-exporter does not fully know{why}.",
        SIDECAR,
        dashboard_vars=("runner", "instance"),
    )


WIRE_FORMAT_ALERTS = Group(
    "step_runner_wire_format_alerts",
    (
        _wire_alert(
            "StepRunnerSchemaDrift",
            sidecar_series(
                "step_runner_exporter_unknown_fields_total",
                _message_matcher(CLASSIFYING_MESSAGES),
            ),
            "step-runner sends fields the exporter does not know",
            "carried protobuf fields unknown to the exporter",
            ", in messages that decide how jobs are classified",
        ),
        _wire_alert(
            "StepRunnerDecodeErrors",
            sidecar_series("step_runner_exporter_decode_errors_total"),
            "The exporter cannot decode step-runner messages",
            "could not be decoded (their jobs may be misclassified or not counted)",
            "",
        ),
    ),
)

AVAILABILITY_ALERTS = Group(
    "step_runner_availability_alerts",
    (
        Alert(
            "StepRunnerUpstreamDown",
            f"{sidecar_series('step_runner_exporter_upstream_up')} == 0",
            SEVERITY_PAGE,
            "step-runner behind {{ $labels.instance }} is unreachable",
            "The sidecar on {{ $labels.instance }} (runner {{ $labels.runner }}) has not "
            "reached step-runner for 5 minutes: every job sent to it fails.",
            SIDECAR,
            dashboard_vars=("runner", "instance"),
            for_="5m",
        ),
        Alert(
            "StepRunnerExporterDown",
            # Only targets that were a sidecar within the hour; `up` alone would match
            # every target of the Prometheus.
            _expr(f"""
                ({sidecar_series("up")} == 0)
                * on (job, instance) group_left (runner)
                max by (job, instance, runner) (max_over_time({BUILD_INFO}[1h]))
            """),
            SEVERITY_PAGE,
            "step-runner-exporter {{ $labels.instance }} is not being scraped",
            "Prometheus has failed to scrape the sidecar {{ $labels.instance }} (runner "
            "{{ $labels.runner }}) for 5 minutes. The sidecar sits on the jobs' path to "
            "step-runner: if its process is down, jobs cannot reach step-runner, and no "
            "failure is counted.",
            SIDECAR,
            dashboard_vars=("runner", "instance"),
            for_="5m",
        ),
        Alert(
            "StepRunnerExporterAbsent",
            f"absent({BUILD_INFO})",
            SEVERITY_TICKET,
            "No step-runner-exporter is scraped by this Prometheus",
            "No series step_runner_exporter_build_info has existed for 15 minutes: no "
            "sidecar is discovered or scraped, so every step-runner alert is blind.",
            SIDECAR,
            dashboard_vars=(),
            for_="15m",
        ),
        Alert(
            "StepRunnerJobsEvicted",
            _expr(f"""
                sum by ({INSTANCE_BY}) (rate({EVICTED}[1h]))
                /
                (
                  sum by ({INSTANCE_BY}) (rate({EVICTED}[1h]))
                  + sum by ({INSTANCE_BY}) (rate({JOBS}[1h]))
                )
                > {EVICTED_JOB_RATIO:g}
            """),
            SEVERITY_TICKET,
            "The exporter on {{ $labels.instance }} forgets jobs before their outcome",
            "{{ $value | humanizePercentage }} of the jobs the sidecar on "
            "{{ $labels.instance }} (runner {{ $labels.runner }}) followed over the last "
            "hour were evicted before their outcome was seen (threshold "
            f"{EVICTED_JOB_RATIO * 100:g}%): those jobs are missing from every failure "
            "ratio.",
            SIDECAR,
            dashboard_vars=("runner", "instance"),
            for_="15m",
        ),
    ),
)

GROUPS: tuple[Group, ...] = (
    JOB_RATES,
    JOB_RATES_3D,
    SLO_ALERTS,
    JOB_FAILURE_ALERTS,
    WIRE_FORMAT_ALERTS,
    AVAILABILITY_ALERTS,
)


def rule_file() -> dict[str, Any]:
    return {"groups": [g.to_dict() for g in GROUPS]}


def all_alerts() -> tuple[Alert, ...]:
    return tuple(a for g in GROUPS for a in g.alerts)


def all_records() -> tuple[Record, ...]:
    return tuple(r for g in GROUPS for r in g.records)
