"""A child's stderr lines collected on a thread (the docker tests' taps run with
`stderr=PIPE`); harness.child_process with its ProcessLog is the newer way to the same."""

from __future__ import annotations

import re
import subprocess
import threading


class LogReader:
    """Collects a process's stderr lines on a thread, so waiting never blocks on a pipe."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)

    def find(self, pattern: str) -> re.Match[str] | None:
        for line in list(self.lines):
            if match := re.search(pattern, line):
                return match
        return None

    def join(self, timeout: float) -> None:
        """Wait until the process closed its stderr (it exited) and every line is in."""
        self._thread.join(timeout)
