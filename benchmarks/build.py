"""Builds the Go step-runner stand-in and client from Debian's Go packages.

GOPATH mode (`GO111MODULE=off`) because no Go module proxy is reachable: grpc-go and
protobuf-go come from /usr/share/gocode, and the StepRunner stubs are generated from
exporter/proto/step.proto at build time into a GOPATH under benchmarks/.build. A
build is reused while its inputs (sources, proto, toolchain versions) are unchanged.
Every binary is static (`CGO_ENABLED=0`), so the Docker tests can put the stand-in and
citool into an image that has nothing else in it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_DIR = REPO / "benchmarks" / ".build"
GO_SOURCES = REPO / "benchmarks" / "go"
PROTO = REPO / "exporter" / "proto" / "step.proto"
PROGRAMS = ("stepserver", "stepclient", "citool")

GOCODE = Path("/usr/share/gocode")
PROTO_INCLUDE = Path("/usr/include")
TOOLS = ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
# What must exist for the build to work, each with the Debian package that ships it.
FILES = {
    GOCODE / "src/google.golang.org/grpc/server.go": "golang-google-grpc-dev",
    GOCODE / "src/google.golang.org/protobuf/proto/proto.go": "golang-google-protobuf-dev",
    GOCODE / "src/github.com/golang/protobuf/proto/proto.go": (
        "golang-github-golang-protobuf-1-5-dev"
    ),
    PROTO_INCLUDE / "google/protobuf/timestamp.proto": "libprotobuf-dev",
}
INSTALL_HINT = "run `make bench` once (it installs the Debian packages with apt-get)"


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class GoBinaries:
    server: Path
    client: Path
    toolchain: str  # go, protoc and grpc-go versions, for the report
    # The small multi-call tools (echo, sleep, cat, ...) of the Docker test image.
    citool: Path


def missing_prerequisites() -> list[str]:
    """What the build needs but this machine lacks (empty when it can build)."""
    missing = [f"{tool} (command)" for tool in TOOLS if shutil.which(tool) is None]
    missing += [f"{path} ({pkg})" for path, pkg in FILES.items() if not path.exists()]
    return missing


def _output(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def toolchain_version() -> str:
    grpc_version = "unknown"
    version_go = GOCODE / "src/google.golang.org/grpc/version.go"
    for line in version_go.read_text().splitlines():
        if line.startswith("const Version"):
            grpc_version = line.split('"')[1]
    go = _output("go", "version").removeprefix("go version ")
    return f"{go}, {_output('protoc', '--version')}, grpc-go {grpc_version}"


def _inputs_digest(toolchain: str) -> str:
    digest = hashlib.sha256(toolchain.encode())
    for path in [PROTO, *sorted(GO_SOURCES.rglob("*.go"))]:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _go_env(build_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{build_dir / 'gopath'}:{GOCODE}",
        "GOCACHE": str(build_dir / "gocache"),
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")


def _build(build_dir: Path) -> None:
    gopath_src = build_dir / "gopath" / "src"
    shutil.rmtree(build_dir / "gopath", ignore_errors=True)
    gopath_src.mkdir(parents=True)
    # The generated package lands at its go_package path inside the GOPATH.
    _run(
        [
            "protoc",
            f"-I{PROTO.parent}",
            f"-I{PROTO_INCLUDE}",
            f"--go_out={gopath_src}",
            f"--go-grpc_out={gopath_src}",
            str(PROTO),
        ],
        cwd=REPO,
    )
    env = _go_env(build_dir)
    (build_dir / "bin").mkdir(exist_ok=True)
    for program in PROGRAMS:
        tmp = build_dir / "bin" / f".{program}.tmp"
        # Stripped: the images of the Docker tests copy these into every container.
        build = ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(tmp), "."]
        _run(build, cwd=GO_SOURCES / program, env=env)
        tmp.replace(build_dir / "bin" / program)


def ensure_built(build_dir: Path = BUILD_DIR) -> GoBinaries:
    """Build the Go programs unless an up-to-date build exists; safe to call from
    several processes at once."""
    missing = missing_prerequisites()
    if missing:
        raise BuildError(
            f"cannot build the Go benchmark programs, missing: {', '.join(missing)}; "
            + INSTALL_HINT
        )
    build_dir.mkdir(parents=True, exist_ok=True)
    toolchain = toolchain_version()
    key = _inputs_digest(toolchain)
    stamp = build_dir / "stamp"
    bin_dir = build_dir / "bin"
    binaries = GoBinaries(
        bin_dir / "stepserver", bin_dir / "stepclient", toolchain, bin_dir / "citool"
    )
    with (build_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fresh = stamp.exists() and stamp.read_text() == key
        built = (binaries.server, binaries.client, binaries.citool)
        if not (fresh and all(path.exists() for path in built)):
            stamp.unlink(missing_ok=True)
            _build(build_dir)
            stamp.write_text(key)
    return binaries


if __name__ == "__main__":
    print(ensure_built())
