"""The metrics of SPEC sections 4, 7 and 8 (their one definition), on an injected
CollectorRegistry.

Hot-path updates go through children cached per label tuple, because
`Counter.labels()` costs more than the increment itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from . import native
from .classifier import ALL_FAILURES, RESULTS, Outcome
from .events import (
    DECODE_ERROR_MESSAGES,
    GO_CODE_NAMES,
    STEP_RUNNER_METHODS,
    UNKNOWN_LABEL,
    UNKNOWN_METHOD,
    CallEnded,
    Method,
    normalize_code,
)
from .methods import DEFAULT_PACKAGE, MAX_SERVICES, is_service, service_name


class MetricType(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric of the contract: what the exporter registers, what the monitoring
    bundle may query and what the tests check, from this one entry."""

    name: str
    type: MetricType
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def series(self) -> tuple[str, ...]:
        """The series names Prometheus stores for it."""
        if self.type is MetricType.HISTOGRAM:
            return tuple(f"{self.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        return (self.name,)


_DEFINED: list[MetricSpec] = []


def _metric(
    name: str,
    type_: MetricType,
    documentation: str,
    labels: tuple[str, ...] = (),
    buckets: tuple[float, ...] = (),
) -> MetricSpec:
    spec = MetricSpec(name, type_, documentation, labels, buckets)
    _DEFINED.append(spec)
    return spec


COUNTER, GAUGE, HISTOGRAM = MetricType.COUNTER, MetricType.GAUGE, MetricType.HISTOGRAM
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
FAILURE_LABELS = ("failure_reason", "source", "kind", "category")
# The docker tap's label values (SPEC section 7).
DOCKER_METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD", "other")
DOCKER_ENDPOINTS = ("exec_create", "exec_start", "container", "image", "other")
EXEC_SESSION_STATES = ("tapped", "not_step_runner")
JOB_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800, 21600)
# go-grpc-prometheus uses Prometheus' default buckets; FollowLogs lasts as long as the
# job, so longer buckets are added at the top.
HANDLING_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1, 2.5, 5, 10, 30, 60, 300, 1800, 3600,
)  # fmt: skip

# Every metric the sidecar exports (SPEC sections 4, 7 and 8): adding one is one entry
# here; `Metrics` registers it and the monitoring bundle and the tests read this list.
JOBS = _metric(
    "step_runner_jobs_total", COUNTER, "Jobs whose outcome the sidecar observed.", ("result",)
)
JOB_FAILURES = _metric(
    "step_runner_job_failures_total",
    COUNTER,
    "Failed jobs by GitLab Runner failure reason and what was seen (SPEC section 3).",
    FAILURE_LABELS,
)
JOB_DURATION = _metric(
    "step_runner_job_duration_seconds",
    HISTOGRAM,
    "Job duration (Status end_time - start_time) by result.",
    ("result",),
    JOB_DURATION_BUCKETS,
)
GRPC_STARTED = _metric(
    "grpc_server_started_total", COUNTER, "RPCs started on the server.", GRPC_LABELS
)
GRPC_HANDLED = _metric(
    "grpc_server_handled_total",
    COUNTER,
    "RPCs completed on the server, regardless of success or failure.",
    (*GRPC_LABELS, "grpc_code"),
)
GRPC_MSG_RECEIVED = _metric(
    "grpc_server_msg_received_total",
    COUNTER,
    "RPC stream messages received on the server.",
    GRPC_LABELS,
)
GRPC_MSG_SENT = _metric(
    "grpc_server_msg_sent_total", COUNTER, "gRPC stream messages sent on the server.", GRPC_LABELS
)
GRPC_HANDLING = _metric(
    "grpc_server_handling_seconds",
    HISTOGRAM,
    "Response latency (seconds) of gRPC calls, request HEADERS to end of stream.",
    GRPC_LABELS,
    HANDLING_BUCKETS,
)
# observer_core (exporter.native.OBSERVER_CORES): which observer decoded the traffic,
# the compiled core or its pure-Python reference; SPEC section 4 names only `version`.
BUILD_INFO = _metric(
    "step_runner_exporter_build_info", GAUGE, "The running build.", ("version", "observer_core")
)
UPSTREAM_UP = _metric(
    "step_runner_exporter_upstream_up", GAUGE, "1 while step-runner is reachable, else 0."
)
DECODE_ERRORS = _metric(
    "step_runner_exporter_decode_errors_total",
    COUNTER,
    "Messages forwarded but not decoded.",
    ("message",),
)
UNKNOWN_FIELDS = _metric(
    "step_runner_exporter_unknown_fields_total",
    COUNTER,
    "Decoded messages carrying fields this build does not know.",
    ("message",),
)
TRACKED_JOBS = _metric(
    "step_runner_exporter_tracked_jobs",
    GAUGE,
    "Jobs currently remembered for exactly-once counting.",
)
EVICTED_JOBS = _metric(
    "step_runner_exporter_evicted_jobs_total",
    COUNTER,
    "Jobs forgotten before their outcome was seen.",
)
REJECTED_CONNECTIONS = _metric(
    "step_runner_exporter_rejected_connections_total",
    COUNTER,
    "Client connections closed at once because limits.max_connections were open.",
)
DOCKER_REQUESTS = _metric(
    "step_runner_exporter_docker_requests_total",
    COUNTER,
    "Docker API requests forwarded by the docker tap, by method and endpoint.",
    ("method", "endpoint"),
)
DOCKER_EXEC_SESSIONS = _metric(
    "step_runner_exporter_docker_exec_sessions_total",
    COUNTER,
    "Exec sessions started through the docker tap: tapped (steps proxy) or not_step_runner.",
    ("state",),
)

