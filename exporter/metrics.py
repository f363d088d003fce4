"""The metrics of SPEC section 4, on an injected CollectorRegistry.

Hot-path updates go through children cached per label tuple, because
`Counter.labels()` costs more than the increment itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .classifier import ALL_FAILURES, RESULTS, Failure, Outcome
from .events import (
    DECODE_ERROR_MESSAGES,
    GO_CODE_NAMES,
    STEP_RUNNER_METHODS,
    UNKNOWN_METHOD,
    CallEnded,
    Method,
    normalize_code,
)


class MetricName(StrEnum):
    JOBS = "step_runner_jobs_total"
    JOB_FAILURES = "step_runner_job_failures_total"
    JOB_DURATION = "step_runner_job_duration_seconds"
    GRPC_STARTED = "grpc_server_started_total"
    GRPC_HANDLED = "grpc_server_handled_total"
    GRPC_MSG_RECEIVED = "grpc_server_msg_received_total"
    GRPC_MSG_SENT = "grpc_server_msg_sent_total"
    GRPC_HANDLING = "grpc_server_handling_seconds"
    BUILD_INFO = "step_runner_exporter_build_info"
    UPSTREAM_UP = "step_runner_exporter_upstream_up"
    DECODE_ERRORS = "step_runner_exporter_decode_errors_total"
    UNKNOWN_FIELDS = "step_runner_exporter_unknown_fields_total"
    TRACKED_JOBS = "step_runner_exporter_tracked_jobs"
    EVICTED_JOBS = "step_runner_exporter_evicted_jobs_total"


# Labels our metrics carry, histograms and summaries add, or Prometheus attaches to
# every target (`job`, `instance`: a static label of that name would be renamed
# exported_*): static config labels must not use them.
RESERVED_LABELS = frozenset(
    {
        "job",
        "instance",
        "result",
        "failure_reason",
        "source",
        "kind",
        "category",
        "grpc_type",
        "grpc_service",
        "grpc_method",
        "grpc_code",
        "message",
        "version",
        "le",
        "quantile",
    }
)

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
FAILURE_LABELS = ("failure_reason", "source", "kind", "category")
JOB_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800, 21600)
# go-grpc-prometheus uses Prometheus' default buckets; FollowLogs lasts as long as the
# job, so longer buckets are added at the top.
HANDLING_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1, 2.5, 5, 10, 30, 60, 300, 1800, 3600,
)  # fmt: skip
# OpenMetrics limits an exemplar's label set to 128 characters.
_EXEMPLAR_ID_MAX = 128 - len("job_id")
# GitLab job ids are digits with an optional "-run"; anything else in an exemplar is
# replaced so a hostile id cannot trip a scraper's parser (the job log line keeps it).
_EXEMPLAR_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]")


def exemplar_job_id(job_id: str) -> str:
    return _EXEMPLAR_UNSAFE.sub("_", job_id[:_EXEMPLAR_ID_MAX])


def known_methods(package: str) -> list[Method]:
    service = f"{package}.StepRunner"
    return [Method(service, name, kind) for name, kind in STEP_RUNNER_METHODS.items()]


class StaticLabels(Collector):
    """Adds the configuration's static labels to every sample of the wrapped registry.

    Doing it at collection time keeps every hot-path `labels()` call short and
    covers collectors we do not define (process, platform) too.
    """

    def __init__(self, inner: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self._inner = inner
        self._labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        static = self._labels
        for metric in self._inner.collect():
            if static:
                metric.samples = [s._replace(labels={**static, **s.labels}) for s in metric.samples]
            yield metric


def labelled_registry(inner: CollectorRegistry, labels: Mapping[str, str]) -> CollectorRegistry:
    """A registry exposing everything in `inner` with the static labels added."""
    if not labels:
        return inner
    outer = CollectorRegistry(auto_describe=False)
    outer.register(StaticLabels(inner, labels))
    return outer


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        package: str = "proto",
        version: str = "unknown",
    ) -> None:
        r = registry
        self.jobs = Counter(
            MetricName.JOBS, "Jobs whose outcome the sidecar observed.", ["result"], registry=r
        )
        self.job_failures = Counter(
            MetricName.JOB_FAILURES,
            "Failed jobs by GitLab Runner failure reason and what was seen (SPEC section 3).",
            FAILURE_LABELS,
            registry=r,
        )
        self.job_duration = Histogram(
            MetricName.JOB_DURATION,
            "Job duration (Status end_time - start_time) by result.",
            ["result"],
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        self.started = Counter(
            MetricName.GRPC_STARTED, "RPCs started on the server.", GRPC_LABELS, registry=r
        )
        self.handled = Counter(
            MetricName.GRPC_HANDLED,
            "RPCs completed on the server, regardless of success or failure.",
            (*GRPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.msg_received = Counter(
            MetricName.GRPC_MSG_RECEIVED,
            "RPC stream messages received on the server.",
            GRPC_LABELS,
            registry=r,
        )
        self.msg_sent = Counter(
            MetricName.GRPC_MSG_SENT,
            "gRPC stream messages sent on the server.",
            GRPC_LABELS,
            registry=r,
        )
        self.handling = Histogram(
            MetricName.GRPC_HANDLING,
            "Response latency (seconds) of gRPC calls, request HEADERS to end of stream.",
            GRPC_LABELS,
            buckets=HANDLING_BUCKETS,
            registry=r,
        )
        self.build_info = Gauge(
            MetricName.BUILD_INFO, "The running build.", ["version"], registry=r
        )
        self.upstream_up = Gauge(
            MetricName.UPSTREAM_UP, "1 while step-runner is reachable, else 0.", registry=r
        )
        self.decode_errors = Counter(
            MetricName.DECODE_ERRORS, "Messages forwarded but not decoded.", ["message"], registry=r
        )
        self.unknown_fields = Counter(
            MetricName.UNKNOWN_FIELDS,
            "Decoded messages carrying fields this build does not know.",
            ["message"],
            registry=r,
        )
        self.tracked_jobs = Gauge(
            MetricName.TRACKED_JOBS,
            "Jobs currently remembered for exactly-once counting.",
            registry=r,
        )
        self.evicted_jobs = Counter(
            MetricName.EVICTED_JOBS, "Jobs forgotten before their outcome was seen.", registry=r
        )

        self.build_info.labels(version).set(1)
        # Every series a dashboard or alert reads exists at 0 from the start.
        self._results = {result: self.jobs.labels(result) for result in RESULTS}
        self._durations = {result: self.job_duration.labels(result) for result in RESULTS}
        self._failures = {f: self.job_failures.labels(*_failure_values(f)) for f in ALL_FAILURES}
        self._decode_errors = {m: self.decode_errors.labels(m) for m in DECODE_ERROR_MESSAGES}
        self._unknown_fields = {m: self.unknown_fields.labels(m) for m in DECODE_ERROR_MESSAGES}
        self._methods: dict[Method, _MethodChildren] = {}
        for method in (*known_methods(package), UNKNOWN_METHOD):
            self._methods[method] = _MethodChildren(self, method)

    def _method(self, method: Method) -> _MethodChildren:
        children = self._methods.get(method)
        if children is None:
            # The observer only produces known methods or UNKNOWN_METHOD, so this
            # only grows for a package configured differently from the observer's.
            method = UNKNOWN_METHOD
            children = self._methods[method]
        return children

    def call_started(self, method: Method) -> None:
        self._method(method).started.inc()

    def call_ended(self, call: CallEnded) -> None:
        children = self._method(call.method)
        children.handled[normalize_code(call.code)].inc()
        children.handling.observe(call.duration_seconds)
        if call.messages_received:
            children.msg_received.inc(call.messages_received)
        if call.messages_sent:
            children.msg_sent.inc(call.messages_sent)

    def job_decided(self, job_id: str, outcome: Outcome, duration: float | None) -> None:
        self._results[outcome.result].inc()
        if outcome.failure is not None:
            self._failures[outcome.failure].inc(exemplar={"job_id": exemplar_job_id(job_id)})
        if duration is not None and duration >= 0:
            self._durations[outcome.result].observe(duration)

    def decode_error(self, message: str) -> None:
        self._decode_errors.get(message, self._decode_errors["grpc_frame"]).inc()

    def unknown_field(self, message: str) -> None:
        self._unknown_fields.get(message, self._unknown_fields["grpc_frame"]).inc()

    def job_evicted(self) -> None:
        self.evicted_jobs.inc()


class _MethodChildren:
    __slots__ = ("handled", "handling", "msg_received", "msg_sent", "started")

    def __init__(self, metrics: Metrics, method: Method) -> None:
        values = (method.grpc_type, method.service, method.name)
        self.started = metrics.started.labels(*values)
        self.msg_received = metrics.msg_received.labels(*values)
        self.msg_sent = metrics.msg_sent.labels(*values)
        self.handling = metrics.handling.labels(*values)
        self.handled = {
            code: metrics.handled.labels(*values, name) for code, name in GO_CODE_NAMES.items()
        }


def _failure_values(failure: Failure) -> Iterable[str]:
    return (failure.failure_reason, failure.source, failure.kind, failure.category)
