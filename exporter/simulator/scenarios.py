"""The simulator's scenarios: what the simulated step-runner does for a job, how the
simulated GitLab Runner drives it, and what SPEC section 3 says the outcome is.

The expected outcomes and call codes are written out here as plain data, straight from
the SPEC table, and deliberately not computed with `exporter.classifier`: the tally
built from them is the independent answer the sidecar's counters are checked against.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from exporter.proto import step_pb2

# RunRequest.env keys the simulated step-runner reads.
ENV_SCENARIO = "SCENARIO"
ENV_LOG_BYTES = "LOG_BYTES"
ENV_LOG_CHUNK = "LOG_CHUNK"
ENV_DURATION_MS = "DURATION_MS"  # end_time - start_time of the job's Status
ENV_FAULT = "SIM_FAULT"

# Only the connection_drop scenario's RunRequest carries this, so the fault relay can
# tell that job's connection from every other one by looking at raw request bytes.
DROP_MARKER = "sim-fault-drop-connection-5b0d1c"

LOG_LINE = b"job log: deterministic test line 0123456789abcdef\n"
DEFAULT_LOG_BYTES = 4096
DEFAULT_LOG_CHUNK = 4096
DEFAULT_DURATION_MS = 1500

# Test metadata (not step-runner behaviour), named like the captures' x-ref* headers.
JOB_HEADER = "x-simrunner-job"  # request: the job id, on every job call
ECHO_TRAILER = "x-simstep-echo"  # response trailer: the request's JOB_HEADER value
METHOD_HEADER = "x-simstep-method"  # response header: the full method (header probe)
ECHO_PREFIX = "x-echo-"  # request metadata with this prefix comes back in the trailers

# The simulated Runner gives up polling a job that stays running after this many
# Status calls, then closes it (the running_then_close row).
MAX_STATUS_POLLS = 3
UNARY_TIMEOUT = 60.0  # the Runner's per-call deadline on unary calls, as in the captures

STATE_RUNNING = step_pb2.StepResult.running
STATE_SUCCESS = step_pb2.StepResult.success
STATE_FAILURE = step_pb2.StepResult.failure
STATE_CANCELLED = step_pb2.StepResult.cancelled
KIND_UNKNOWN = step_pb2.StatusError.unknown
KIND_STEP_FAILURE = step_pb2.StatusError.step_failure
KIND_INTERNAL = step_pb2.StatusError.internal
KIND_CANCELLED = step_pb2.StatusError.cancelled
KIND_TIMEOUT = step_pb2.StatusError.timeout
KIND_UNRECOGNIZED = 42  # a number no ErrorKind defines

# gRPC code numbers to the Go spellings of SPEC section 3, kept here on purpose rather
# than imported, so a wrong name in the exporter cannot also be wrong in the tally.
GO_CODE_NAMES: dict[int, str] = {
    0: "OK",
    1: "Canceled",
    2: "Unknown",
    3: "InvalidArgument",
    4: "DeadlineExceeded",
    5: "NotFound",
    6: "AlreadyExists",
    7: "PermissionDenied",
    8: "ResourceExhausted",
    9: "FailedPrecondition",
    10: "Aborted",
    11: "OutOfRange",
    12: "Unimplemented",
    13: "Internal",
    14: "Unavailable",
    15: "DataLoss",
    16: "Unauthenticated",
}

FailureLabels = tuple[str, str, str, str]  # failure_reason, source, kind, category


@dataclass(frozen=True, slots=True)
class Expected:
    """A row of SPEC section 3: the job's result and, for a failed job, its labels."""

    result: str
    failure: FailureLabels | None = None


SUCCESS = Expected("success")
CANCELLED = Expected("cancelled")


def _failed(reason: str, source: str, kind: str, category: str) -> Expected:
    return Expected("failed", (reason, source, kind, category))


GRPC_INTERNAL = _failed("script_failure", "grpc_internal", "Internal", "infrastructure")


