"""Every value each label of ours may take (SPEC sections 3 and 4), for tests that
check nothing a peer sends ever becomes a label value."""

from __future__ import annotations

from exporter.classifier import ALL_FAILURES, CATEGORIES, FAILURE_REASONS, RESULTS, SOURCES
from exporter.events import (
    DECODE_ERROR_MESSAGES,
    GO_CODE_NAMES,
    STEP_RUNNER_METHODS,
    UNKNOWN_LABEL,
)
from exporter.metrics import DOCKER_ENDPOINTS, DOCKER_METHODS, EXEC_SESSION_STATES, MEMO_RESULTS
from exporter.native import OBSERVER_CORES

SERVICE = "proto.StepRunner"

ALLOWED: dict[str, frozenset[str]] = {
    "result": frozenset((*RESULTS, *MEMO_RESULTS)),
    "failure_reason": frozenset(FAILURE_REASONS),
    "source": frozenset(SOURCES),
    "kind": frozenset(f.kind for f in ALL_FAILURES),
    "category": frozenset(CATEGORIES),
    "grpc_type": frozenset({"unary", "server_stream", UNKNOWN_LABEL}),
    "grpc_service": frozenset({SERVICE, UNKNOWN_LABEL}),
    "grpc_method": frozenset({*STEP_RUNNER_METHODS, UNKNOWN_LABEL}),
    "grpc_code": frozenset(GO_CODE_NAMES.values()),
    "message": frozenset(DECODE_ERROR_MESSAGES),
    "method": frozenset(DOCKER_METHODS),
    "endpoint": frozenset(DOCKER_ENDPOINTS),
    "state": frozenset(EXEC_SESSION_STATES),
    "observer_core": frozenset(OBSERVER_CORES),
}
