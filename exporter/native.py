"""Which observer core this process runs: compiled or pure Python (issue 11).

The compiled core is two C extensions that setup.py builds where a compiler is:
`exporter._hpack_core.Decoder`, the twin of `hpack.Decoder(...).decode(block,
raw=True)` as the observer uses it, and `exporter._h2_core.FrameReader`, the twin of
`exporter.h2.FrameReader`. The pure-Python modules stay the reference: the
differential tests (tests/unit/twin.py, test_core_differential.py, test_h2_core.py,
test_hpack_core.py) feed both the same input and require the same results and the
same call events, and `make test` runs the unit suite on each.

It is all or nothing: a process runs the compiled core only when every part of it
imports, so `step_runner_exporter_build_info{observer_core}` says exactly which code
decoded the traffic. Setting STEP_RUNNER_EXPORTER_PURE_PYTHON=1 forces pure Python
(a bug found in the compiled core can be worked around without a rebuild).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Final

PURE_ENV: Final = "STEP_RUNNER_EXPORTER_PURE_PYTHON"
_PARTS: Final = ("exporter._hpack_core", "exporter._h2_core")

# The values of build_info's observer_core label.
COMPILED: Final = "c"
PURE: Final = "python"
OBSERVER_CORES: Final = (COMPILED, PURE)


@dataclass(frozen=True)
class Core:
    """The compiled twins the observer builds its parts from."""

    decoder: Any  # exporter._hpack_core.Decoder
    frame_reader: Any  # exporter._h2_core.FrameReader


def load() -> Core | None:
    """The compiled core, or None when a part of it is missing (not built here)."""
    try:
        hpack_core, h2_core = (importlib.import_module(name) for name in _PARTS)
    except ImportError:
        return None
    return Core(decoder=hpack_core.Decoder, frame_reader=h2_core.FrameReader)


def _forced_pure() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


CORE: Final = None if _forced_pure() else load()
NAME: Final = COMPILED if CORE is not None else PURE
