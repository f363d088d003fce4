"""Dependencies by role: the sidecar runs without grpcio, which only the demo (and the
tests) need, and the container image installs the sidecar's alone."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from exporter.cli import DEMO_NEEDS_GRPC

ROOT = Path(__file__).resolve().parents[2]
# Runs `code` in a fresh interpreter in which `import grpc` fails, as on a machine
# where only the sidecar's dependencies are installed.
WITHOUT_GRPC = "import sys; sys.modules['grpc'] = None\n"


def python_without_grpc(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_GRPC + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_sidecar_needs_no_grpcio() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "grpcio" not in requirement_names(project["dependencies"])
    assert "grpcio" in requirement_names(project["optional-dependencies"]["demo"])


def test_every_module_but_the_demos_imports_without_grpcio() -> None:
    result = python_without_grpc(
        "import importlib, pkgutil, exporter\n"
        "skip = ('exporter.simulator', 'exporter.demo', 'exporter.proto.step_pb2_grpc',"
        " 'exporter.proto.regenerate')\n"
        "names = [m.name for m in pkgutil.walk_packages(exporter.__path__, 'exporter.')"
        " if not m.name.startswith(skip)]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 10  # the walk found the sidecar's modules


def test_demo_without_grpcio_names_the_extra_in_one_line() -> None:
    result = python_without_grpc(
        "import runpy\n"
        "sys.argv = ['step-runner-exporter', 'demo', '--jobs', '1']\n"
        "runpy.run_module('exporter.cli', run_name='__main__')\n"
    )
    assert result.returncode == 1
    assert result.stderr == DEMO_NEEDS_GRPC + "\n"
    assert "step-runner-exporter[demo]" in DEMO_NEEDS_GRPC
    assert result.stdout == ""


def test_the_image_installs_no_demo_extra() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    (spec,) = re.findall(r"pip install [^\n]*?'(\.\[[^\]]*\])'", dockerfile)
    extras = set(spec.removeprefix(".[").removesuffix("]").split(","))
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pulled = set().union(*(requirement_names(optional[e]) for e in extras))
    assert "grpcio" not in pulled, spec
