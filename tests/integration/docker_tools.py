"""`srx-tool` (tests/integration/srx_tool/main.go): small static programs for containers
of an image with nothing else in it, built once and reused while its source and the Go
toolchain are unchanged.

The build lands in the repository's gitignored `build/` directory, keyed by a digest of
its inputs; engineers sharing a worktree may build at the same time, so each build goes
to a private directory first and is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .docker_daemon import DockerDaemon

REPO = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().parent / "srx_tool" / "main.go"
BUILD_DIR = REPO / "build" / "srx-tool"
IMAGE = "srx-test/tools:1"
TOOL = "/bin/srx-tool"


def tool_binary() -> Path:
    """The static srx-tool binary, built if its source or Go changed."""
    go = shutil.which("go")
    if go is None:
        raise AssertionError("go is not installed (Debian package golang-go, `make bench-deps`)")
    version = subprocess.run([go, "version"], check=True, capture_output=True, text=True).stdout
    digest = hashlib.sha256(version.encode() + b"\0" + SOURCE.read_bytes()).hexdigest()[:16]
    binary = BUILD_DIR / digest / "srx-tool"
    if binary.exists():
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=BUILD_DIR))
    try:
        env = {**os.environ, "CGO_ENABLED": "0", "GO111MODULE": "off"}
        env["GOCACHE"] = str(BUILD_DIR / "gocache")
        result = subprocess.run(
            [go, "build", "-trimpath", "-o", str(work / "srx-tool"), str(SOURCE)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"go build {SOURCE} failed: {result.stderr.strip()}")
        try:
            work.rename(binary.parent)
        except OSError:
            # Another build got there first with the same inputs: use that one.
            if not binary.exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return binary


def tools_image(daemon: DockerDaemon) -> str:
    """An image holding only `/bin/srx-tool` in `daemon`; returns its name."""
    daemon.import_image(IMAGE, {TOOL: tool_binary()})
    return IMAGE
