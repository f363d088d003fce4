"""The /metrics body: byte for byte what prometheus_client's encoders render for the
registry, at a fraction of their cost.

prometheus_client renders every sample from scratch on each scrape: a Sample tuple and
a merged label dict per series, labels sorted, names validated and escaped character by
character (about 7 ms as text and 11 ms as OpenMetrics for the sidecar's ~620 series
on this 2-core machine, while the splice waits for the GIL). The series of a Counter,
Gauge or Histogram keep their names and labels for life, so here what a sample's line
holds before its value (its prefix) is rendered once per child and format, by
prometheus_client itself: a one-sample family with a placeholder value, the value cut
off again. A scrape reads every value and formats it as prometheus_client does
(`floatToGoString`); a child whose values are the very objects of the last scrape
reuses its lines. Every other collector (process, platform, gc, the HPACK memo counts,
anything registered later) is rendered by prometheus_client as it is, in its place.

Nothing that a metric update changes is served from a cache without being read: a
scrape shows every update made before it started.
"""

from __future__ import annotations

import functools
import itertools
import operator
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client import metrics as client_metrics
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from .metrics import StaticLabels, add_labels

Encoder = Callable[[CollectorRegistry], bytes]
Labels = Mapping[str, str]
# The families rendered here. What of prometheus_client's internals is read (children,
# value holders, names) is typed Any: the library leaves most of it untyped.
_FAMILIES = (Counter, Gauge, Histogram)
_float_text: Callable[[float], str] = floatToGoString

# What prefixes are cut from: a value that renders the same in every format.
_PLACEHOLDER = 0.0
_PLACEHOLDER_TEXT = _float_text(_PLACEHOLDER).encode()
_EOF = b"# EOF\n"


class _UnsupportedError(Exception):
    """The registry is one for prometheus_client's own encoder."""


def _expect(cut: bool) -> None:
    """A rendering of prometheus_client's is not laid out as this module cuts it (another
    version): it renders the whole body itself."""
    if not cut:
        raise _UnsupportedError


class _Collected:
    """Given metrics, as the collector prometheus_client's encoders take."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> list[Metric]:
        return self._metrics


@dataclass(frozen=True)
class _Format:
    """One of prometheus_client's encoders with the options content negotiation gave it
    (escaping, version), and what the layout of its output depends on."""

    generate: Callable[..., bytes]
    options: tuple[tuple[str, Any], ...]
    openmetrics: bool
    # prometheus_client's process-wide switch for counters' and histograms' _created.
    created: bool

    def render(self, metrics: Iterable[Metric]) -> bytes:
        """prometheus_client's rendering of these metrics, as a part of a body."""
        body = self.generate(_Collected(metrics), **dict(self.options))
        return body.removesuffix(_EOF) if self.openmetrics else body


def _format(encoder: Encoder) -> _Format | None:
    """The format of an encoder `choose_encoder` returned; None for one we do not know."""
    generate: Any = encoder
    options: dict[str, Any] = {}
    if isinstance(encoder, functools.partial) and not encoder.args:
        generate, options = encoder.func, encoder.keywords
    if generate is not generate_text and generate is not generate_openmetrics:
        return None
    return _Format(
        generate,
        tuple(sorted(options.items())),
        generate is generate_openmetrics,
        client_metrics._use_created,
    )


