"""The /metrics body equals prometheus_client's, byte for byte (exporter.exposition).

Differential: hypothesis drives metric updates, with label values that need escaping
and floats prometheus_client formats its own way, and after each update the body
exposition renders must equal what prometheus_client's `generate_latest` (text) and
`openmetrics.exposition.generate_latest` render for the same registry, in every format
and escaping `choose_encoder` negotiates. The default collectors are in it; the process
collector reads a fixed /proc (tests/fixtures/proc) and garbage collection is held
still while a pair of bodies is rendered, so nothing changes between the two.
"""

from __future__ import annotations

import gc
import gzip as gzip_module
import http.client
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
)
from prometheus_client import metrics as client_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from exporter import classifier as c
from exporter.app import Sidecar
from exporter.config import parse_config
from exporter.events import DECODE_ERROR_MESSAGES, UNKNOWN_METHOD, CallEnded, Code, Method
from exporter.exposition import Exposition
from exporter.methods import DEFAULT_PACKAGE
from exporter.metrics import (
    DEFAULT_COLLECTORS,
    DOCKER_ENDPOINTS,
    DOCKER_METHODS,
    EXEC_SESSION_STATES,
    known_methods,
    labelled_registry,
)
from exporter.web import WebServer

PROC = Path(__file__).resolve().parent.parent / "fixtures" / "proc"
PID = 4242

# What scrapers send: prometheus_client's own default (no header), Prometheus 2 and 3
# (OpenMetrics first, UTF-8 names allowed), and every escaping and version choose_encoder
# understands.
ACCEPTS = (
    "",
    "*/*",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=dots",
    "text/plain;version=1.0.0;escaping=values",
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0; charset=utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "application/openmetrics-text;version=1.0.0;escaping=dots",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    "application/openmetrics-text;version=2.0.0;escaping=underscores",
)
ODD_FLOATS = (
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    0.0,
    1e-9,
    1e21,
    5e-324,
    1.7976931348623157e308,
    0.1,
    123456.7,
    1234567.0,
    12345678.9,
    1e6,
    -2.5,
)
floats = st.sampled_from(ODD_FLOATS) | st.floats()
# Counters refuse amounts below 0 (NaN is not below 0).
amounts = floats.filter(lambda v: not v < 0)
# Label values prometheus_client escapes (backslash, newline, double quote), and others.
label_values = st.sampled_from(["\\", "\n", '"', '\\"\n', "a\\nb", "ü", '{x="1"}', ""]) | (
    st.text(st.characters(exclude_categories=["Cs"]), max_size=6)
)
exemplar_ids = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


