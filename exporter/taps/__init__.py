"""Taps: what the sidecar's listening socket speaks, and where in it the gRPC bytes are.

The path of every byte is tap -> splice -> gRPC observer -> accounting -> tracker ->
classifier -> metrics. A tap is built once per sidecar from `TapParts` and gives the
splice one `ConnectionWatcher` per accepted connection. The step-runner tap's watcher is
the gRPC observer itself; another tap's watcher finds the gRPC connection inside its own
protocol and feeds a gRPC observer made by `TapParts.grpc_observer`, with a sink bound
to what it knows of the session (container and exec id), which the job log line prints.
Nothing after the tap knows which tap fed it. A new tap is one module here, registered
in `TAPS` under the name `config.TAPS` accepts for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from ..accounting import Accounting
from ..config import Config
from ..events import ObserverSink
from ..observer import ConnectionObserver
from ..splice import ConnectionWatcher


@dataclass(frozen=True, slots=True)
class TapParts:
    """What every tap is built from: one per sidecar."""

    config: Config
    accounting: Accounting  # its metrics are every metric the sidecar exports

    def grpc_observer(self, sink: ObserverSink) -> ConnectionObserver:
        """The gRPC observer of one step-runner connection, reporting to `sink`."""
        obs = self.config.observer
        return ConnectionObserver(
            sink,
            package=self.config.service_package,
            max_message_bytes=obs.max_message_bytes,
            max_connection_bytes=obs.max_connection_bytes,
            deadline_tolerance=obs.deadline_tolerance,
        )


class Tap(Protocol):
    # What the upstream is, for log lines ("step-runner reachable").
    upstream_name: str
    # The listening socket's group when `socket.group` is not set and this group exists:
    # the docker tap's socket grants what the daemon's does, so it gets the daemon's
    # group (SPEC section 7), never the process's.
    default_socket_group: str | None

    def watcher(self) -> ConnectionWatcher | None:
        """The watcher of one new connection (the splice's factory)."""


def _step_runner(parts: TapParts) -> Tap:
    from .step_runner import StepRunnerTap

    return StepRunnerTap(parts)


def _docker(parts: TapParts) -> Tap:
    from .docker import DockerTap

    return DockerTap(parts)


# Imported on use: a step-runner sidecar never loads the Docker tap's HTTP parser.
TAPS: Mapping[str, Callable[[TapParts], Tap]] = MappingProxyType(
    {"step-runner": _step_runner, "docker": _docker}
)


def create_tap(name: str, parts: TapParts) -> Tap:
    return TAPS[name](parts)