def _grpc_status(kind: str) -> Expected:
    return _failed("script_failure", "grpc_status", kind, "infrastructure")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    expected: Expected
    # The calls the Runner makes, in order, as "Method:Code" with the code a Go client
    # reports (so an undecodable response is Internal although the wire said OK).
    calls: tuple[str, ...]
    # Other call sequences that are just as right, where timing outside the job's
    # control picks one (none of the built-in scenarios needs one).
    also_calls: tuple[tuple[str, ...], ...] = ()
    # True when a terminal Status decides the job (its end - start is then observed).
    decided_by_status: bool = True

    # What the simulated step-runner does.
    state: int = STATE_SUCCESS  # the terminal Status state ...
    error_kind: int | None = None  # ... and its error kind (None: no error field)
    running_polls: int = 0  # Status calls answered `running` first; -1 for ever
    panic: str | None = None  # the method whose handler raises
    status_abort: str | None = None  # a grpc.StatusCode name Status aborts with
    status_details: bool = False  # abort with a google.rpc.Status in the trailers
    status_raw: bytes | None = None  # Status answers these bytes instead of a message
    status_extra_field: bool = False  # Status carries a field the schema lacks
    hang: str | None = None  # the method that never answers until cancelled
    follow_stall: bool = False  # FollowLogs sends one message, then waits until cancelled

    # How the simulated Runner drives the job.
    call_timeout: float | None = None  # Status's deadline (None: the usual one)
    cancel_rpc: bool = False  # send Cancel right after Run
    cancel_follow: bool = False  # cancel FollowLogs after its first message
    env: Mapping[str, str] = field(default_factory=dict)


_NORMAL = ("Run:OK", "FollowLogs:OK", "Status:OK", "Close:OK")


def _status_failed(code: str) -> tuple[str, ...]:
    return ("Run:OK", "FollowLogs:OK", f"Status:{code}", "Close:OK")