@contextmanager
def gc_still() -> Iterator[None]:
    """No collection runs meanwhile: GCCollector's counts stay as they are."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def assert_same_body(exposition: Exposition, accept: str) -> bytes:
    encoder, _ = choose_encoder(accept)
    with gc_still():
        ours = exposition.render(encoder)
        theirs = encoder(exposition.registry)
    assert ours == theirs, accept
    return ours


def default_collectors(registry: CollectorRegistry) -> None:
    """DEFAULT_COLLECTORS, in their order, the process one on the fixed /proc."""
    assert (ProcessCollector, PlatformCollector, GCCollector) == DEFAULT_COLLECTORS
    ProcessCollector(pid=lambda: PID, proc=str(PROC), registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


# -- the sidecar's own registry ---------------------------------------------------------

METHODS = [
    *known_methods(DEFAULT_PACKAGE),
    *known_methods("step"),
    *known_methods("other.v2"),
    *known_methods("a"),
    *known_methods("b"),  # beyond MAX_SERVICES: labelled unknown
    UNKNOWN_METHOD,
    Method("proto.StepRunner", "Nope", "unary"),
]
FAILURES = list(c.ALL_FAILURES)


def _job(job_id: str, failure: int | None, duration: float | None) -> Any:
    return (
        "job",
        job_id,
        c.Outcome("failed", FAILURES[failure]) if failure is not None else c.SUCCESS,
        duration,
    )


sidecar_steps = st.one_of(
    st.tuples(st.just("started"), st.sampled_from(METHODS)),
    st.tuples(
        st.just("ended"),
        st.sampled_from(METHODS),
        st.sampled_from([*Code, 99]),
        floats,
        st.integers(0, 3),
        st.integers(0, 3),
    ),
    st.builds(
        _job,
        exemplar_ids,
        st.none() | st.integers(0, len(FAILURES) - 1),
        st.none() | floats,
    ),
    st.tuples(st.just("decode_error"), st.sampled_from([*DECODE_ERROR_MESSAGES, "other"])),
    st.tuples(st.just("unknown_field"), st.sampled_from(DECODE_ERROR_MESSAGES)),
    st.tuples(
        st.just("docker"), st.sampled_from(DOCKER_METHODS), st.sampled_from(DOCKER_ENDPOINTS)
    ),
    st.tuples(st.just("exec"), st.sampled_from(EXEC_SESSION_STATES)),
    st.tuples(st.just("tracked"), floats),
    st.tuples(st.just("up"), st.sampled_from([0, 1])),
    st.tuples(st.just("evicted")),
)
static_labels = st.dictionaries(
    st.sampled_from(["runner", "zone", "a", "zz_last"]),
    label_values.filter(bool),
    max_size=3,
)


def apply_sidecar_step(car: Sidecar, step: Any) -> None:
    m = car.metrics
    match step:
        case ("started", method):
            m.call_started(method)
        case ("ended", method, code, duration, received, sent):
            m.call_ended(CallEnded(method, "1", code, duration, received, sent))
        case ("job", job_id, outcome, duration):
            m.job_decided(job_id, outcome, duration)
        case ("decode_error", message):
            m.decode_error(message)
        case ("unknown_field", message):
            m.unknown_field(message)
        case ("docker", method, endpoint):
            m.docker_request(method, endpoint)
        case ("exec", state):
            m.docker_exec_session(state)
        case ("tracked", value):
            m.tracked_jobs.set(value)
        case ("up", value):
            m.upstream_up.set(value)
        case ("evicted",):
            m.job_evicted()


@settings(max_examples=40, deadline=None)
@given(
    static_labels,
    st.lists(st.tuples(sidecar_steps, st.sampled_from(ACCEPTS)), min_size=1, max_size=12),
)
def test_the_sidecars_body_is_prometheus_clients(labels: dict[str, str], steps: Any) -> None:
    # As `serve` builds it (exporter.app), the process collector on the fixed /proc.
    registry = CollectorRegistry()
    default_collectors(registry)
    config = parse_config(
        {"listen": "unix:///run/a.sock", "upstream": "unix:///run/b.sock", "labels": labels}
    )
    car = Sidecar(config, registry, web=False, process_metrics=False)
    exposition = Exposition(car.exposed)
    for step, accept in steps:
        apply_sidecar_step(car, step)
        assert_same_body(exposition, accept)
    assert exposition.generic_renders == 0


# -- any family prometheus_client has -----------------------------------------------------


class Families:
    """Families of every kind and shape this module renders itself, and some it leaves to
    prometheus_client (Summary, Info, Enum, a Gauge with a function), in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "requests", "Requests.\nBy path \\ code.", ["path", "code"], registry=registry
        )
        # UTF-8 names: quoted or escaped, as the escaping asks.
        self.dotted = Counter(
            "svc.requests", 'A "dotted" name.', ["http.method"], registry=registry
        )
        self.bare = Counter("bare", "No labels.", registry=registry)
        self.unit = Counter("transfer", "With a unit.", ["path"], unit="bytes", registry=registry)
        self.gauge = Gauge("temp", "Temperature.", ["room"], registry=registry)
        self.level = Gauge("level", "No labels.", registry=registry)
        self.function = Gauge("computed", "From a function.", ["path"], registry=registry)
        # A bucket below 0: prometheus_client then leaves out _sum.
        self.histogram = Histogram(
            "latency", "Latency.", ["route"], buckets=(-1, 0, 0.5, 1e21), registry=registry
        )
        self.wait = Histogram("wait_seconds", "Default buckets, no labels.", registry=registry)
        self.summary = Summary("sizes", "A summary.", ["path"], registry=registry)
        self.info = Info("build", "An info.", registry=registry)
        self.enum = Enum("state", "An enum.", states=["a", "b"], registry=registry)
        self.cell = [0.0]
        self.function.labels("x").set_function(lambda: self.cell[0])


