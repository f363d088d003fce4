"""The `step-runner` tap (SPEC section 7): the listening socket speaks gRPC, so each
connection's watcher is a gRPC observer reporting straight to the accounting."""

from __future__ import annotations

from ..observer import ConnectionObserver
from . import TapParts


class StepRunnerTap:
    upstream_name = "step-runner"
    default_socket_group: str | None = None

    def __init__(self, parts: TapParts) -> None:
        self._parts = parts

    def watcher(self) -> ConnectionObserver:
        return self._parts.grpc_observer(self._parts.accounting)
