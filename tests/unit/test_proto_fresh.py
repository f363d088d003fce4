"""The committed generated protobuf code must match step.proto."""

from __future__ import annotations

import tempfile
from pathlib import Path

from exporter.proto import regenerate


def test_generated_code_is_fresh() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        regenerate.generate(Path(tmp))
        stale = [
            name
            for name in regenerate.GENERATED
            if (Path(tmp) / name).read_text() != (regenerate.HERE / name).read_text()
        ]
    assert not stale, f"run `make regen`: {stale} differ from step.proto"


def test_field_numbers_match_spec_section_2() -> None:
    from exporter.proto import step_pb2 as pb

    def numbers(msg: type) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(pb.Variable) == {"key": 1, "value": 2, "file": 3, "masked": 4}
    assert numbers(pb.Job) == {"variables": 1, "build_dir": 4}
    assert numbers(pb.RunRequest) == {"id": 1, "work_dir": 2, "env": 3, "job": 5, "steps": 6}
    assert numbers(pb.FollowLogsRequest) == {"id": 1, "offset": 2}
    assert numbers(pb.FollowLogsResponse) == {"data": 1}
    assert numbers(pb.StatusResponse) == {"jobs": 1}
    assert numbers(pb.Status) == {
        "id": 1, "message": 2, "status": 3, "start_time": 5, "end_time": 6, "error": 7,
    }  # fmt: skip
    assert numbers(pb.StatusError) == {"message": 1, "kind": 2}
    for msg in (pb.CloseRequest, pb.CancelRequest, pb.StatusRequest):
        assert numbers(msg) == {"id": 1}
    assert dict(pb.StepResult.Status.items()) == {
        "unspecified": 0, "running": 1, "success": 2, "failure": 3, "cancelled": 4,
    }  # fmt: skip
    assert dict(pb.StatusError.ErrorKind.items()) == {
        "unknown": 0, "step_failure": 1, "internal": 2, "cancelled": 3, "timeout": 4,
    }  # fmt: skip
    assert pb.DESCRIPTOR.package == "proto"
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["StepRunner"].methods] == [
        "Run", "FollowLogs", "Status", "Close", "Cancel",
    ]  # fmt: skip
