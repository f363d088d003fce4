"""What the observer reports about the calls it sees: the contract between the
HTTP/2 observer (bytes in) and the accounting side (job tracker, metrics).

Nothing here knows about sockets or Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol


class Code(IntEnum):
    """gRPC status codes (the numbers carried in `grpc-status`)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# The Go spellings used by go-grpc-prometheus (SPEC section 3): label values.
GO_CODE_NAMES: dict[int, str] = {
    Code.OK: "OK",
    Code.CANCELLED: "Canceled",
    Code.UNKNOWN: "Unknown",
    Code.INVALID_ARGUMENT: "InvalidArgument",
    Code.DEADLINE_EXCEEDED: "DeadlineExceeded",
    Code.NOT_FOUND: "NotFound",
    Code.ALREADY_EXISTS: "AlreadyExists",
    Code.PERMISSION_DENIED: "PermissionDenied",
    Code.RESOURCE_EXHAUSTED: "ResourceExhausted",
    Code.FAILED_PRECONDITION: "FailedPrecondition",
    Code.ABORTED: "Aborted",
    Code.OUT_OF_RANGE: "OutOfRange",
    Code.UNIMPLEMENTED: "Unimplemented",
    Code.INTERNAL: "Internal",
    Code.UNAVAILABLE: "Unavailable",
    Code.DATA_LOSS: "DataLoss",
    Code.UNAUTHENTICATED: "Unauthenticated",
}


def normalize_code(value: int) -> int:
    """A `grpc-status` outside 0-16 is what grpc-go reports as an unknown code: treat
    it as UNKNOWN so a peer cannot grow the label set."""
    return value if value in GO_CODE_NAMES else int(Code.UNKNOWN)


UNKNOWN_LABEL = "unknown"

# StepRunner methods by name, with their go-grpc-prometheus grpc_type.
STEP_RUNNER_METHODS: dict[str, str] = {
    "Run": "unary",
    "FollowLogs": "server_stream",
    "Status": "unary",
    "Close": "unary",
    "Cancel": "unary",
}


@dataclass(frozen=True, slots=True)
class Method:
    """A call's labels. Paths that are not StepRunner method paths
    (exporter.methods) are all `Method(unknown, unknown, unknown)` so no client can
    grow the label set."""

    service: str
    name: str
    grpc_type: str

    @property
    def known(self) -> bool:
        return self.name != UNKNOWN_LABEL


UNKNOWN_METHOD = Method(UNKNOWN_LABEL, UNKNOWN_LABEL, UNKNOWN_LABEL)


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One `Status` entry of a decoded `StatusResponse`."""

    job_id: str
    state: int  # StepResult.Status number, possibly one this build does not know
    error_kind: int | None  # StatusError.kind number; None when `error` is absent
    duration_seconds: float | None  # end_time - start_time when both are set


# Not frozen, though read-only to every sink: a frozen dataclass sets each field with
# object.__setattr__, which triples what building one costs, once per observed call.
@dataclass(slots=True)
class CallEnded:
    """One gRPC call (HTTP/2 stream) that has ended, as the client saw it end."""

    method: Method
    # The request's `id`: "" for a list-all Status, None when the call is not a
    # StepRunner call or its request could not be read.
    job_id: str | None
    code: int  # the gRPC code the client saw (trailers, reset or lost connection)
    duration_seconds: float  # request HEADERS to end of stream
    messages_received: int  # request messages (client to server)
    messages_sent: int  # response messages (server to client)
    statuses: tuple[JobStatus, ...] = ()  # decoded StatusResponse entries (Status only)
    # A response message did not decode as its type: a Go client fails the call with
    # INTERNAL ("failed to unmarshal") whatever the trailers said.
    response_undecodable: bool = False
    # The server refused the stream unprocessed (REFUSED_STREAM, or above a GOAWAY's
    # last stream id): grpc-go retries such a call transparently on another stream,
    # so this attempt is no outcome of the job's call; the retry will be.
    refused: bool = False


class ObserverSink(Protocol):
    """Where an observer reports. Called synchronously from the observer."""

    def call_started(self, method: Method) -> None: ...

    def call_ended(self, call: CallEnded) -> None: ...

    def decode_error(self, message: str) -> None:
        """A message (label value from DECODE_ERROR_MESSAGES) was forwarded but not understood."""

    def unknown_fields(self, message: str) -> None:
        """A decoded protobuf message carried fields this build does not know."""


# Fixed label values of step_runner_exporter_decode_errors_total / unknown_fields_total:
# the protobuf messages the observer decodes, plus the layers below them.
DECODE_ERROR_MESSAGES: tuple[str, ...] = (
    "RunRequest",
    "FollowLogsRequest",
    "StatusRequest",
    "CloseRequest",
    "CancelRequest",
    "StatusResponse",
    "RunResponse",
    "CloseResponse",
    "CancelResponse",
    "FollowLogsResponse",
    "grpc_frame",  # length prefix, compression, message over the size limit
    "http2",  # frame layer or HPACK: observation of that connection stops
    "docker_http",  # docker tap: HTTP/1.1 it cannot follow, an exec create over its bound
    "docker_stream",  # docker tap: a bad multiplexed (stdcopy) exec stream
)
