"""SPEC section 3 as code: one observation of a job in, its outcome (or None) out.

Pure: no I/O, no clock, no Prometheus. Every label value it can return comes from
the fixed sets below, whatever number or code a peer sends.
"""

from __future__ import annotations

from dataclasses import dataclass

from .events import GO_CODE_NAMES, Code, normalize_code

# StepResult.Status numbers (SPEC section 2).
STATE_UNSPECIFIED = 0
STATE_RUNNING = 1
STATE_SUCCESS = 2
STATE_FAILURE = 3
STATE_CANCELLED = 4

# StatusError.ErrorKind numbers.
KIND_UNKNOWN = 0
KIND_STEP_FAILURE = 1
KIND_INTERNAL = 2
KIND_CANCELLED = 3
KIND_TIMEOUT = 4

RESULT_SUCCESS = "success"
RESULT_FAILED = "failed"
RESULT_CANCELLED = "cancelled"
RESULTS: tuple[str, ...] = (RESULT_SUCCESS, RESULT_FAILED, RESULT_CANCELLED)

# The fixed label values of step_runner_job_failures_total.
FAILURE_REASONS = ("script_failure", "job_execution_timeout", "unknown_failure")
SOURCES = ("grpc_internal", "status_error_kind", "grpc_status")
CATEGORIES = ("infrastructure", "script", "unknown")


@dataclass(frozen=True, slots=True)
class Failure:
    failure_reason: str
    source: str
    kind: str
    category: str

    def labels(self) -> dict[str, str]:
        return {
            "failure_reason": self.failure_reason,
            "source": self.source,
            "kind": self.kind,
            "category": self.category,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    result: str
    failure: Failure | None = None


SUCCESS = Outcome(RESULT_SUCCESS)
CANCELLED = Outcome(RESULT_CANCELLED)

GRPC_INTERNAL = Failure("script_failure", "grpc_internal", "Internal", "infrastructure")
_KIND_FAILURES: dict[int, Failure] = {
    # Runner maps ErrorKind internal to script_failure on purpose: a job can cause it.
    KIND_INTERNAL: Failure("script_failure", "status_error_kind", "internal", "infrastructure"),
    KIND_STEP_FAILURE: Failure("script_failure", "status_error_kind", "step_failure", "script"),
    KIND_TIMEOUT: Failure("job_execution_timeout", "status_error_kind", "timeout", "script"),
    KIND_UNKNOWN: Failure("unknown_failure", "status_error_kind", "unknown", "unknown"),
}
UNKNOWN_FAILURE = _KIND_FAILURES[KIND_UNKNOWN]
UNRECOGNIZED_KIND = Failure("unknown_failure", "status_error_kind", "unrecognized", "unknown")


def _grpc_status_failure(code: int) -> Failure:
    return Failure("script_failure", "grpc_status", GO_CODE_NAMES[code], "infrastructure")


_CODE_FAILURES: dict[int, Failure] = {
    code: _grpc_status_failure(code)
    for code in GO_CODE_NAMES
    if code not in (Code.OK, Code.CANCELLED, Code.INTERNAL)
}

# Every label combination step_runner_job_failures_total can carry.
ALL_FAILURES: tuple[Failure, ...] = (
    GRPC_INTERNAL,
    *_KIND_FAILURES.values(),
    UNRECOGNIZED_KIND,
    *_CODE_FAILURES.values(),
)


@dataclass(frozen=True, slots=True)
class StatusSeen:
    """A Status entry for the job: its state and, if present, its error kind."""

    state: int
    error_kind: int | None


@dataclass(frozen=True, slots=True)
class CallFailed:
    """A call of the job ended with this gRPC code (as the client saw it)."""

    code: int


@dataclass(frozen=True, slots=True)
class ResponseUndecodable:
    """A response of the job's call did not decode as its message type."""


@dataclass(frozen=True, slots=True)
class ClosedWhileRunning:
    """Close arrived while the job's last Status was running/unspecified without error."""


Observation = StatusSeen | CallFailed | ResponseUndecodable | ClosedWhileRunning


def classify(obs: Observation) -> Outcome | None:
    """The job's outcome from one observation, or None when it decides nothing."""
    if isinstance(obs, StatusSeen):
        return _classify_status(obs.state, obs.error_kind)
    if isinstance(obs, CallFailed):
        code = normalize_code(obs.code)
        if code == Code.OK:
            return None
        if code == Code.CANCELLED:
            return CANCELLED
        if code == Code.INTERNAL:
            return Outcome(RESULT_FAILED, GRPC_INTERNAL)
        return Outcome(RESULT_FAILED, _CODE_FAILURES[code])
    if isinstance(obs, ResponseUndecodable):
        # A Go client reports INTERNAL ("failed to unmarshal") for such a response.
        return Outcome(RESULT_FAILED, GRPC_INTERNAL)
    # Runner decides a non-success Status without an error as unknown_failure.
    return Outcome(RESULT_FAILED, UNKNOWN_FAILURE)


def _classify_status(state: int, error_kind: int | None) -> Outcome | None:
    if state == STATE_SUCCESS:
        return SUCCESS
    if error_kind is not None:
        if error_kind == KIND_CANCELLED:
            return CANCELLED
        return Outcome(RESULT_FAILED, _KIND_FAILURES.get(error_kind, UNRECOGNIZED_KIND))
    if state in (STATE_RUNNING, STATE_UNSPECIFIED):
        return None
    if state == STATE_CANCELLED:
        return CANCELLED
    # state=failure, or a state number this build does not know: Runner treats any
    # non-success Status without an error as an unknown failure.
    return Outcome(RESULT_FAILED, UNKNOWN_FAILURE)