# The sidecar's own workings, beyond the SPEC: read from the memos at scrape time.
HPACK_BLOCK_CACHE = _metric(
    "step_runner_exporter_hpack_block_cache_total",
    COUNTER,
    "Header blocks of connections following the shared HPACK block memo, by whether the "
    "memo had their decoding (hit) or the hpack library decoded them (miss).",
    ("result",),
)

# Defined above this line, so that it is in here.
METRICS: tuple[MetricSpec, ...] = tuple(_DEFINED)
# Metrics no SPEC section names: how well the sidecar's internals work.
INTERNAL_METRICS: tuple[MetricSpec, ...] = (HPACK_BLOCK_CACHE,)
# The result label values of HPACK_BLOCK_CACHE.
MEMO_RESULTS = ("hit", "miss")

# The process, platform and GC collectors every Prometheus Python exporter exposes.
DEFAULT_COLLECTORS = (ProcessCollector, PlatformCollector, GCCollector)


def register_default_collectors(registry: CollectorRegistry) -> None:
    for collector in DEFAULT_COLLECTORS:
        collector(registry=registry)


def _default_collector_samples() -> list[Sample]:
    scratch = CollectorRegistry()
    register_default_collectors(scratch)
    return [sample for family in scratch.collect() for sample in family.samples]


def default_collector_series() -> frozenset[str]:
    """The series names of DEFAULT_COLLECTORS on this platform."""
    return frozenset(sample.name for sample in _default_collector_samples())


# Static config labels must not reuse a label of any series the sidecar exports (ours,
# the default collectors', and `le`/`quantile` that histograms and summaries add), nor
# the target labels Prometheus attaches (`job`, `instance`: a static label of that name
# would be renamed exported_*).
RESERVED_LABELS = frozenset(
    {
        "job",
        "instance",
        "le",
        "quantile",
        *(label for spec in METRICS for label in spec.labels),
        *(label for sample in _default_collector_samples() for label in sample.labels),
    }
)

# OpenMetrics limits an exemplar's label set to 128 characters.
_EXEMPLAR_ID_MAX = 128 - len("job_id")
# GitLab job ids are digits with an optional "-run"; anything else in an exemplar is
# replaced so a hostile id cannot trip a scraper's parser (the job log line keeps it).
_EXEMPLAR_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]")


def exemplar_job_id(job_id: str) -> str:
    return _EXEMPLAR_UNSAFE.sub("_", job_id[:_EXEMPLAR_ID_MAX])


def known_methods(package: str) -> list[Method]:
    service = service_name(package)
    return [Method(service, name, kind) for name, kind in STEP_RUNNER_METHODS.items()]


