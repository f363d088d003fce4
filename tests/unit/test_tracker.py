"""Exactly-once accounting per job (SPEC section 3's job-level rules)."""

from __future__ import annotations

from dataclasses import dataclass, field

from exporter import classifier as c
from exporter.events import STEP_RUNNER_METHODS, CallEnded, Code, JobStatus, Method
from exporter.tracker import Decision, JobTracker

UP = "unix:///run/step-runner.sock"


def call(
    name: str,
    job_id: str | None,
    code: int = Code.OK,
    statuses: tuple[JobStatus, ...] = (),
    undecodable: bool = False,
) -> CallEnded:
    method = Method("proto.StepRunner", name, STEP_RUNNER_METHODS[name])
    return CallEnded(method, job_id, code, 0.01, 1, 1, statuses, undecodable)


def status(
    job_id: str, state: int, kind: int | None = None, duration: float | None = 1.5
) -> CallEnded:
    return call("Status", job_id, statuses=(JobStatus(job_id, state, kind, duration),))


@dataclass
class Recorder:
    decided: list[Decision] = field(default_factory=list)
    evicted: list[tuple[str, str, str]] = field(default_factory=list)

    def job_decided(self, decision: Decision) -> None:
        self.decided.append(decision)

    def job_evicted(self, upstream: str, job_id: str, reason: str) -> None:
        self.evicted.append((upstream, job_id, reason))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(**kw: object) -> tuple[JobTracker, Recorder, Clock]:
    rec, clock = Recorder(), Clock()
    return JobTracker(rec, clock=clock, **kw), rec, clock  # type: ignore[arg-type]


def lifecycle(t: JobTracker, job_id: str, state: int, kind: int | None = None) -> None:
    t.call_ended(UP, call("Run", job_id))
    t.call_ended(UP, call("FollowLogs", job_id))
    t.call_ended(UP, status(job_id, state, kind))
    t.call_ended(UP, call("Close", job_id))


def test_success_counted_once_with_duration() -> None:
    t, rec, _ = tracker()
    lifecycle(t, "1", c.STATE_SUCCESS)
    assert [(d.job_id, d.outcome, d.duration_seconds) for d in rec.decided] == [
        ("1", c.SUCCESS, 1.5)
    ]


def test_second_status_and_close_never_count_again() -> None:
    t, rec, _ = tracker()
    lifecycle(t, "1", c.STATE_FAILURE, c.KIND_STEP_FAILURE)
    t.call_ended(UP, status("1", c.STATE_SUCCESS))
    t.call_ended(UP, call("Close", "1", Code.NOT_FOUND))
    t.call_ended(UP, call("Status", "1", Code.NOT_FOUND))
    assert len(rec.decided) == 1
    assert rec.decided[0].outcome.failure is not None
    assert rec.decided[0].outcome.failure.kind == "step_failure"


def test_first_terminal_observation_wins() -> None:
    t, rec, _ = tracker()
    t.call_ended(UP, call("Run", "7", Code.INTERNAL))
    t.call_ended(UP, call("Close", "7", Code.NOT_FOUND))
    assert len(rec.decided) == 1
    assert rec.decided[0].decided_by == "Run:13"
    assert rec.decided[0].outcome.failure == c.GRPC_INTERNAL


def test_running_is_not_terminal_then_success() -> None:
    t, rec, _ = tracker()
    t.call_ended(UP, status("1", c.STATE_RUNNING))
    assert rec.decided == []
    t.call_ended(UP, status("1", c.STATE_SUCCESS))
    t.call_ended(UP, call("Close", "1"))
    assert [d.outcome for d in rec.decided] == [c.SUCCESS]


def test_close_after_running_is_unknown_failure() -> None:
    t, rec, _ = tracker()
    t.call_ended(UP, status("1", c.STATE_RUNNING))
    t.call_ended(UP, call("Close", "1"))
    assert [d.outcome.failure for d in rec.decided] == [c.UNKNOWN_FAILURE]
    assert rec.decided[0].decided_by == "Close"


def test_list_all_status_decides_nothing() -> None:
    t, rec, _ = tracker()
    entries = tuple(JobStatus(str(i), c.STATE_FAILURE, c.KIND_INTERNAL, None) for i in range(3))
    t.call_ended(UP, call("Status", "", statuses=entries))
    t.call_ended(UP, call("Status", "", Code.INTERNAL))
    assert rec.decided == [] and len(t) == 0


