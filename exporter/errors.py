"""The one exception type for a failure to start (SPEC section 6)."""

from __future__ import annotations


class StartError(Exception):
    """The sidecar cannot start. Its message is the one line the user sees: what failed
    and where (an address, a path, a config key), never a traceback."""
