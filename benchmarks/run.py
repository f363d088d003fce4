"""Benchmark the sidecar against the direct connection (issue 5).

    python -m benchmarks.run [--quick] [--only NAME[,NAME...]] [--json PATH]
                             [--targets direct,sidecar[,sidecar-pure][,splice]] [--rounds N]

Builds the Go step-runner stand-in and client (cached), starts them, the sidecar and
any comparison proxy, runs every selected measurement interleaved across the targets,
prints a table and the issue's targets as PASS/MISS, and writes JSON (by default
benchmarks/results/latest.json). The `docker_*` measurements (issue 9) run the Docker
route instead: a test dockerd, the sidecar as `serve --tap docker` in front of it, the
client dialing through exec sessions (benchmarks/docker_route.py). Exit status: 0 when
everything ran, whatever the PASS/MISS verdicts; 1 when a measurement failed or the
sidecar's job counts disagree with the jobs run; 3 when the Go toolchain is missing
(`make bench` installs it); 4 when a Docker measurement was asked for by name (--only)
and no Docker daemon can run here (a run of everything skips the Docker route then).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import build, docker_route, measure, procs, report

DEFAULT_JSON = build.REPO / "benchmarks" / "results" / "latest.json"
PROXIES = (*procs.SIDECARS, "splice")
EXIT_NO_TOOLCHAIN = 3
EXIT_NO_DOCKER = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark the sidecar against the direct connection (issue 5).",
    )
    parser.add_argument("--quick", action="store_true", help="a small run of a few seconds each")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these measurements (comma-separated or repeated; a prefix such as "
        "'logs' selects all that start with it): " + ", ".join(_all_names(measure.FULL)),
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    parser.add_argument(
        "--targets",
        default="direct,sidecar",
        help="comma-separated: direct plus any of sidecar, sidecar-pure (its pure-Python "
        "observer core), splice (the plain byte splice in benchmarks/splice.py, for comparison)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 2)")
    return parser


def _all_names(profile: measure.Profile) -> list[str]:
    return (
        [b.name for b in measure.client_benches(profile)]
        + list(measure.OTHER_BENCHES)
        + docker_route.names(profile)
    )


def select(names: list[str], only: list[str]) -> list[str]:
    tokens = [t for arg in only for t in arg.split(",") if t]
    if not tokens:
        return names
    unknown = [t for t in tokens if not any(n.startswith(t) for n in names)]
    if unknown:
        raise SystemExit(f"unknown measurement {unknown}; known: {', '.join(names)}")

    def chosen(name: str) -> bool:
        # An exact name selects only itself: status_c1 is not a prefix of status_c16 here.
        return any(name == t or (t not in names and name.startswith(t)) for t in tokens)

    return [n for n in names if chosen(n)]


def _targets(spec: str) -> list[str]:
    targets = [t for t in spec.split(",") if t]
    bad = [t for t in targets if t not in PROXIES and t != measure.DIRECT]
    if measure.DIRECT not in targets or bad or len(targets) < 2:
        raise SystemExit(f"--targets needs direct and one or more of {PROXIES}, got {spec!r}")
    return [t for t in targets if t != measure.DIRECT]


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(ctx: measure.Context, selected: list[str], results: dict[str, Any]) -> None:
    for bench in measure.client_benches(ctx.profile):
        if bench.name in selected:
            _log(f"{bench.name} ...")
            results["client"][bench.name] = measure.run_client_bench(ctx, bench)
    for target in ctx.proxies:
        for name, flags in measure.RESOURCE_SHAPES.items():
            if name in selected:
                _log(f"{name} {target} ...")
                results.setdefault(name, {})[target] = measure.run_resources(ctx, target, flags)
        if "metrics" in selected:
            if not set(measure.RESOURCE_SHAPES) & set(selected):
                measure.populate(ctx, target)
            _log(f"metrics {target} ...")
            results["metrics"][target] = measure.run_metrics_render(ctx, target)
        if "ready" in selected:
            _log(f"ready {target} ...")
            results["ready"][target] = measure.run_ready(ctx, target)
        results["accounting"][target] = measure.check_accounting(ctx, target)


def _measure(
    ctx: measure.Context, proxies: list[str], selected: list[str], results: dict[str, Any]
) -> str | None:
    """Run everything between starting and stopping the processes; what failed, if anything."""
    with contextlib.ExitStack() as stack:
        try:
            server = procs.start_go_server(
                ctx.binaries, ctx.upstream, ctx.workdir / "stepserver.log"
            )
            stack.callback(procs.stop, server)
            for kind in proxies:
                proxy = procs.start_proxy(kind, ctx.workdir, ctx.upstream, kind)
                stack.callback(procs.stop, proxy.proc, proxy.web)
                ctx.proxies[kind] = proxy
            run(ctx, selected, results)
        except procs.BenchError as exc:
            return str(exc)
        except (OSError, http.client.HTTPException) as exc:  # a web endpoint failed us
            _log(traceback.format_exc())
            return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    profile = measure.QUICK if args.quick else measure.FULL
    if args.rounds:
        profile = dataclasses.replace(profile, rounds=args.rounds)
    selected = select(_all_names(profile), args.only)
    proxies = _targets(args.targets)
    try:
        binaries = build.ensure_built()
    except build.BuildError as exc:
        _log(str(exc))
        return EXIT_NO_TOOLCHAIN if build.missing_prerequisites() else 1

    started = time.time()
    results: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.run", *argv]),
        "machine": report.machine(),
        "toolchain": binaries.toolchain,
        "profile": dataclasses.asdict(profile),
        "targets": [measure.DIRECT, *proxies],
        "client": {},
        "resources": {},
        "metrics": {},
        "ready": {},
        "accounting": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="srb-", dir="/tmp"))
    upstream = workdir / "upstream.sock"
    ctx = measure.Context(binaries, workdir, upstream, profile, {}, _log)
    docker = [n for n in selected if n in docker_route.names(profile)]
    failed = None
    if len(docker) < len(selected):
        failed = _measure(ctx, proxies, selected, results)
    no_docker = False
    if docker and not failed:
        try:
            docker_route.run(binaries, workdir, profile, docker, results, _log)
        except docker_route.DockerUnavailableError as exc:
            if args.only:
                failed, no_docker = str(exc), True
            else:  # not asked for by name: the rest of the run stands on its own
                _log(f"docker route skipped: {exc}")
        except procs.BenchError as exc:
            failed = str(exc)

    results["seconds"] = round(time.time() - started, 1)
    results["checks"] = report.evaluate(results)
    mismatch = [t for t, a in results["accounting"].items() if a["checked"] and not a["match"]]
    if mismatch and not failed:
        failed = f"job accounting mismatch for {mismatch}"
    results["error"] = failed
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(report.render(results))
    print(f"\nJSON: {args.json}")
    if failed:
        for proxy in ctx.proxies.values():
            _log(f"--- last lines of {proxy.log}:\n{procs.log_tail(proxy.log)}")
        _log(f"FAILED: {failed}\n(process logs kept in {workdir})")
        return EXIT_NO_DOCKER if no_docker else 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