class Exposition:
    """Renders one registry for /metrics, in any format `choose_encoder` picks.

    The web workers share it; one scrape renders at a time (they would take turns on
    the GIL anyway), which keeps the caches simple.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Bodies prometheus_client rendered whole: an encoder or a registry this module
        # does not know.
        self.generic_renders = 0
        self._lock = threading.Lock()
        self._families: dict[tuple[_Format, Any, tuple[tuple[str, str], ...]], _Family] = {}

    def render(self, encoder: Encoder) -> bytes:
        fmt = _format(encoder)
        # Multiprocess mode keeps values in files that its own collector merges.
        if fmt is not None and values.ValueClass is values.MutexValue:
            with self._lock:
                out: list[bytes] = []
                try:
                    self._registry(fmt, self.registry, {}, out)
                except _UnsupportedError:
                    pass
                else:
                    if fmt.openmetrics:
                        out.append(_EOF)
                    return b"".join(out)
        self.generic_renders += 1
        return encoder(self.registry)

    def _registry(
        self, fmt: _Format, registry: CollectorRegistry, static: Labels, out: list[bytes]
    ) -> None:
        # A registry of another kind, or one with a target_info (neither is ours).
        if type(registry) is not CollectorRegistry or registry.get_target_info():
            raise _UnsupportedError
        # The collectors in registration order, as CollectorRegistry.collect() walks them.
        with registry._lock:
            collectors = list(registry._collector_to_names)
        collector: Any
        for collector in collectors:
            # Exact types: a subclass may render its samples its own way.
            kind = type(collector)
            if kind is StaticLabels:
                self._registry(fmt, collector.inner, {**static, **collector.labels}, out)
            elif not (kind in _FAMILIES and self._family(fmt, collector, static).render(out)):
                out.append(fmt.render(add_labels(collector.collect(), static)))

    def _family(self, fmt: _Format, family: Any, static: Labels) -> _Family:
        key = (fmt, family, tuple(static.items()))
        cached = self._families.get(key)
        if cached is None:
            cached = self._families[key] = _Family(fmt, family, static)
        return cached


class _Family:
    """One Counter, Gauge or Histogram in one format: its header and its children,
    their prefixes rendered once by prometheus_client."""

    def __init__(self, fmt: _Format, family: Any, static: Labels) -> None:
        self.fmt = fmt
        self.family = family
        self.static = dict(static)
        self.kind = type(family)
        self.name = family._name
        # From the family's name, documentation, type and unit.
        self.header = fmt.render([family._get_metric()])
        # The samples of each child, (suffix, labels), in prometheus_client's order;
        # _created comes after them.
        self.layout: list[tuple[str, dict[str, str]]]
        self.buckets = 0
        self.has_sum = False
        if isinstance(family, Histogram):
            bounds = family._upper_bounds
            self.buckets = len(bounds)
            self.layout = [("_bucket", {"le": _float_text(b)}) for b in bounds]
            self.layout.append(("_count", {}))
            # prometheus_client leaves out _sum when a bucket is below 0.
            self.has_sum = bounds[0] >= 0
            if self.has_sum:
                self.layout.append(("_sum", {}))
        elif isinstance(family, Counter):
            self.layout = [("_total", {})]
        else:
            self.layout = [("", {})]
        self.has_created = fmt.created and self.kind is not Gauge
        # Text puts the _created samples of a family in a gauge family of their own
        # after it; this is that family's header.
        self.created_header = b""
        if self.has_created and not fmt.openmetrics:
            created = self.name + "_created"
            body = fmt.render([self._one(created, {})])
            line = self._line(created, {})
            _expect(body.startswith(self.header) and body.endswith(line))
            self.created_header = body[len(self.header) : -len(line)]
        self.children: dict[tuple[str, ...], _Child] = {}

    def _one(self, name: str, labels: Labels, exemplar: Exemplar | None = None) -> Metric:
        """The family with one sample of the placeholder value."""
        metric: Metric = self.family._get_metric()
        metric.add_sample(name, dict(labels), _PLACEHOLDER, exemplar=exemplar)
        return metric

    def _line(self, name: str, labels: Labels, exemplar: Exemplar | None = None) -> bytes:
        """prometheus_client's line for one sample of the placeholder value: the last
        line of the family's rendering (in text, _created follows its own header)."""
        body = self.fmt.render([self._one(name, labels, exemplar)])
        return body[body.rindex(b"\n", 0, -1) + 1 :]

    def prefix(self, name: str, labels: Labels) -> bytes:
        """What a sample's line holds before its value."""
        line = self._line(name, labels)
        end = _PLACEHOLDER_TEXT + b"\n"
        _expect(line.endswith(end))
        return line[: -len(end)]

    def exemplar(self, sample: int, exemplar: Exemplar) -> bytes:
        """What prometheus_client appends to the value of the layout's sample at this
        index when the sample carries this exemplar."""
        name = self.name + self.layout[sample][0]
        without = self._line(name, {})[:-1]
        line = self._line(name, {}, exemplar)
        _expect(line.startswith(without))
        return line[len(without) : -1]

    def render(self, out: list[bytes]) -> bool:
        """Appends the family's part of the body; False when prometheus_client must."""
        family = self.family
        children: list[tuple[tuple[str, ...], Any]]
        if family._is_parent():
            with family._lock:
                children = list(family._metrics.items())
        else:
            children = [((), family)]
        # Gauge.set_function gives a child samples of its own making.
        if self.kind is Gauge and any("_child_samples" in vars(c) for _, c in children):
            return False
        out.append(self.header)
        # OpenMetrics has each child's _created right after its other samples.
        created: list[bytes] = out if self.fmt.openmetrics else []
        cache = self.children
        for labelvalues, child in children:
            entry = cache.get(labelvalues)
            # Checked by identity: a child removed and added again is a new object.
            if entry is None or entry.child is not child:
                entry = cache[labelvalues] = _Child(self, labelvalues, child)
            entry.render(out, created)
        if created and created is not out:
            out.append(self.created_header)
            out.extend(created)
        return True