_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("success", "Status state=success", SUCCESS, _NORMAL),
    Scenario(
        "stream",
        "success; meant for large logs (LOG_BYTES, LOG_CHUNK) and byte-exactness",
        SUCCESS,
        _NORMAL,
    ),
    Scenario(
        "step_failure",
        "Status failure, error.kind=step_failure",
        _failed("script_failure", "status_error_kind", "step_failure", "script"),
        _NORMAL,
        state=STATE_FAILURE,
        error_kind=KIND_STEP_FAILURE,
    ),
    Scenario(
        "internal",
        "Status failure, error.kind=internal",
        _failed("script_failure", "status_error_kind", "internal", "infrastructure"),
        _NORMAL,
        state=STATE_FAILURE,
        error_kind=KIND_INTERNAL,
    ),
    Scenario(
        "unknown",
        "Status failure, error.kind=unknown",
        _failed("unknown_failure", "status_error_kind", "unknown", "unknown"),
        _NORMAL,
        state=STATE_FAILURE,
        error_kind=KIND_UNKNOWN,
    ),
    Scenario(
        "timeout",
        "Status failure, error.kind=timeout",
        _failed("job_execution_timeout", "status_error_kind", "timeout", "script"),
        _NORMAL,
        state=STATE_FAILURE,
        error_kind=KIND_TIMEOUT,
    ),
    Scenario(
        "cancelled",
        "Status cancelled, error.kind=cancelled",
        CANCELLED,
        _NORMAL,
        state=STATE_CANCELLED,
        error_kind=KIND_CANCELLED,
    ),
    Scenario(
        "failure_noerror",
        "Status failure without an error field",
        _failed("unknown_failure", "status_error_kind", "unknown", "unknown"),
        _NORMAL,
        state=STATE_FAILURE,
    ),
    Scenario(
        "unrecognized_kind",
        "Status failure, error.kind=42 (no ErrorKind has that number)",
        _failed("unknown_failure", "status_error_kind", "unrecognized", "unknown"),
        _NORMAL,
        state=STATE_FAILURE,
        error_kind=KIND_UNRECOGNIZED,
    ),
    Scenario(
        "state_cancelled",
        "Status cancelled without an error field",
        CANCELLED,
        _NORMAL,
        state=STATE_CANCELLED,
    ),
    Scenario(
        "running_then_success",
        "the first Status says running, the second success",
        SUCCESS,
        ("Run:OK", "FollowLogs:OK", "Status:OK", "Status:OK", "Close:OK"),
        running_polls=1,
    ),
    Scenario(
        "running_then_close",
        "Status says running every time; the Runner gives up polling and closes",
        _failed("unknown_failure", "status_error_kind", "unknown", "unknown"),
        ("Run:OK", "FollowLogs:OK", *["Status:OK"] * MAX_STATUS_POLLS, "Close:OK"),
        decided_by_status=False,
        running_polls=-1,
    ),
    Scenario(
        "schema_drift",
        "Status success that also carries field 99, unknown to the schema",
        SUCCESS,
        _NORMAL,
        status_extra_field=True,
    ),
    Scenario(
        "cancel_rpc",
        "Run, Cancel, FollowLogs, then Status cancelled without an error field",
        CANCELLED,
        ("Run:OK", "Cancel:OK", "FollowLogs:OK", "Status:OK", "Close:OK"),
        state=STATE_CANCELLED,  # what step-runner reports once Cancel went through
        cancel_rpc=True,
    ),
    Scenario(
        "panic_run",
        "Run panics (INTERNAL); Close ends NotFound, the job was never created",
        GRPC_INTERNAL,
        ("Run:Internal", "Close:NotFound"),
        decided_by_status=False,
        panic="Run",
    ),
    Scenario(
        "panic_follow",
        "FollowLogs sends its first message, then panics (INTERNAL)",
        GRPC_INTERNAL,
        ("Run:OK", "FollowLogs:Internal", "Close:OK"),
        decided_by_status=False,
        panic="FollowLogs",
    ),
    Scenario(
        "panic_status",
        "Status panics (INTERNAL)",
        GRPC_INTERNAL,
        _status_failed("Internal"),
        decided_by_status=False,
        panic="Status",
    ),
    Scenario(
        "undecodable_status",
        "Status answers OK with bytes that are no StatusResponse (a Go client: INTERNAL)",
        GRPC_INTERNAL,
        _status_failed("Internal"),
        decided_by_status=False,
        status_raw=b"\xff\xff\xff",
    ),
    Scenario(
        "unavailable_status",
        "Status ends UNAVAILABLE",
        _grpc_status("Unavailable"),
        _status_failed("Unavailable"),
        decided_by_status=False,
        status_abort="UNAVAILABLE",
    ),
    Scenario(
        "deadline_status",
        "the server ends Status DEADLINE_EXCEEDED (the call's own deadline is far away)",
        _grpc_status("DeadlineExceeded"),
        _status_failed("DeadlineExceeded"),
        decided_by_status=False,
        status_abort="DEADLINE_EXCEEDED",
    ),
    Scenario(
        "unknown_code",
        "Status ends UNKNOWN",
        _grpc_status("Unknown"),
        _status_failed("Unknown"),
        decided_by_status=False,
        status_abort="UNKNOWN",
    ),
    Scenario(
        "data_loss_status",
        "Status ends DATA_LOSS, a code with no row of its own",
        _grpc_status("DataLoss"),
        _status_failed("DataLoss"),
        decided_by_status=False,
        status_abort="DATA_LOSS",
    ),
    Scenario(
        "details",
        "Status ends FAILED_PRECONDITION with grpc-status-details-bin and more trailers",
        _grpc_status("FailedPrecondition"),
        _status_failed("FailedPrecondition"),
        decided_by_status=False,
        status_abort="FAILED_PRECONDITION",
        status_details=True,
    ),
    Scenario(
        "hang_status",
        "Status never answers; its 200 ms deadline expires (other calls have the usual ones)",
        _grpc_status("DeadlineExceeded"),
        _status_failed("DeadlineExceeded"),
        decided_by_status=False,
        hang="Status",
        call_timeout=0.2,
    ),
    Scenario(
        "client_cancel",
        "the Runner cancels FollowLogs after the first log message",
        CANCELLED,
        ("Run:OK", "FollowLogs:Canceled", "Close:OK"),
        decided_by_status=False,
        follow_stall=True,
        cancel_follow=True,
    ),
    Scenario(
        "connection_drop",
        "the fault relay cuts the connection while Run is in flight; Close then "
        "reconnects and ends NotFound (Run never reached the server)",
        _grpc_status("Unavailable"),
        ("Run:Unavailable", "Close:NotFound"),
        decided_by_status=False,
        env={ENV_FAULT: DROP_MARKER},
    ),
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in _SCENARIOS}

