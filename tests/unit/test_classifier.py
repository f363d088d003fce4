"""SPEC section 3, one test per row of the table, plus a property test over every
possible observation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter import classifier as c
from exporter.events import GO_CODE_NAMES, Code

F = c.Failure


@pytest.mark.parametrize(
    ("row", "observation", "expected"),
    [
        ("Status state=success", c.StatusSeen(c.STATE_SUCCESS, None), c.Outcome("success")),
        (
            "any call ends INTERNAL",
            c.CallFailed(Code.INTERNAL),
            c.Outcome("failed", F("script_failure", "grpc_internal", "Internal", "infrastructure")),
        ),
        (
            "error.kind=internal",
            c.StatusSeen(c.STATE_FAILURE, c.KIND_INTERNAL),
            c.Outcome(
                "failed", F("script_failure", "status_error_kind", "internal", "infrastructure")
            ),
        ),
        (
            "error.kind=step_failure",
            c.StatusSeen(c.STATE_FAILURE, c.KIND_STEP_FAILURE),
            c.Outcome("failed", F("script_failure", "status_error_kind", "step_failure", "script")),
        ),
        (
            "error.kind=timeout",
            c.StatusSeen(c.STATE_FAILURE, c.KIND_TIMEOUT),
            c.Outcome(
                "failed", F("job_execution_timeout", "status_error_kind", "timeout", "script")
            ),
        ),
        (
            "error.kind=unknown",
            c.StatusSeen(c.STATE_FAILURE, c.KIND_UNKNOWN),
            c.Outcome("failed", F("unknown_failure", "status_error_kind", "unknown", "unknown")),
        ),
        (
            "state=failure with no error",
            c.StatusSeen(c.STATE_FAILURE, None),
            c.Outcome("failed", F("unknown_failure", "status_error_kind", "unknown", "unknown")),
        ),
        (
            "ErrorKind number this build does not know",
            c.StatusSeen(c.STATE_FAILURE, 42),
            c.Outcome(
                "failed", F("unknown_failure", "status_error_kind", "unrecognized", "unknown")
            ),
        ),
        (
            "error.kind=cancelled",
            c.StatusSeen(c.STATE_FAILURE, c.KIND_CANCELLED),
            c.Outcome("cancelled"),
        ),
        ("state=cancelled", c.StatusSeen(c.STATE_CANCELLED, None), c.Outcome("cancelled")),
        ("a call ends CANCELLED", c.CallFailed(Code.CANCELLED), c.Outcome("cancelled")),
        (
            "a response does not decode",
            c.ResponseUndecodable(),
            c.Outcome("failed", F("script_failure", "grpc_internal", "Internal", "infrastructure")),
        ),
        (
            "any other non-OK code: UNAVAILABLE",
            c.CallFailed(Code.UNAVAILABLE),
            c.Outcome(
                "failed", F("script_failure", "grpc_status", "Unavailable", "infrastructure")
            ),
        ),
        (
            "any other non-OK code: DEADLINE_EXCEEDED",
            c.CallFailed(Code.DEADLINE_EXCEEDED),
            c.Outcome(
                "failed", F("script_failure", "grpc_status", "DeadlineExceeded", "infrastructure")
            ),
        ),
        (
            "any other non-OK code: UNKNOWN",
            c.CallFailed(Code.UNKNOWN),
            c.Outcome("failed", F("script_failure", "grpc_status", "Unknown", "infrastructure")),
        ),
        (
            "Close after a running Status",
            c.ClosedWhileRunning(),
            c.Outcome("failed", F("unknown_failure", "status_error_kind", "unknown", "unknown")),
        ),
    ],
)
def test_table_row(row: str, observation: c.Observation, expected: c.Outcome) -> None:
    assert c.classify(observation) == expected, row


@pytest.mark.parametrize("state", [c.STATE_RUNNING, c.STATE_UNSPECIFIED])
def test_running_and_unspecified_without_error_are_not_terminal(state: int) -> None:
    assert c.classify(c.StatusSeen(state, None)) is None


def test_ok_call_decides_nothing() -> None:
    assert c.classify(c.CallFailed(Code.OK)) is None


def test_success_state_wins_over_an_error_field() -> None:
    assert c.classify(c.StatusSeen(c.STATE_SUCCESS, c.KIND_INTERNAL)) == c.SUCCESS


def test_running_with_an_error_is_terminal() -> None:
    outcome = c.classify(c.StatusSeen(c.STATE_RUNNING, c.KIND_STEP_FAILURE))
    assert outcome is not None
    assert outcome.failure is not None
    assert outcome.failure.kind == "step_failure"


def test_every_non_ok_code_has_a_go_name_kind() -> None:
    for code, name in GO_CODE_NAMES.items():
        outcome = c.classify(c.CallFailed(code))
        if code == Code.OK:
            assert outcome is None
        elif code == Code.CANCELLED:
            assert outcome == c.CANCELLED
        else:
            assert outcome is not None and outcome.failure is not None
            assert outcome.failure.kind == name


def test_out_of_range_code_is_unknown() -> None:
    outcome = c.classify(c.CallFailed(99))
    assert outcome is not None and outcome.failure is not None
    assert outcome.failure.kind == "Unknown"


def test_all_failures_are_distinct_and_never_runner_system_failure() -> None:
    assert len(set(c.ALL_FAILURES)) == len(c.ALL_FAILURES)
    assert all(f.failure_reason != "runner_system_failure" for f in c.ALL_FAILURES)


_observations = st.one_of(
    st.builds(
        c.StatusSeen,
        st.integers(min_value=-(2**31), max_value=2**31 - 1),
        st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1),
    ),
    st.builds(c.CallFailed, st.integers(min_value=-10, max_value=2**32)),
    st.just(c.ResponseUndecodable()),
    st.just(c.ClosedWhileRunning()),
)


@given(_observations)
def test_every_observation_maps_into_the_fixed_label_sets(obs: c.Observation) -> None:
    outcome = c.classify(obs)
    if outcome is None:
        return
    assert outcome.result in c.RESULTS
    if outcome.result == c.RESULT_FAILED:
        assert outcome.failure in c.ALL_FAILURES
        assert outcome.failure is not None
        assert outcome.failure.failure_reason in c.FAILURE_REASONS
        assert outcome.failure.source in c.SOURCES
        assert outcome.failure.category in c.CATEGORIES
    else:
        assert outcome.failure is None
