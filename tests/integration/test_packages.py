"""A step-runner build whose service lives in another protobuf package (`step`, as a
recent GitLab Runner fixture quotes `panic in /step.StepRunner/Run`): classified by
default and labelled as seen on the wire; a pinned package leaves it unclassified."""

from __future__ import annotations

import pytest

from exporter.simulator import run_job

from .harness import async_wait_until, run_async, simulated_step_runner
from .sidecar import counted, running_sidecar, sample, target

pytestmark = pytest.mark.integration

STEP = {"grpc_type": "unary", "grpc_service": "step.StepRunner", "grpc_method": "Run"}
UNKNOWN = {"grpc_type": "unknown", "grpc_service": "unknown", "grpc_method": "unknown"}


def test_another_package_is_classified_by_default() -> None:
    async def main() -> None:
        async with (
            simulated_step_runner(package="step") as sim,
            running_sidecar(sim.listen_address) as sidecar,
        ):
            record = await run_job(target(sidecar), "success", "pk-1", package="step")
            assert record.problems() == []
            await async_wait_until(lambda: counted(sidecar)[0]["success"] == 1)
            assert sample(sidecar, "grpc_server_handled_total", **STEP, grpc_code="OK") == 1

    run_async(main())


def test_a_pinned_package_classifies_no_other() -> None:
    async def main() -> None:
        async with (
            simulated_step_runner(package="step") as sim,
            running_sidecar(sim.listen_address, service_package="proto") as sidecar,
        ):
            record = await run_job(target(sidecar), "success", "pk-2", package="step")
            assert record.problems() == []
            await async_wait_until(
                lambda: sample(sidecar, "grpc_server_handled_total", **UNKNOWN, grpc_code="OK") >= 4
            )
            assert counted(sidecar)[0] == {"success": 0, "failed": 0, "cancelled": 0}
            assert sidecar.registry.get_sample_value("grpc_server_started_total", STEP) is None

    run_async(main())