# A realistic mix: mostly users' own results, a few of each infrastructure row.
DEFAULT_MIX: dict[str, float] = {
    "success": 55.0,
    "step_failure": 22.0,
    "running_then_success": 5.0,
    "internal": 1.5,
    "unknown": 1.0,
    "timeout": 2.0,
    "cancelled": 1.5,
    "failure_noerror": 1.0,
    "unrecognized_kind": 0.5,
    "state_cancelled": 1.0,
    "running_then_close": 0.5,
    "schema_drift": 0.5,
    "cancel_rpc": 1.5,
    "panic_run": 0.5,
    "panic_follow": 0.5,
    "panic_status": 0.5,
    "undecodable_status": 0.5,
    "unavailable_status": 1.0,
    "deadline_status": 0.5,
    "unknown_code": 0.5,
    "data_loss_status": 0.25,
    "details": 0.25,
    "hang_status": 0.5,
    "client_cancel": 1.0,
    "connection_drop": 0.5,
}


def go_code_name(code_number: int) -> str:
    return GO_CODE_NAMES.get(code_number, "Unknown")


@functools.lru_cache(maxsize=16)
def log_content(size: int) -> bytes:
    """The job log of `size` bytes: LOG_LINE repeated and cut, so every offset is known."""
    return (LOG_LINE * (size // len(LOG_LINE) + 1))[:size]


def job_env(
    scenario: Scenario,
    job_id: str,
    *,
    log_bytes: int = DEFAULT_LOG_BYTES,
    log_chunk: int = DEFAULT_LOG_CHUNK,
    duration_ms: int = DEFAULT_DURATION_MS,
) -> dict[str, str]:
    env = {
        ENV_SCENARIO: scenario.name,
        ENV_LOG_BYTES: str(log_bytes),
        ENV_LOG_CHUNK: str(log_chunk),
        ENV_DURATION_MS: str(duration_ms),
        "CI_JOB_ID": job_id,
    }
    env.update(scenario.env)
    return env


def run_request(job_id: str, env: Mapping[str, str]) -> step_pb2.RunRequest:
    """A RunRequest with the captures' job content around the given env."""
    work_base = "/builds/group/project"
    return step_pb2.RunRequest(
        id=job_id,
        work_dir=f"{work_base}/{job_id}",
        env=dict(env),
        job=step_pb2.Job(
            build_dir=work_base,
            variables=[
                step_pb2.Variable(key="CI_JOB_ID", value=job_id),
                step_pb2.Variable(key="SECRET_TOKEN", value="not-a-real-secret", masked=True),
                step_pb2.Variable(
                    key="KUBECONFIG", value="apiVersion: v1\nkind: Config\n", file=True
                ),
            ],
        ),
        steps=f"spec: {{}}\n---\nrun:\n  - name: script\n    script: echo job {job_id}\n",
    )
