"""One structured line per classified job, in text or JSON, that a job's id cannot forge."""

from __future__ import annotations

import io
import json
import logging
import shlex

import hpack
import pytest
from prometheus_client import CollectorRegistry

from exporter import classifier as c
from exporter.accounting import Accounting
from exporter.events import STEP_RUNNER_METHODS, CallEnded, JobStatus, Method
from exporter.logs import setup_logging
from exporter.metrics import Metrics


def _status_call(job_id: str, state: int, kind: int | None) -> CallEnded:
    method = Method("proto.StepRunner", "Status", STEP_RUNNER_METHODS["Status"])
    return CallEnded(method, job_id, 0, 0.01, 1, 1, (JobStatus(job_id, state, kind, 2.5),))


@pytest.fixture
def accounting() -> Accounting:
    return Accounting(Metrics(CollectorRegistry()), upstream="unix:///x.sock")


def _capture(fmt: str) -> io.StringIO:
    stream = io.StringIO()
    setup_logging("info", fmt, stream)
    return stream


def test_text_line_per_job(accounting: Accounting) -> None:
    stream = _capture("text")
    accounting.call_ended(_status_call("4711", c.STATE_FAILURE, c.KIND_INTERNAL))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert 'msg="job classified" job_id=4711 result=failed failure_reason=script_failure' in line
    assert "source=status_error_kind kind=internal category=infrastructure" in line
    assert "duration=2.5" in line


def test_json_line_per_job(accounting: Accounting) -> None:
    stream = _capture("json")
    accounting.call_ended(_status_call("12-run", c.STATE_SUCCESS, None))
    record = json.loads(stream.getvalue())
    assert record["msg"] == "job classified"
    assert record["job_id"] == "12-run"
    assert record["result"] == "success"
    assert record["duration"] == 2.5
    assert record["level"] == "info"


def test_a_hostile_job_id_cannot_forge_a_line_or_a_field(accounting: Accounting) -> None:
    stream = _capture("text")
    evil = '1 result=success\nts=x level=info msg="job classified" job_id=2'
    accounting.call_ended(_status_call(evil, c.STATE_FAILURE, c.KIND_STEP_FAILURE))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    # A logfmt reader sees the id as one quoted value and the real result.
    fields = dict(token.split("=", 1) for token in shlex.split(lines[0]))
    assert fields["result"] == "failed"
    assert fields["job_id"] == evil.replace("\n", "\\n")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_debug_level_logs_no_forwarded_header_value(fmt: str) -> None:
    stream = io.StringIO()
    setup_logging("debug", fmt, stream)
    block = hpack.Encoder().encode([("authorization", "Bearer s3cret-token")])
    decoded = [tuple(h) for h in hpack.Decoder().decode(block, raw=True)]
    assert decoded == [(b"authorization", b"Bearer s3cret-token")]
    logging.getLogger("exporter.test").debug("debug lines are on")
    out = stream.getvalue()
    assert "debug lines are on" in out
    assert "s3cret" not in out and "authorization" not in out


def teardown_module() -> None:
    logging.getLogger().handlers.clear()