values2 = st.tuples(label_values, label_values)
values1 = st.tuples(label_values)
exemplars = st.none() | st.builds(lambda v: {"trace_id": v}, exemplar_ids)
family_steps = st.one_of(
    st.tuples(
        st.just("inc"),
        st.sampled_from(["counter", "unit", "dotted", "bare"]),
        values2,
        amounts,
        exemplars,
    ),
    st.tuples(st.just("set"), st.sampled_from(["gauge", "level"]), values1, floats),
    st.tuples(
        st.just("observe"), st.sampled_from(["histogram", "wait"]), values1, floats, exemplars
    ),
    st.tuples(st.just("remove"), st.sampled_from(["counter", "gauge", "histogram"]), values2),
    st.tuples(st.just("clear"), st.sampled_from(["counter", "histogram", "dotted"])),
    st.tuples(st.just("reset"), values2),
    st.tuples(st.just("function"), floats),
    st.tuples(st.just("summary"), values1, floats),
    st.tuples(
        st.just("info"), st.dictionaries(st.sampled_from(["version", "commit"]), label_values)
    ),
    st.tuples(st.just("enum"), st.sampled_from(["a", "b"])),
)


def _child(family: Any, values: tuple[str, ...]) -> Any:
    names = family._labelnames
    return family.labels(*values[: len(names)]) if names else family


def apply_family_step(f: Families, step: Any) -> None:
    match step:
        case ("inc", name, values, amount, exemplar):
            _child(getattr(f, name), values).inc(amount, exemplar=exemplar)
        case ("set", name, values, value):
            _child(getattr(f, name), values).set(value)
        case ("observe", name, values, value, exemplar):
            _child(getattr(f, name), values).observe(value, exemplar=exemplar)
        case ("remove", name, values):
            family = getattr(f, name)
            n = len(family._labelnames)
            family.remove(*values[:n])
        case ("clear", name):
            getattr(f, name).clear()
        case ("reset", values):
            f.counter.labels(*values).reset()
        case ("function", value):
            f.cell[0] = value
        case ("summary", values, value):
            f.summary.labels(*values).observe(value)
        case ("info", labels):
            f.info.info(labels)
        case ("enum", state):
            f.enum.state(state)


@pytest.mark.parametrize("created", [True, False], ids=["created", "no_created"])
@settings(max_examples=60, deadline=None)
@given(
    static_labels | st.just({"path": "static loses to the family's own"}),
    static_labels,
    st.lists(st.tuples(family_steps, st.sampled_from(ACCEPTS)), min_size=1, max_size=20),
)
def test_any_familys_body_is_prometheus_clients(
    created: bool, inner_labels: dict[str, str], outer_labels: dict[str, str], steps: Any
) -> None:
    registry = CollectorRegistry()
    default_collectors(registry)
    families = Families(registry)
    # Static labels wrapped twice: the outer ones apply to the inner registry's too.
    exposed = labelled_registry(labelled_registry(registry, inner_labels), outer_labels)
    exposition = Exposition(exposed)
    was = client_metrics._use_created
    (client_metrics.enable_created_metrics if created else client_metrics.disable_created_metrics)()
    try:
        for step, accept in steps:
            apply_family_step(families, step)
            assert_same_body(exposition, accept)
    finally:
        (client_metrics.enable_created_metrics if was else client_metrics.disable_created_metrics)()
    assert exposition.generic_renders == 0


