"""Fixtures for what integration tests start: a simulated step-runner, the sidecar in
front of it (in-process or as a `serve` process) and a real Prometheus. Each wraps a
context manager of harness.py, sidecar.py or prometheus.py that starts the real thing
(on a port or socket it picks itself) and always stops it, failing or not.

The in-process servers run on the `loop` fixture, an event loop on its own thread; a
test runs its coroutine there with `loop.run(main(), timeout=...)`, so it can stop and
restart them (`await step_runner.stop()`) and read their state directly.

How they are made comes from markers on the test, so a test says only what differs:

    @pytest.mark.step_runner(relay=False)        # SimulatedStepRunner options
    @pytest.mark.sidecar(labels={"runner": "r"})  # config keys (sidecar_config)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from exporter.app import Sidecar
from exporter.simulator import SimulatedStepRunner

from .harness import BackgroundLoop, background_loop, entered_on, simulated_step_runner
from .prometheus import Prometheus, running_prometheus
from .sidecar import ServeProcess, running_sidecar, running_sidecar_process


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "step_runner(**options): the step_runner fixture's SimulatedStepRunner options "
        "(transport, relay, header_probe, package)",
    )
    config.addinivalue_line(
        "markers",
        "sidecar(**config): configuration keys for the sidecar and sidecar_process "
        "fixtures, over sidecar_config's test defaults",
    )


def _marker_options(request: pytest.FixtureRequest, name: str) -> dict[str, Any]:
    marker = request.node.get_closest_marker(name)
    return dict(marker.kwargs) if marker is not None else {}


@pytest.fixture
def loop() -> Iterator[BackgroundLoop]:
    """A fresh event loop on its own thread, closed (what is left cancelled) after."""
    with background_loop() as background:
        yield background


@pytest.fixture
def step_runner(
    request: pytest.FixtureRequest, loop: BackgroundLoop
) -> Iterator[SimulatedStepRunner]:
    """A started SimulatedStepRunner on `loop` (options: the step_runner marker)."""
    options = _marker_options(request, "step_runner")
    with entered_on(loop, simulated_step_runner(**options)) as sim:
        yield sim


@pytest.fixture
def sidecar(
    request: pytest.FixtureRequest, loop: BackgroundLoop, step_runner: SimulatedStepRunner
) -> Iterator[Sidecar]:
    """The in-process sidecar on `loop`, in front of `step_runner` (config: the sidecar
    marker)."""
    config = _marker_options(request, "sidecar")
    with entered_on(loop, running_sidecar(step_runner.listen_address, **config)) as running:
        yield running


@pytest.fixture
def sidecar_process(
    request: pytest.FixtureRequest, step_runner: SimulatedStepRunner
) -> Iterator[ServeProcess]:
    """`step-runner-exporter serve` as a process in front of `step_runner`, ready
    (config: the sidecar marker; the process picks its web port)."""
    config = _marker_options(request, "sidecar")
    with running_sidecar_process(step_runner.listen_address, **config) as process:
        yield process


StartPrometheus = Callable[..., Prometheus]


@pytest.fixture
def prometheus() -> Iterator[StartPrometheus]:
    """Starts a Prometheus once its targets are known: `prometheus([web], [rules],
    interval="1s")`; every one started is stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(
            targets: Sequence[str], rule_files: Sequence[Path] = (), **options: Any
        ) -> Prometheus:
            return stack.enter_context(running_prometheus(targets, rule_files, **options))

        yield start
