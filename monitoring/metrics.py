"""The series the rules and dashboards may read: the exporter's own (exporter.metrics,
their one definition), its default collectors', and Prometheus' own `up`."""

from __future__ import annotations

from exporter.metrics import METRICS, default_collector_series

# Every metric name the sidecar exports.
EXPORTED_METRICS = frozenset(spec.name for spec in METRICS)


def known_series() -> frozenset[str]:
    """Every raw series name a query may select (recording rules are added by callers)."""
    ours = (series for spec in METRICS for series in spec.series)
    return frozenset((*ours, *default_collector_series(), "up"))
