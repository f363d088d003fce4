"""Every knob of the monitoring bundle, in one place.

Change a value here, run `python -m monitoring.build`, and every rule file, test,
dashboard and Kubernetes manifest follows.
"""

from __future__ import annotations

from collections.abc import Mapping

# Which series are the sidecars', the way kubernetes-mixin's `_config` selectors say it:
# label matchers (name: value) that every query of a raw series carries, and that the
# rule tests give their simulated sidecars. Empty reads the metric names from whatever
# target exports them. Set it when the sidecars' scrape job has its own name, or one
# Prometheus holds several setups: {"job": "ci-sidecars"}, or
# {"job": "ci-sidecars", "cluster": "eu-1"}; then run `python -m monitoring.build`.
SIDECAR_SELECTOR: Mapping[str, str] = {}

# Where the runbooks are read: `runbook_url` is this plus `<AlertName>.md`.
RUNBOOK_BASE_URL = "https://gitlab.example.com/sre/step-runner-exporter/-/blob/main/docs/runbooks/"
# Grafana's public URL: `dashboard_url` is this plus `/d/<uid>/<slug>`.
GRAFANA_BASE_URL = "https://grafana.example.com"

# The SLO: this fraction of all jobs (step_runner_jobs_total, whatever their result)
# must not end in an infrastructure failure (category="infrastructure"). The error
# budget is 1 - SLO_TARGET = 0.5% of jobs.
SLO_TARGET = 0.995
# The period the dashboard's "error budget remaining" is measured over. Prometheus must
# retain at least this much data, or the stat covers only what is retained.
SLO_PERIOD = "30d"
# The SLO (and its burn-rate alerts) is per runner: the static `runner` label of the
# sidecar's configuration, within a Prometheus scrape job.
SLO_LABELS: tuple[str, ...] = ("job", "runner")
# Burn-rate alerts stay silent below this many jobs per hour (averaged over the alert's
# long window): with three jobs an hour one failure is a 33% error ratio, not an outage.
MIN_JOBS_PER_HOUR = 30

# Alertmanager routes on `severity`: pages wake someone up, tickets wait for office hours.
SEVERITY_PAGE = "critical"
SEVERITY_TICKET = "warning"

# StepRunnerUnknownFailuresHigh: a classification gap worth a ticket when more than this
# fraction of jobs ends as category="unknown" over an hour.
UNKNOWN_FAILURE_RATIO = 0.01
# StepRunnerJobsEvicted: the fraction of jobs forgotten before their outcome was seen.
EVICTED_JOB_RATIO = 0.05

# Every recording-rule window: 5m..6h feed dashboards and the burn-rate alerts, 3d the
# slow-burn ticket.
RATE_WINDOWS: tuple[str, ...] = ("5m", "30m", "1h", "6h", "3d")


def error_budget() -> float:
    """1 - SLO_TARGET without binary floating-point noise (0.005, not 0.0050000000000000044)."""
    return round(1 - SLO_TARGET, 10)


# Grafana file provisioning: where the dashboards' JSON files are mounted, and the
# Prometheus the provisioned datasource points at.
GRAFANA_DASHBOARDS_PATH = "/var/lib/grafana/dashboards/step-runner"
GRAFANA_FOLDER = "Step runner"
PROMETHEUS_URL = "http://prometheus:9090"
# The scrape interval of the sidecars: Grafana derives $__rate_interval from it.
SCRAPE_INTERVAL = "15s"