class _Child:
    """One child in one format: its prefixes, and its lines as last rendered together
    with the objects they were rendered from.

    prometheus_client replaces a value's float object on every update, so a child whose
    values, exemplars and creation time are all the very objects of the last scrape
    renders to the same lines; most children of a sidecar do not change between two
    scrapes.
    """

    __slots__ = (
        "cells",
        "child",
        "created",
        "created_line",
        "exemplar_cells",
        "family",
        "lines",
        "prefixes",
        "state",
        "tails",
    )

    def __init__(self, family: _Family, labelvalues: tuple[str, ...], child: Any) -> None:
        self.family = family
        self.child = child
        # The labels a sample carries: static, then the child's, then the sample's own,
        # each overriding the one before (as StaticLabels and prometheus_client merge).
        series = {**family.static, **dict(zip(family.family._labelnames, labelvalues, strict=True))}
        self.prefixes = [
            family.prefix(family.name + suffix, {**series, **labels})
            for suffix, labels in family.layout
        ]
        self.created = (
            family.prefix(family.name + "_created", series) if family.has_created else b""
        )
        # The holders (values.MutexValue) prometheus_client reads the samples from, made
        # with the child and never replaced: the buckets, then _sum; for exemplars
        # (only OpenMetrics has them) the buckets or a counter's value.
        if family.kind is Histogram:
            self.cells = [*child._buckets, child._sum] if family.has_sum else list(child._buckets)
            self.exemplar_cells = list(child._buckets)
        else:
            self.cells = [child._value]
            self.exemplar_cells = [child._value] if family.kind is Counter else []
        if not family.fmt.openmetrics:
            self.exemplar_cells = []
        self.state: list[Any] = []
        self.tails: dict[int, tuple[Exemplar, bytes]] = {}
        self.lines = b""
        self.created_line = b""

    def render(self, out: list[bytes], created: list[bytes]) -> None:
        # The holders' attributes, not their get(): a lock guards each update's
        # read-modify-write, and reading one attribute is atomic under the GIL. The
        # calls and locks were a third of a scrape.
        state = [cell._value for cell in self.cells]
        if self.exemplar_cells:
            state.extend([cell._exemplar for cell in self.exemplar_cells])
        if self.created:
            state.append(self.child._created)
        last = self.state
        if len(state) != len(last) or not all(map(operator.is_, state, last)):
            self.state = state
            self._format(state)
        out.append(self.lines)
        if self.created:
            created.append(self.created_line)

    def _format(self, state: list[Any]) -> None:
        family = self.family
        n = len(self.cells)
        numbers = state[:n]
        if family.buckets:
            # Buckets are exported cumulative (summed from 0.0 up, as prometheus_client
            # does), then _count (all of them), then _sum.
            counts = list(itertools.accumulate(numbers[: family.buckets], initial=0.0))[1:]
            numbers = [*counts, counts[-1], *numbers[family.buckets :]]
        exemplars = state[n : n + len(self.exemplar_cells)]
        lines = []
        for i, (prefix, value) in enumerate(zip(self.prefixes, numbers, strict=True)):
            exemplar = exemplars[i] if i < len(exemplars) else None
            tail = b"" if exemplar is None else self._tail(i, exemplar)
            lines.append(b"%s%s%s\n" % (prefix, _float_text(value).encode(), tail))
        self.lines = b"".join(lines)
        if self.created:
            self.created_line = b"%s%s\n" % (self.created, _float_text(state[-1]).encode())

    def _tail(self, sample: int, exemplar: Exemplar) -> bytes:
        # An exemplar stays while other observations change its child: rendered once.
        known = self.tails.get(sample)
        if known is None or known[0] is not exemplar:
            known = self.tails[sample] = (exemplar, self.family.exemplar(sample, exemplar))
        return known[1]