def test_cancel_result_decides_nothing() -> None:
    t, rec, _ = tracker()
    t.call_ended(UP, call("Cancel", "1", Code.INTERNAL))
    assert rec.decided == []
    t.call_ended(UP, status("1", c.STATE_CANCELLED))
    assert [d.outcome for d in rec.decided] == [c.CANCELLED]


def test_only_the_jobs_own_status_entry_counts() -> None:
    t, rec, _ = tracker()
    other = JobStatus("2", c.STATE_FAILURE, c.KIND_INTERNAL, None)
    t.call_ended(UP, call("Status", "1", statuses=(other,)))
    assert rec.decided == []
    mine = JobStatus("1", c.STATE_SUCCESS, None, None)
    t.call_ended(UP, call("Status", "1", statuses=(other, mine)))
    assert [(d.job_id, d.outcome) for d in rec.decided] == [("1", c.SUCCESS)]


def test_undecodable_response_is_grpc_internal() -> None:
    t, rec, _ = tracker()
    t.call_ended(UP, call("Status", "1", undecodable=True))
    assert [d.outcome.failure for d in rec.decided] == [c.GRPC_INTERNAL]


def test_unknown_method_and_missing_id_are_ignored() -> None:
    t, rec, _ = tracker()
    t.call_ended(
        UP, CallEnded(Method("unknown", "unknown", "unknown"), None, Code.INTERNAL, 0, 0, 0)
    )
    t.call_ended(UP, call("Run", None, Code.INTERNAL))
    assert rec.decided == [] and len(t) == 0


def test_closed_without_status_is_evicted_not_counted() -> None:
    t, rec, _ = tracker()
    t.call_ended(UP, call("Run", "1"))
    t.call_ended(UP, call("Close", "1"))
    assert rec.decided == []
    assert rec.evicted == [(UP, "1", "closed_undecided")]
    assert len(t) == 0


def test_upstreams_never_collide() -> None:
    t, rec, _ = tracker()
    t.call_ended(UP, status("1", c.STATE_SUCCESS))
    t.call_ended("other:1", status("1", c.STATE_FAILURE, c.KIND_STEP_FAILURE))
    assert [(d.upstream, d.outcome.result) for d in rec.decided] == [
        (UP, "success"),
        ("other:1", "failed"),
    ]


def test_max_jobs_bound_evicts_oldest_undecided() -> None:
    t, rec, _ = tracker(max_jobs=3)
    for i in range(5):
        t.call_ended(UP, call("Run", str(i)))
    assert len(t) == 3
    assert rec.evicted == [(UP, "0", "max_tracked"), (UP, "1", "max_tracked")]


def test_decided_jobs_leave_without_counting_an_eviction() -> None:
    t, rec, _ = tracker(max_jobs=2)
    for i in range(4):
        t.call_ended(UP, status(str(i), c.STATE_SUCCESS))
    assert len(t) == 2 and rec.evicted == [] and len(rec.decided) == 4


def test_ttl_forgets_idle_jobs() -> None:
    t, rec, clock = tracker(ttl=60.0)
    t.call_ended(UP, call("Run", "old"))
    clock.now += 30
    t.call_ended(UP, call("Run", "young"))
    clock.now += 31
    t.expire()
    assert rec.evicted == [(UP, "old", "ttl")]
    assert len(t) == 1


def test_activity_refreshes_ttl() -> None:
    t, rec, clock = tracker(ttl=60.0)
    t.call_ended(UP, call("Run", "1"))
    clock.now += 50
    t.call_ended(UP, call("FollowLogs", "1"))
    clock.now += 50
    t.expire()
    assert rec.evicted == [] and len(t) == 1


def test_a_refused_attempt_is_no_outcome_its_transparent_retry_is() -> None:
    t, rec, _ = tracker()
    method = Method("proto.StepRunner", "Run", "unary")
    t.call_ended(UP, CallEnded(method, "1", Code.UNAVAILABLE, 0.0, 1, 0, refused=True))
    assert rec.decided == []
    lifecycle(t, "1", c.STATE_SUCCESS)
    assert [d.outcome for d in rec.decided] == [c.SUCCESS]
