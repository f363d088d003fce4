"""The compiled observer core's parts, for the tests that compare them with pure Python."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def compiled_part(name: str) -> ModuleType:
    """`exporter.<name>`, the C extension built by setup.py (`make test` builds it).

    A test comparing it with its pure-Python twin fails in CI when it is missing (the
    Makefile installs the compiler there) and skips elsewhere.
    """
    try:
        return importlib.import_module(f"exporter.{name}")
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the compiled observer core is required in CI: {exc}")
        pytest.skip(f"compiled observer core not built here: {exc}")
