"""The series the rules and dashboards may read: SPEC section 4, the process
collector's, and Prometheus' own `up`."""

from __future__ import annotations

COUNTERS = (
    "step_runner_jobs_total",
    "step_runner_job_failures_total",
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_msg_received_total",
    "grpc_server_msg_sent_total",
    "step_runner_exporter_decode_errors_total",
    "step_runner_exporter_unknown_fields_total",
    "step_runner_exporter_evicted_jobs_total",
)
GAUGES = (
    "step_runner_exporter_build_info",
    "step_runner_exporter_upstream_up",
    "step_runner_exporter_tracked_jobs",
)
HISTOGRAMS = ("step_runner_job_duration_seconds", "grpc_server_handling_seconds")
# The SPEC section 4 metric names, as that document spells them.
SPEC_METRICS = frozenset((*COUNTERS, *GAUGES, *HISTOGRAMS))

PROCESS_METRICS = ("process_cpu_seconds_total", "process_resident_memory_bytes")


def known_series() -> frozenset[str]:
    """Every raw series name a query may select (recording rules are added by callers)."""
    histogram_series = (
        f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
    )
    return frozenset((*COUNTERS, *GAUGES, *histogram_series, *PROCESS_METRICS, "up"))