class MemoCounts(Protocol):
    """What a memo counts of its lookups (exporter.hpack_cache.BlockCache)."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...


class MemoCollector(Collector):
    """HPACK_BLOCK_CACHE from the memos' own counts, read at scrape time so that the
    decoding path pays nothing but an integer increment."""

    def __init__(self, memos: Sequence[MemoCounts]) -> None:
        self._memos = tuple(memos)

    def collect(self) -> Iterator[Metric]:
        spec = HPACK_BLOCK_CACHE
        family = CounterMetricFamily(
            spec.name.removesuffix("_total"), spec.documentation, labels=spec.labels
        )
        family.add_metric(["hit"], sum(memo.hits for memo in self._memos))
        family.add_metric(["miss"], sum(memo.misses for memo in self._memos))
        yield family


class StaticLabels(Collector):
    """Adds the configuration's static labels to every sample of the wrapped registry.

    Doing it at collection time keeps every hot-path `labels()` call short and
    covers collectors we do not define (process, platform) too.
    """

    def __init__(self, inner: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self.inner = inner
        self.labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        return add_labels(self.inner.collect(), self.labels)


def add_labels(metrics: Iterable[Metric], labels: Mapping[str, str]) -> Iterator[Metric]:
    """The metrics with `labels` added to each sample (a sample's own label wins)."""
    for metric in metrics:
        if labels:
            metric.samples = [s._replace(labels={**labels, **s.labels}) for s in metric.samples]
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
        package: str | None = None,
        version: str = "unknown",
        observer_core: str = native.NAME,
        hpack_memos: Sequence[MemoCounts] = (),
    ) -> None:
        self._families = {
            spec: _family(spec, registry) for spec in METRICS if spec is not HPACK_BLOCK_CACHE
        }
        registry.register(MemoCollector(hpack_memos))
        self.jobs = self.counter(JOBS)
        self.job_failures = self.counter(JOB_FAILURES)
        self.job_duration = self.histogram(JOB_DURATION)
        self.started = self.counter(GRPC_STARTED)
        self.handled = self.counter(GRPC_HANDLED)
        self.msg_received = self.counter(GRPC_MSG_RECEIVED)
        self.msg_sent = self.counter(GRPC_MSG_SENT)
        self.handling = self.histogram(GRPC_HANDLING)
        self.build_info = self.gauge(BUILD_INFO)
        self.upstream_up = self.gauge(UPSTREAM_UP)
        self.decode_errors = self.counter(DECODE_ERRORS)
        self.unknown_fields = self.counter(UNKNOWN_FIELDS)
        self.tracked_jobs = self.gauge(TRACKED_JOBS)
        self.evicted_jobs = self.counter(EVICTED_JOBS)
        self.rejected_connections = self.counter(REJECTED_CONNECTIONS)
        self.docker_requests = self.counter(DOCKER_REQUESTS)
        self.docker_exec_sessions = self.counter(DOCKER_EXEC_SESSIONS)

        self.build_info.labels(version, observer_core).set(1)
        # Every series a dashboard or alert reads exists at 0 from the start.
        self._results = {result: self.jobs.labels(result) for result in RESULTS}
        self._durations = {result: self.job_duration.labels(result) for result in RESULTS}
        self._failures = {f: self.job_failures.labels(**f.labels()) for f in ALL_FAILURES}
        self._decode_errors = {m: self.decode_errors.labels(m) for m in DECODE_ERROR_MESSAGES}
        self._unknown_fields = {m: self.unknown_fields.labels(m) for m in DECODE_ERROR_MESSAGES}
        self._docker_requests = {
            (method, endpoint): self.docker_requests.labels(method, endpoint)
            for method in DOCKER_METHODS
            for endpoint in DOCKER_ENDPOINTS
        }
        self._exec_sessions = {s: self.docker_exec_sessions.labels(s) for s in EXEC_SESSION_STATES}
        self._methods: dict[Method, _MethodChildren] = {}
        self._services: set[str] = set()
        for method in (*known_methods(package or DEFAULT_PACKAGE), UNKNOWN_METHOD):
            self._methods[method] = _MethodChildren(self, method)
            self._services.add(method.service)

    def counter(self, spec: MetricSpec) -> Counter:
        family = self._families[spec]
        assert isinstance(family, Counter), spec
        return family

    def gauge(self, spec: MetricSpec) -> Gauge:
        family = self._families[spec]
        assert isinstance(family, Gauge), spec
        return family

    def histogram(self, spec: MetricSpec) -> Histogram:
        family = self._families[spec]
        assert isinstance(family, Histogram), spec
        return family

    def _method(self, method: Method) -> _MethodChildren:
        children = self._methods.get(method)
        if children is None:
            children = self._methods[self._bounded(method)]
        return children

    def _bounded(self, method: Method) -> Method:
        """The labels of a method not seen before, from a bounded set: the first
        MAX_SERVICES services as they are, later ones `unknown` (SPEC section 2)."""
        if STEP_RUNNER_METHODS.get(method.name) != method.grpc_type or not (
            method.service == UNKNOWN_LABEL or is_service(method.service)
        ):
            return UNKNOWN_METHOD
        services = self._services
        if method.service not in services:
            if len(services) - 1 >= MAX_SERVICES:  # UNKNOWN_METHOD's is not counted
                method = Method(UNKNOWN_LABEL, method.name, method.grpc_type)
            else:
                services.add(method.service)
        if method not in self._methods:
            self._methods[method] = _MethodChildren(self, method)
        return method

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

    def docker_request(self, method: str, endpoint: str) -> None:
        """`method` and `endpoint` from DOCKER_METHODS and DOCKER_ENDPOINTS."""
        self._docker_requests[method, endpoint].inc()

    def docker_exec_session(self, state: str) -> None:
        self._exec_sessions[state].inc()


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


def _family(spec: MetricSpec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    if spec.type is MetricType.HISTOGRAM:
        return Histogram(
            spec.name,
            spec.documentation,
            spec.labels,
            buckets=spec.buckets or Histogram.DEFAULT_BUCKETS,
            registry=registry,
        )
    kind = Counter if spec.type is MetricType.COUNTER else Gauge
    return kind(spec.name, spec.documentation, spec.labels, registry=registry)
