"""The observer core as deployed: compiled by the package's own install where a C
compiler is, pure Python where none is or when forced, and build_info saying which."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

import pytest

from exporter import native
from exporter.simulator import SimulatedStepRunner, run_jobs
from tests.compiled import compiled_part

from .harness import run_async, short_tmpdir, wait_until
from .sidecar import (
    ServeProcess,
    families,
    jobs_exported,
    running_sidecar_process,
    serve_argv,
    serve_process,
)

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]


def build_info(sidecar: ServeProcess) -> dict[str, str]:
    (sample,) = families(sidecar)["step_runner_exporter_build_info"].samples
    return dict(sample.labels)


def counts_jobs_right(sidecar: ServeProcess) -> None:
    """Jobs through `sidecar` are all classified as the simulated Runner saw them."""
    tally = run_async(run_jobs(sidecar.listen, 40, concurrency=4, seed=11), 60)
    assert tally.mismatches == []

    want = {r: float(tally.results.get(r, 0)) for r in ("success", "failed", "cancelled")}
    wait_until(lambda: jobs_exported(sidecar) == want, what="counters equal to the tally")


def test_serve_runs_the_compiled_core_and_says_so(sidecar_process: ServeProcess) -> None:
    for part in ("_hpack_core", "_h2_core"):
        compiled_part(part)  # built by `make test`'s install; required in CI
    assert native.NAME == native.COMPILED
    assert build_info(sidecar_process)["observer_core"] == "c"
    counts_jobs_right(sidecar_process)


def test_the_pure_python_core_can_be_forced(step_runner: SimulatedStepRunner) -> None:
    env = {**os.environ, native.PURE_ENV: "1"}
    with running_sidecar_process(step_runner.listen_address, env=env) as sidecar:
        assert build_info(sidecar)["observer_core"] == "python"
        counts_jobs_right(sidecar)


def _install_without_compiler(target: Path, env: Mapping[str, str]) -> None:
    # The package's own build, as pip runs it, with a compiler that always fails.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-compile", "--target", str(target), str(REPOSITORY)],
        env={**env, "CC": "/bin/false"}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_installs_and_serves_pure_python_where_no_compiler_is(
    step_runner: SimulatedStepRunner, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    _install_without_compiler(site, env)
    assert (site / "exporter" / "observer.py").is_file()
    assert not list(site.glob("exporter/*.so"))

    # Nothing but `site` may provide the package: -P keeps the working directory (this
    # checkout, compiled) off the path and -S the editable install's import hook, which
    # would find the checkout's compiled modules under the installed package. The
    # dependencies come from this interpreter's site-packages, named directly.
    env["PYTHONPATH"] = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
    main = "import sys; from exporter.cli import main; sys.exit(main())"
    with short_tmpdir() as directory:
        listen = f"unix://{directory}/sidecar.sock"
        argv = serve_argv("--upstream", step_runner.listen_address, "--listen", listen)
        argv[:1] = [sys.executable, "-P", "-S", "-c", main]
        with serve_process(argv, env=env) as sidecar:
            assert build_info(sidecar)["observer_core"] == "python"
            counts_jobs_right(sidecar)
