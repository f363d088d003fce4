"""Metric names, labels, zero series and exemplars (SPEC section 4)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from exporter import classifier as c
from exporter import metrics as metrics_module
from exporter import native
from exporter.app import Sidecar
from exporter.config import parse_config
from exporter.events import UNKNOWN_METHOD, CallEnded, Code, Method
from exporter.methods import MAX_SERVICES, service_name
from exporter.metrics import (
    METRICS,
    RESERVED_LABELS,
    Metrics,
    MetricSpec,
    MetricType,
    default_collector_series,
    labelled_registry,
    register_default_collectors,
)

RUN = Method("proto.StepRunner", "Run", "unary")
FOLLOW = Method("proto.StepRunner", "FollowLogs", "server_stream")


def fresh(**labels: str) -> tuple[Metrics, CollectorRegistry, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(registry, version="1.2.3")
    return metrics, registry, labelled_registry(registry, labels)


def test_every_spec_metric_is_exposed() -> None:
    _, _, exposed = fresh()
    names = {f.name for f in text_string_to_metric_families(generate_latest(exposed).decode())}
    for spec in METRICS:
        assert spec.name.removesuffix("_total") in names, spec


def test_the_sidecar_exports_only_the_defined_metrics_with_their_types_and_labels() -> None:
    # The whole sidecar, default collectors included: a metric registered anywhere but
    # from METRICS shows up here.
    config = parse_config({"listen": "unix:///run/a.sock", "upstream": "unix:///run/b.sock"})
    sidecar = Sidecar(config, web=False)
    families = {f.name: f for f in sidecar.exposed.collect()}
    collectors = {name.removesuffix("_total") for name in default_collector_series()}
    assert set(families) - collectors == {spec.name.removesuffix("_total") for spec in METRICS}
    for spec in METRICS:
        family = families[spec.name.removesuffix("_total")]
        assert family.type == spec.type.value, spec
        extra = {"le"} if spec.type is MetricType.HISTOGRAM else set()
        for sample in family.samples:
            assert set(spec.labels) <= set(sample.labels) <= set(spec.labels) | extra, sample


def test_every_metric_defined_is_in_the_list() -> None:
    defined = {v for v in vars(metrics_module).values() if isinstance(v, MetricSpec)}
    assert defined == set(METRICS)
    assert len({spec.name for spec in METRICS}) == len(METRICS)


def test_reserved_labels_cover_every_exported_label() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    register_default_collectors(registry)
    labels = {label for family in registry.collect() for s in family.samples for label in s.labels}
    assert {"generation", "implementation", "major", "version"} <= labels
    assert labels | {"job", "instance", "quantile"} <= RESERVED_LABELS


def test_failure_combinations_exist_at_zero_from_start() -> None:
    _, registry, _ = fresh()
    for failure in c.ALL_FAILURES:
        value = registry.get_sample_value("step_runner_job_failures_total", failure.labels())
        assert value == 0.0, failure
    for result in c.RESULTS:
        assert registry.get_sample_value("step_runner_jobs_total", {"result": result}) == 0.0
    labels = {"grpc_type": "unary", "grpc_service": "proto.StepRunner", "grpc_method": "Status"}
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "Internal"})
        == 0
    )
    build = {"version": "1.2.3", "observer_core": native.NAME}
    assert registry.get_sample_value("step_runner_exporter_build_info", build) == 1


def test_build_info_names_the_observer_core_given() -> None:
    registry = CollectorRegistry()
    Metrics(registry, version="1", observer_core=native.PURE)
    build = {"version": "1", "observer_core": "python"}
    assert registry.get_sample_value("step_runner_exporter_build_info", build) == 1


def test_job_decided_counts_result_failure_and_duration() -> None:
    metrics, registry, _ = fresh()
    failure = c.Outcome("failed", c.GRPC_INTERNAL)
    metrics.job_decided("42", failure, 1.5)
    metrics.job_decided("43", c.SUCCESS, None)
    assert registry.get_sample_value("step_runner_jobs_total", {"result": "failed"}) == 1
    assert registry.get_sample_value("step_runner_jobs_total", {"result": "success"}) == 1
    assert (
        registry.get_sample_value("step_runner_job_failures_total", c.GRPC_INTERNAL.labels()) == 1
    )
    assert (
        registry.get_sample_value("step_runner_job_duration_seconds_count", {"result": "failed"})
        == 1
    )
    assert (
        registry.get_sample_value("step_runner_job_duration_seconds_sum", {"result": "failed"})
        == 1.5
    )
    assert (
        registry.get_sample_value("step_runner_job_duration_seconds_count", {"result": "success"})
        == 0
    )


def test_failure_exemplar_carries_job_id_in_openmetrics() -> None:
    metrics, _, exposed = fresh()
    metrics.job_decided('12"\n3', c.Outcome("failed", c.GRPC_INTERNAL), None)
    text = generate_openmetrics(exposed).decode()
    families = {f.name: f for f in parse_om(text)}
    samples = [
        s
        for s in families["step_runner_job_failures"].samples
        if s.name.endswith("_total") and s.value == 1
    ]
    assert len(samples) == 1
    assert samples[0].exemplar is not None
    # Characters a job id should never have are replaced, so no scraper chokes on them.
    assert samples[0].exemplar.labels == {"job_id": "12__3"}


def test_long_job_id_exemplar_is_truncated_to_the_openmetrics_limit() -> None:
    metrics, _, exposed = fresh()
    metrics.job_decided("x" * 500, c.Outcome("failed", c.GRPC_INTERNAL), None)
    text = generate_openmetrics(exposed).decode()
    exemplar = next(s.exemplar for f in parse_om(text) for s in f.samples if s.exemplar is not None)
    assert len("job_id") + len(exemplar.labels["job_id"]) <= 128


def test_call_metrics_count_per_method_and_code() -> None:
    metrics, registry, _ = fresh()
    metrics.call_started(FOLLOW)
    metrics.call_ended(CallEnded(FOLLOW, "1", Code.OK, 0.25, 1, 7))
    labels = {
        "grpc_type": "server_stream",
        "grpc_service": "proto.StepRunner",
        "grpc_method": "FollowLogs",
    }
    assert registry.get_sample_value("grpc_server_started_total", labels) == 1
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 1
    )
    assert registry.get_sample_value("grpc_server_msg_received_total", labels) == 1
    assert registry.get_sample_value("grpc_server_msg_sent_total", labels) == 7
    assert registry.get_sample_value("grpc_server_handling_seconds_sum", labels) == 0.25


def test_unknown_methods_and_codes_do_not_grow_the_label_set() -> None:
    metrics, registry, exposed = fresh()
    before = len(generate_latest(exposed).splitlines())
    for i in range(100):
        odd = Method(f"svc{i}", f"m{i}", "unary")
        metrics.call_started(odd)
        metrics.call_ended(CallEnded(odd, None, 1000 + i, 0.001, 1, 1))
        metrics.call_ended(CallEnded(UNKNOWN_METHOD, None, Code.OK, 0.001, 1, 1))
        metrics.decode_error(f"message{i}")
    assert len(generate_latest(exposed).splitlines()) == before
    unknown = {"grpc_type": "unknown", "grpc_service": "unknown", "grpc_method": "unknown"}
    assert registry.get_sample_value("grpc_server_started_total", unknown) == 100
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**unknown, "grpc_code": "Unknown"})
        == 100
    )


def test_services_of_other_packages_are_labelled_from_a_bounded_set() -> None:
    metrics, registry, exposed = fresh()
    packages = [f"pkg{i}" for i in range(MAX_SERVICES + 3)]
    for package in ["proto", *packages, *packages]:
        method = Method(service_name(package), "Status", "unary")
        metrics.call_started(method)
        metrics.call_ended(CallEnded(method, "1", Code.OK, 0.001, 1, 1))
    services = {
        s.labels["grpc_service"]
        for family in text_string_to_metric_families(generate_latest(exposed).decode())
        for s in family.samples
        if "grpc_service" in s.labels
    }
    # proto, which exists from the start, and the first ones seen, as on the wire.
    kept = {service_name(p) for p in ["proto", *packages[: MAX_SERVICES - 1]]}
    assert services == {*kept, "unknown"}

    def started(service: str) -> float | None:
        labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": "Status"}
        return registry.get_sample_value("grpc_server_started_total", labels)

    assert started("pkg0.StepRunner") == 2
    assert started("unknown") == 2 * (len(packages) - (MAX_SERVICES - 1))


def test_static_labels_are_added_to_every_series() -> None:
    _, _, exposed = fresh(runner="r1", zone="a")
    families = list(text_string_to_metric_families(generate_latest(exposed).decode()))
    assert families
    for family in families:
        for sample in family.samples:
            assert sample.labels.get("runner") == "r1" and sample.labels.get("zone") == "a", sample
    value = exposed.get_sample_value(
        "step_runner_jobs_total", {"runner": "r1", "zone": "a", "result": "failed"}
    )
    assert value == 0
