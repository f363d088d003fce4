"""StepRunner method paths (SPEC section 2): which request paths are StepRunner calls,
and the name of the service, `<package>.StepRunner`, written once.

Step-runner builds use different protobuf packages (`proto` in the public source,
`step` in a newer one), so by default a path `/<any package>.StepRunner/<Method>` of
the five methods is a StepRunner call; a configuration can pin one package. A path of
any other shape is forwarded but not classified.
"""

from __future__ import annotations

import functools
import re

from .events import STEP_RUNNER_METHODS, UNKNOWN_METHOD, Method

SERVICE = "StepRunner"
# The package of the public step-runner source: the series that exist from the start
# when no package is pinned.
DEFAULT_PACKAGE = "proto"
# Distinct services kept as grpc_service label values per process; later packages are
# still classified, labelled `unknown` (a client must not grow the label set).
MAX_SERVICES = 4

# A protobuf package: dot-separated identifiers.
_PACKAGE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_SUFFIX = f".{SERVICE}/".encode()
# Paths remembered by the process-wide lookup of any-package paths; beyond it, a new
# path is parsed every time instead of growing the memo.
_MAX_MEMO = 8 * MAX_SERVICES * len(STEP_RUNNER_METHODS)


def is_package(name: str) -> bool:
    return _PACKAGE.fullmatch(name) is not None


def service_name(package: str) -> str:
    return f"{package}.{SERVICE}"


def is_service(name: str) -> bool:
    """Whether `name` is a StepRunner service name, `<package>.StepRunner`."""
    package, dot, service = name.rpartition(".")
    return bool(dot) and service == SERVICE and is_package(package)


@functools.lru_cache(maxsize=8)
def _pinned(package: str) -> dict[bytes, Method]:
    """The methods of one package by request path: built once, shared read-only."""
    service = service_name(package)
    return {
        f"/{service}/{name}".encode(): Method(service, name, grpc_type)
        for name, grpc_type in STEP_RUNNER_METHODS.items()
    }


_any: dict[bytes, Method] = {}


def method_lookup(package: str | None) -> dict[bytes, Method]:
    """A path -> Method table to try first; `resolve` is the fallback for what it lacks."""
    return _pinned(package) if package is not None else _any


def resolve(path: bytes, package: str | None) -> Method:
    """The Method of a request path missing from `method_lookup(package)`."""
    if package is not None:
        return UNKNOWN_METHOD
    method = _parse(path)
    if method is not UNKNOWN_METHOD and len(_any) < _MAX_MEMO:
        _any[path] = method
    return method


def _parse(path: bytes) -> Method:
    cut = path.rfind(_SUFFIX)
    if cut < 2 or path[0] != 0x2F:  # "/"
        return UNKNOWN_METHOD
    name = path[cut + len(_SUFFIX) :].decode("ascii", "replace")
    grpc_type = STEP_RUNNER_METHODS.get(name)
    package = path[1:cut].decode("ascii", "replace")
    if grpc_type is None or not is_package(package):
        return UNKNOWN_METHOD
    return Method(service_name(package), name, grpc_type)
