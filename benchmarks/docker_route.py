"""The Docker route of the benchmark (issue 9): GitLab Runner's Docker executor reaches
step-runner through exec sessions of the Docker Engine API, so the sidecar sits in
front of the daemon as `serve --tap docker`.

A real dockerd on temp paths (tests/integration/docker_daemon.py, the same one the
tests use), the test image with the Go stand-in as `gitlab-runner-helper`, one build
container running `steps serve`; the Go client dials as Runner does (one exec of
`steps proxy --socket P` per job, hijacked start, stdcopy) either straight to the
daemon's socket or to the tap's, interleaved round by round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import measure, procs
from benchmarks.build import GoBinaries

TAP = "sidecar"  # the docker tap is the sidecar with --tap docker
CONCURRENCY = 8


def benches(p: measure.Profile) -> list[measure.ClientBench]:
    jobs = (measure.JOBS, measure.JOB_P50, measure.JOB_P99)
    return [
        measure.ClientBench(
            "docker_jobs",
            {
                "mode": "jobs",
                "concurrency": CONCURRENCY,
                "duration": f"{p.docker_jobs_seconds}s",
                **measure.JOB_LOG,
            },
            jobs,
        ),
        measure.ClientBench(
            "docker_logs_4k",
            {"mode": "logs", "chunk": 4096, "log_bytes": p.log_bytes},
            (measure.MBPS, measure.MSGS),
            success_jobs=1,
            round_factor=3,
        ),
    ]


def names(p: measure.Profile) -> list[str]:
    return [b.name for b in benches(p)]


@dataclass
class DockerContext(measure.Context):
    """A Context whose targets are Docker Engine API sockets: the daemon's (direct)
    and the tap's; every client run dials through exec sessions in `container`."""

    container: str = ""
    steps_socket: str = ""
    daemon_pid: int = 0
    # CPU seconds spent per job run, by target: (tap, dockerd and containerd, jobs).
    cpu: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)

    def route(self, target: str) -> dict[str, object]:
        return {
            "docker": self.socket(target),
            "container": self.container,
            "steps_socket": self.steps_socket,
        }

    def client(self, target: str, **flags: object) -> dict[str, Any]:
        if flags.get("mode") != "jobs":
            return super().client(target, **flags)
        tap_pid = self.proxies[TAP].proc.pid
        tap0, daemon0 = procs.cpu_seconds(tap_pid), procs.cpu_seconds(self.daemon_pid)
        result = super().client(target, **flags)
        tap1, daemon1 = procs.cpu_seconds(tap_pid), procs.cpu_seconds(self.daemon_pid)
        self.cpu.setdefault(target, []).append((tap1 - tap0, daemon1 - daemon0, result["jobs"]))
        return result


def cpu_per_job(ctx: DockerContext) -> dict[str, Any]:
    """Microseconds of CPU per job of the jobs runs: the tap's on its own runs, and the
    daemon's (dockerd and its containerd; the shims and runc run outside that tree)
    on each route."""
    out: dict[str, Any] = {}
    for target, runs in ctx.cpu.items():
        jobs = sum(n for _, _, n in runs) or 1
        out[target] = {
            "jobs": jobs,
            "daemon_cpu_us_per_job": sum(d for _, d, _ in runs) / jobs * 1e6,
        }
        if target == TAP:
            out[target]["tap_cpu_us_per_job"] = sum(t for t, _, _ in runs) / jobs * 1e6
    return out


class DockerUnavailableError(procs.BenchError):
    """No Docker daemon can run here; the message says why."""


def run(
    binaries: GoBinaries,
    workdir: Path,
    profile: measure.Profile,
    selected: list[str],
    results: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """Run the selected Docker benches into results["client"], and the tap's job
    accounting into results["accounting"]["sidecar (docker tap)"]."""
    # The tests' daemon and image helpers: one definition of how a test daemon runs.
    from tests.integration.docker_daemon import DaemonUnavailableError, DockerDaemon
    from tests.integration.docker_images import start_build_container, step_runner_image

    daemon = DockerDaemon()
    with contextlib.ExitStack() as stack:
        stack.callback(daemon.stop)
        try:
            daemon.start()
        except DaemonUnavailableError as exc:
            raise DockerUnavailableError(f"no Docker daemon: {exc}") from exc
        image = step_runner_image(daemon)
        container = start_build_container(daemon, image)
        log(f"docker: dockerd up, build container {container.id[:12]} on {container.socket}")
        tap = procs.start_proxy(
            "sidecar", workdir, Path(daemon.socket), "docker-tap", ["--tap=docker"]
        )
        stack.callback(procs.stop, tap.proc, tap.web)
        ctx = DockerContext(
            binaries,
            workdir,
            Path(daemon.socket),
            profile,
            {TAP: tap},
            log,
            container=container.id,
            steps_socket=container.socket,
            daemon_pid=int(Path(daemon.dir, "dockerd.pid").read_text()),
        )
        for bench in benches(profile):
            if bench.name in selected:
                log(f"{bench.name} ...")
                results["client"][bench.name] = measure.run_client_bench(ctx, bench)
        results["accounting"][f"{TAP} (docker tap)"] = measure.check_accounting(ctx, TAP)
        if ctx.cpu:
            results["docker_cpu"] = cpu_per_job(ctx)
