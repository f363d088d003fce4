"""Replays every recorded real Go gRPC connection through the observer and checks what
it concludes against manifest.json: calls, codes, messages, Status entries, and the
job outcome SPEC section 3 derives from them."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter import classifier as c
from exporter.events import GO_CODE_NAMES, STEP_RUNNER_METHODS, CallEnded, Code, JobStatus, Method

from .captures import (
    CAPTURES,
    CLIENT,
    SERVER,
    Record,
    RecordingSink,
    capture_files,
    load_manifest,
    observe,
    one_direction_at_a_time,
    read_h2cap,
    rechunked,
)

MANIFEST = load_manifest()
ENTRIES: dict[str, dict[str, Any]] = {entry["file"]: entry for entry in MANIFEST["files"]}
SERVICE = "proto.StepRunner"
# Small files that are also replayed one byte at a time.
BYTEWISE = (
    "gzip.h2cap",
    "hang_status.h2cap",
    "client_abort.h2cap",
    "panic_run.trailers_only.h2cap",
    "log_empty.trailers_only.h2cap",
)


def test_every_capture_is_in_the_manifest() -> None:
    on_disk = {path.name for path in capture_files()}
    assert on_disk == set(ENTRIES)
    assert len(on_disk) >= 30


def job_outcome(calls: list[CallEnded], job_id: str) -> c.Outcome | None:
    """SPEC section 3's job-level rules, small: the job's own calls in call order,
    first terminal observation wins, Cancel decides nothing, Close after a
    non-terminal Status decides unknown_failure."""
    running = False
    for call in calls:
        if call.job_id != job_id or call.method.name == "Cancel":
            continue
        observation: c.Observation | None = None
        if call.code != Code.OK:
            observation = c.CallFailed(call.code)
        elif call.response_undecodable:
            observation = c.ResponseUndecodable()
        elif call.method.name == "Status":
            own = [s for s in call.statuses if s.job_id == job_id]
            if own:
                observation = c.StatusSeen(own[0].state, own[0].error_kind)
        elif call.method.name == "Close" and running:
            observation = c.ClosedWhileRunning()
        if observation is None:
            continue
        outcome = c.classify(observation)
        if outcome is not None:
            return outcome
        running = True
    return None


def expected_labels(outcome: c.Outcome | None) -> dict[str, str] | None:
    if outcome is None:
        return None
    if outcome.failure is None:
        labels = dict.fromkeys(("failure_reason", "source", "kind", "category"), "-")
    else:
        labels = outcome.failure.labels()
    return {"result": outcome.result, **labels}


def check(entry: dict[str, Any], sink: RecordingSink, *, resets_first: bool = False) -> None:
    """resets_first: the client's bytes were all fed before the server's, so a call the
    client reset ended before any of its response messages could be counted."""
    assert not sink.decode_errors, sink.decode_errors
    drift = Counter({"StatusResponse": 1}) if entry["scenario"] == "schema_drift" else Counter()
    assert sink.unknown == drift

    calls = sink.calls_in_start_order()
    assert Counter(sink.started) == Counter(call.method for call in calls)
    for call in calls:
        assert call.method == Method(
            SERVICE, call.method.name, STEP_RUNNER_METHODS[call.method.name]
        )
        assert call.messages_received == 1  # every StepRunner request is one message
        assert call.duration_seconds >= 0
        assert not call.response_undecodable
        if call.code == Code.OK and call.method.name != "FollowLogs":
            assert call.messages_sent == 1

    job_ids = {job["id"] for job in entry["jobs"]}
    assert {call.job_id for call in calls} <= job_ids | {""}
    for job in entry["jobs"]:
        check_job(job, [call for call in calls if call.job_id == job["id"]], resets_first)

    listings = [call for call in calls if call.job_id == ""]
    expected_listing = entry["list_all_status"]
    assert len(listings) == expected_listing["calls"]
    for call in listings:
        assert call.method.name == "Status"
        assert GO_CODE_NAMES[call.code] == expected_listing["code"]
        assert call.statuses  # a listing reports the jobs it knows


def check_job(job: dict[str, Any], calls: list[CallEnded], resets_first: bool) -> None:
    seen = [(call.method.name, GO_CODE_NAMES[call.code]) for call in calls]
    assert seen == [(want["method"], want["code"]) for want in job["calls"]]
    follow = [call for call in calls if call.method.name == "FollowLogs"]
    follow_reset = any(
        want["method"] == "FollowLogs" and want["response"] == "client_reset"
        for want in job["calls"]
    )
    if resets_first and follow_reset:
        assert sum(call.messages_sent for call in follow) == 0
    else:
        assert sum(call.messages_sent for call in follow) == job["log_messages"]

    assert expected_labels(job_outcome(calls, job["id"])) == job["expected"]

    own = [s for call in calls for s in call.statuses if s.job_id == job["id"]]
    terminal = [s for s in own if is_terminal(s)]
    if "duration_seconds" in job:
        assert terminal, "a terminal Status was expected"
        assert terminal[0].duration_seconds == pytest.approx(job["duration_seconds"], abs=1e-6)
    else:
        assert not terminal
    for status in own:
        if not is_terminal(status):
            assert status.state == c.STATE_RUNNING
            assert status.duration_seconds is None


def is_terminal(status: JobStatus) -> bool:
    return c.classify(c.StatusSeen(status.state, status.error_kind)) is not None


def records_of(name: str) -> list[Record]:
    return read_h2cap(CAPTURES / name)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_replay_in_record_order(name: str) -> None:
    observer, sink = observe(records_of(name))
    assert not observer.failed
    check(ENTRIES[name], sink)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_replay_one_direction_at_a_time(name: str) -> None:
    observer, sink = observe(one_direction_at_a_time(records_of(name)))
    assert not observer.failed
    check(ENTRIES[name], sink, resets_first=True)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_replay_in_small_random_pieces(name: str) -> None:
    rng = random.Random(name)
    observer, sink = observe(rechunked(records_of(name), rng, max_piece=40))
    assert not observer.failed
    check(ENTRIES[name], sink)


@pytest.mark.parametrize("name", BYTEWISE)
def test_replay_one_byte_at_a_time(name: str) -> None:
    observer, sink = observe(rechunked(records_of(name), random.Random(0), max_piece=1))
    assert not observer.failed
    check(ENTRIES[name], sink)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=40), data=st.data())
def test_any_cut_of_a_capture_gives_the_same_calls(cuts: list[int], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["gzip.h2cap", "list_all_status.h2cap", "success.h2cap"]))
    records = records_of(name)
    _, whole = observe(records)
    _, pieces = observe(_cut_streams(records, cuts))
    assert pieces.calls == whole.calls
    check(ENTRIES[name], pieces)


def _cut_streams(records: list[Record], cuts: list[int]) -> list[Record]:
    """Cut each direction's bytes at the given offsets (modulo its length), keeping
    record order and times."""
    out: list[Record] = []
    offsets = {CLIENT: 0, SERVER: 0}
    totals = {d: sum(len(r.data) for r in records if r.direction == d) for d in offsets}
    cut_at = {d: {cut % totals[d] for cut in cuts} for d in offsets}
    for record in records:
        if record.direction not in offsets:
            out.append(record)
            continue
        start = offsets[record.direction]
        inner = sorted(
            p - start for p in cut_at[record.direction] if start < p < start + len(record.data)
        )
        bounds = [0, *inner, len(record.data)]
        out.extend(
            Record(record.direction, record.time, record.data[a:b])
            for a, b in itertools.pairwise(bounds)
        )
        offsets[record.direction] = start + len(record.data)
    return out


def test_the_hang_reset_is_just_past_the_deadline() -> None:
    # The corpus's one DEADLINE_EXCEEDED by reset: it must not depend on the tolerance.
    _, sink = observe(records_of("hang_status.h2cap"), deadline_tolerance=0.0)
    status = [call for call in sink.calls if call.method.name == "Status"]
    assert [call.code for call in status] == [Code.DEADLINE_EXCEEDED]
    assert 0.2 < status[0].duration_seconds < 0.21


def test_gzip_messages_are_decoded_both_ways() -> None:
    _, sink = observe(records_of("gzip.h2cap"))
    assert {call.job_id for call in sink.calls} == {"gzip-1"}
    (status,) = [call for call in sink.calls if call.method.name == "Status"]
    assert [(s.job_id, s.state) for s in status.statuses] == [("gzip-1", c.STATE_SUCCESS)]


def test_a_small_size_limit_skips_log_buffers_but_not_log_counts() -> None:
    # FollowLogs messages are 4 KiB, far above this limit, yet well-formed ones are
    # never buffered, so nothing is skipped or counted as an error.
    _, sink = observe(records_of("log_1mib_4k_chunks.h2cap"), max_message_bytes=1024)
    assert not sink.decode_errors
    (follow,) = [call for call in sink.calls if call.method.name == "FollowLogs"]
    assert follow.messages_sent == 256


def test_a_different_package_classifies_nothing() -> None:
    _, sink = observe(records_of("success.h2cap"), package="other")
    assert sink.calls
    assert all(not call.method.known and call.job_id is None for call in sink.calls)
    assert not sink.decode_errors


def test_whole_corpus_through_one_sink() -> None:
    # One sink for every connection (as in the sidecar): per-job results do not mix.
    sink = RecordingSink()
    for name in sorted(ENTRIES):
        _, one = observe(records_of(name))
        sink.ended.extend(one.ended)
    calls = [call for _, call in sink.ended]
    for entry in ENTRIES.values():
        for job in entry["jobs"]:
            mine = [call for call in calls if call.job_id == job["id"]]
            assert expected_labels(job_outcome(mine, job["id"])) == job["expected"]
