"""Glue between what the observer sees and what is exported: metrics, the job
tracker and the one log line per classified job. One instance per upstream."""

from __future__ import annotations

import logging

from .events import CallEnded, Method, ObserverSink
from .logs import fields
from .metrics import Metrics
from .tracker import Decision, JobContext, JobTracker

log = logging.getLogger("exporter.jobs")


class Accounting:
    """Implements events.ObserverSink (for every observer of one upstream) and
    tracker.DecisionSink."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        upstream: str,
        max_jobs: int = 10_000,
        ttl: float = 6 * 3600.0,
    ) -> None:
        self.metrics = metrics
        self.upstream = upstream
        self.tracker = JobTracker(self, max_jobs=max_jobs, ttl=ttl)
        tracker = self.tracker
        metrics.tracked_jobs.set_function(lambda: len(tracker))

    def bound(self, context: JobContext) -> ObserverSink:
        """A sink for one connection whose jobs carry `context` into their log line."""
        return _BoundSink(self, context)

    # ObserverSink
    def call_started(self, method: Method) -> None:
        self.metrics.call_started(method)

    def call_ended(self, call: CallEnded) -> None:
        self.metrics.call_ended(call)
        self.tracker.call_ended(self.upstream, call)

    def decode_error(self, message: str) -> None:
        self.metrics.decode_error(message)

    def unknown_fields(self, message: str) -> None:
        self.metrics.unknown_field(message)

    # DecisionSink
    def job_decided(self, decision: Decision) -> None:
        outcome = decision.outcome
        self.metrics.job_decided(decision.job_id, outcome, decision.duration_seconds)
        failure = outcome.failure
        log.info(
            "job classified",
            extra=fields(
                job_id=decision.job_id,
                result=outcome.result,
                failure_reason=failure.failure_reason if failure else "",
                source=failure.source if failure else "",
                kind=failure.kind if failure else "",
                category=failure.category if failure else "",
                decided_by=decision.decided_by,
                duration=decision.duration_seconds,
                **dict(decision.context),
            ),
        )

    def job_evicted(self, upstream: str, job_id: str, reason: str) -> None:
        self.metrics.job_evicted()
        log.info("job forgotten before its outcome", extra=fields(job_id=job_id, reason=reason))


class _BoundSink:
    """The accounting as one connection's observer sees it, with that connection's
    context attached to its calls."""

    __slots__ = ("_accounting", "_context")

    def __init__(self, accounting: Accounting, context: JobContext) -> None:
        self._accounting = accounting
        self._context = context

    def call_started(self, method: Method) -> None:
        self._accounting.metrics.call_started(method)

    def call_ended(self, call: CallEnded) -> None:
        accounting = self._accounting
        accounting.metrics.call_ended(call)
        accounting.tracker.call_ended(accounting.upstream, call, self._context)

    def decode_error(self, message: str) -> None:
        self._accounting.metrics.decode_error(message)

    def unknown_fields(self, message: str) -> None:
        self._accounting.metrics.unknown_field(message)
