"""Exactly-once accounting per job: the job-level rules of SPEC section 3.

A job's outcome comes only from its own calls; the first terminal observation wins;
a list-all Status and the result of Cancel decide nothing; Close after a non-terminal
Status decides unknown_failure; Close with nothing seen forgets the job (evicted).
Memory is bounded by `max_jobs` and `ttl`. Decided jobs stay remembered (until the
TTL or the bound) so that a late Status or Close can never count them again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .classifier import (
    CallFailed,
    ClosedWhileRunning,
    Observation,
    Outcome,
    ResponseUndecodable,
    StatusSeen,
    classify,
)
from .events import CallEnded, JobStatus

# What a tap knows of the connection a job's calls came through, as log fields
# (the docker tap: container_id, exec_id); empty for the step-runner tap.
JobContext = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """A job decided: what the metrics and the job log line are made of."""

    upstream: str
    job_id: str
    outcome: Outcome
    decided_by: str  # "Status", "<Method>:<Code>", "Close", ...
    duration_seconds: float | None
    context: JobContext = ()


class DecisionSink(Protocol):
    def job_decided(self, decision: Decision) -> None: ...

    def job_evicted(self, upstream: str, job_id: str, reason: str) -> None: ...


@dataclass(slots=True)
class _Job:
    last_seen: float
    decided: bool = False
    pending_running: bool = False  # last Status was running/unspecified without error
    closed: bool = False
    context: JobContext = ()  # of the latest of its calls that came with one


class JobTracker:
    def __init__(
        self,
        sink: DecisionSink,
        *,
        max_jobs: int = 10_000,
        ttl: float = 6 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._max_jobs = max_jobs
        self._ttl = ttl
        self._clock = clock
        # Ordered by last activity, oldest first: eviction pops from the front.
        self._jobs: OrderedDict[tuple[str, str], _Job] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def call_ended(self, upstream: str, call: CallEnded, context: JobContext = ()) -> None:
        job_id = call.job_id
        method = call.method.name
        # Only StepRunner calls that name a job belong to one; list-all Status
        # (empty id) and Cancel's own result decide nothing (SPEC section 3).
        if not call.method.known or not job_id or method == "Cancel" or call.refused:
            return
        now = self._clock()
        job = self._touch(upstream, job_id, now)
        if context:
            job.context = context
        if not job.decided:
            self._observe(upstream, job_id, job, call)
        if method == "Close":
            self._closed(upstream, job_id, job)
        self.expire(now)

    def _touch(self, upstream: str, job_id: str, now: float) -> _Job:
        key = (upstream, job_id)
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = _Job(last_seen=now)
        else:
            job.last_seen = now
            self._jobs.move_to_end(key)
        return job

    def _observe(self, upstream: str, job_id: str, job: _Job, call: CallEnded) -> None:
        observation: Observation
        decided_by = "Status"
        duration: float | None = None
        code = call.code
        if code != 0:
            observation = CallFailed(code)
            decided_by = f"{call.method.name}:{code}"
        elif call.response_undecodable:
            observation = ResponseUndecodable()
            decided_by = f"{call.method.name}:{code}"
        elif call.method.name == "Status":
            status = _own_status(job_id, call.statuses)
            if status is None:
                return
            observation = StatusSeen(status.state, status.error_kind)
            duration = status.duration_seconds
        else:
            return  # a successful call other than Status says nothing of the outcome
        outcome = classify(observation)
        if outcome is None:
            job.pending_running = True
            return
        job.pending_running = False
        self._decide(job, Decision(upstream, job_id, outcome, decided_by, duration, job.context))

    def _closed(self, upstream: str, job_id: str, job: _Job) -> None:
        job.closed = True
        if job.decided:
            return
        if job.pending_running:
            outcome = classify(ClosedWhileRunning())
            assert outcome is not None
            self._decide(job, Decision(upstream, job_id, outcome, "Close", None, job.context))
            return
        # Closed with no Status and no failed call: not a job we can account for.
        del self._jobs[(upstream, job_id)]
        self._sink.job_evicted(upstream, job_id, "closed_undecided")

    def _decide(self, job: _Job, decision: Decision) -> None:
        job.decided = True
        self._sink.job_decided(decision)

    def expire(self, now: float | None = None) -> None:
        """Forget jobs idle longer than the TTL, and the oldest beyond max_jobs."""
        now = self._clock() if now is None else now
        jobs = self._jobs
        while jobs:
            key, job = next(iter(jobs.items()))
            if len(jobs) <= self._max_jobs and now - job.last_seen < self._ttl:
                break
            del jobs[key]
            if not job.decided:
                reason = "ttl" if now - job.last_seen >= self._ttl else "max_tracked"
                self._sink.job_evicted(key[0], key[1], reason)


def _own_status(job_id: str, statuses: tuple[JobStatus, ...]) -> JobStatus | None:
    """The response entry for the job the request asked about.

    step-runner answers Status(id) with that one job; should a build return others
    too, only the entry with the job's own id counts (a job's outcome comes only from
    its own calls), falling back to the single entry of a one-entry answer.
    """
    for status in statuses:
        if status.job_id == job_id:
            return status
    if len(statuses) == 1 and not statuses[0].job_id:
        return statuses[0]
    return None