# -- what the differential walk may not reach -------------------------------------------


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_values_that_compare_equal_render_as_they_are(accept: str) -> None:
    # 0.0 == -0.0 and NaN != NaN: lines are reused only for the very same objects.
    registry = CollectorRegistry()
    gauge = Gauge("g", "A gauge.", registry=registry)
    counter = Counter("c", "A counter.", registry=registry)
    exposition = Exposition(registry)
    bodies = []
    for value in (0.0, -0.0, 0.0, math.nan, math.nan, 1e21, 1e21 + 0.0):
        gauge.set(value)
        counter.inc(0.0)  # a new float object of the same value every time
        bodies.append(assert_same_body(exposition, accept))
    assert b"g -0.0\n" in bodies[1]
    assert b"g 0.0\n" in bodies[2]
    assert exposition.generic_renders == 0


def test_what_this_module_does_not_know_is_rendered_by_prometheus_client() -> None:
    registry = CollectorRegistry(target_info={"service": "x"})
    Counter("c", "A counter.", registry=registry).inc()
    exposition = Exposition(registry)
    assert_same_body(exposition, "")
    assert exposition.generic_renders == 1

    plain = CollectorRegistry()
    Counter("c", "A counter.", registry=plain).inc()
    exposition = Exposition(plain)
    assert exposition.render(generate_openmetrics) == generate_openmetrics(plain)
    assert exposition.generic_renders == 0
    own_encoder = lambda registry: b"mine"  # noqa: E731
    assert exposition.render(own_encoder) == b"mine"
    assert exposition.generic_renders == 1


def _get(port: int, accept: str | None, gzip: bool = False) -> tuple[str, str | None, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Accept": accept} if accept is not None else {}
    if gzip:
        headers["Accept-Encoding"] = "gzip"
    try:
        connection.request("GET", "/metrics", headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        return (
            response.getheader("Content-Type", ""),
            response.getheader("Content-Encoding"),
            response.read(),
        )
    finally:
        connection.close()


@pytest.mark.parametrize("accept", [None, *ACCEPTS])
def test_the_web_endpoint_serves_prometheus_clients_body(accept: str | None) -> None:
    registry = CollectorRegistry()
    default_collectors(registry)
    config = parse_config(
        {
            "listen": "unix:///run/a.sock",
            "upstream": "unix:///run/b.sock",
            "labels": {"runner": 'r"1'},
        }
    )
    car = Sidecar(config, registry, web=False, process_metrics=False)
    car.metrics.job_decided("42", c.Outcome("failed", FAILURES[0]), 3.0)
    web = WebServer(car.exposed, host="127.0.0.1", port=0)
    web.start()
    try:
        encoder, content_type = choose_encoder(accept or "")
        for gzip in (False, True):
            with gc_still():
                served_type, encoding, body = _get(web.port, accept, gzip)
                expected = encoder(car.exposed)
            assert served_type == content_type
            if gzip:
                assert encoding == "gzip"
                body = gzip_module.decompress(body)
            else:
                assert encoding is None
            assert body == expected
    finally:
        web.stop()
    assert web.exposition.generic_renders == 0


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_a_scrape_of_the_sidecar_costs_a_fraction_of_prometheus_clients(accept: str) -> None:
    # CPU time, best of several rounds, the two interleaved: a loaded machine slows
    # both alike. Measured here about 15x; a fallback to the library would be 1x.
    config = parse_config({"listen": "unix:///run/a.sock", "upstream": "unix:///run/b.sock"})
    car = Sidecar(config, CollectorRegistry(), web=False)
    exposition = Exposition(car.exposed)
    encoder, _ = choose_encoder(accept)
    exposition.render(encoder)  # the prefixes are rendered once, at the first scrape

    def cpu(render: Any) -> float:
        started = time.process_time()
        for _ in range(10):
            render(encoder)
        return time.process_time() - started

    ours = min(cpu(exposition.render) for _ in range(5))
    theirs = min(cpu(lambda e: e(car.exposed)) for _ in range(5))
    assert ours * 4 < theirs, (ours, theirs)
    assert exposition.generic_renders == 0
