"""The targets of issues 5 and 11 as checks, each on every workload it applies to, and
the results as a table. `python -m benchmarks.report RESULTS.json` prints them as the
Markdown tables of the README's Performance section."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.build import REPO
from benchmarks.measure import DIRECT

Results = dict[str, Any]


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain") else "")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    unit: str
    limit: float
    at_most: bool  # the value must be <= limit (else >= limit)
    value: Callable[[Results, str], float | None]
    # Some checks' limit depends on the run (RSS flatness scales with the warm RSS).
    limit_from: Callable[[Results, str], float | None] | None = None
    # Checks of one target on different workloads share a group; the worst one of a
    # group is what the summary (and the README) shows.
    group: str = ""


def _cmp(bench: str, metric: str, field: str) -> Callable[[Results, str], float | None]:
    def get(results: Results, target: str) -> float | None:
        found = results["client"].get(bench, {}).get("compare", {}).get(target, {})
        value = found.get(metric, {}).get(field)
        return float(value) if value is not None else None

    return get


def _get(section: str, *path: str) -> Callable[[Results, str], float | None]:
    def get(results: Results, target: str) -> float | None:
        node: Any = results.get(section, {}).get(target)
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node if isinstance(node, int | float) else None

    return get


def _bench_cpu(bench: str) -> Callable[[Results, str], float | None]:
    def get(results: Results, target: str) -> float | None:
        value = results["client"].get(bench, {}).get("cpu_us_per_job", {}).get(target)
        return float(value) if value is not None else None

    return get


# The workloads each target of issue 11 is checked on; the README shows the worst.
UNARY = ("status_c1", "status_c1_nodl")
JOBS_C16 = ("jobs_c16", "jobs_c16_nodl", "jobs_c16_shared", "jobs_c16_shared_nodl")
RESOURCES = ("resources", "resources_shared")

CHECKS: tuple[Check, ...] = (
    *(
        Check(f"{b} p50 added", "us", 75, True, _cmp(b, "p50_us", "added"), group="unary p50 added")
        for b in UNARY
    ),
    *(
        Check(
            f"{b} p99 added", "us", 500, True, _cmp(b, "p99_us", "added"), group="unary p99 added"
        )
        for b in UNARY
    ),
    *(
        Check(
            f"{b} jobs/s vs direct",
            "x",
            0.75,
            False,
            _cmp(b, "jobs_per_s", "ratio"),
            group="jobs c16 vs direct",
        )
        for b in JOBS_C16
    ),
    Check(
        "logs_128 MB/s vs direct",
        "x",
        0.80,
        False,
        _cmp("logs_128", "mb_per_s", "ratio"),
        group="FollowLogs 128 B",
    ),
    Check(
        "logs_4k MB/s vs direct",
        "x",
        0.85,
        False,
        _cmp("logs_4k", "mb_per_s", "ratio"),
        group="FollowLogs 4 KiB",
    ),
    Check(
        "logs_32k MB/s vs direct",
        "x",
        0.85,
        False,
        _cmp("logs_32k", "mb_per_s", "ratio"),
        group="FollowLogs 32 KiB",
    ),
    *(
        Check(f"{b} CPU per job", "us", 150, True, _bench_cpu(b), group="CPU per job")
        for b in ("jobs_c1", *JOBS_C16)
    ),
    *(
        Check(f"{r} CPU per job", "us", 150, True, _get(r, "cpu_us_per_job"), group="CPU per job")
        for r in RESOURCES
    ),
    *(
        Check(f"{r} RSS at the end", "MiB", 80, True, _get(r, "rss_mib"), group="RSS")
        for r in RESOURCES
    ),
    *(
        Check(
            f"{r} RSS growth after warm-up",
            "MiB",
            0,
            True,
            _get(r, "rss_growth_after_warmup_mib"),
            _get(r, "rss_flat_limit_mib"),
            group="RSS flat",
        )
        for r in RESOURCES
    ),
    Check(
        "/metrics render p50 (text)",
        "ms",
        5,
        True,
        _get("metrics", "text", "p50_ms"),
        group="/metrics",
    ),
    Check(
        "/metrics render p50 (OpenMetrics)",
        "ms",
        5,
        True,
        _get("metrics", "openmetrics", "p50_ms"),
        group="/metrics",
    ),
    Check("start to /-/ready (median)", "s", 1, True, _get("ready", "median_s"), group="ready"),
    # Issue 9: the Docker route, direct to the daemon vs through the docker tap.
    Check(
        "Docker jobs/s c8 vs direct", "x", 0.9, False, _cmp("docker_jobs", "jobs_per_s", "ratio")
    ),
    Check(
        "Docker FollowLogs 4 KiB vs direct",
        "x",
        0.9,
        False,
        _cmp("docker_logs_4k", "mb_per_s", "ratio"),
    ),
)


def evaluate(results: Results) -> list[dict[str, Any]]:
    out = []
    for target in results["targets"]:
        if target == DIRECT:
            continue
        for check in CHECKS:
            value = check.value(results, target)
            limit = check.limit_from(results, target) if check.limit_from else check.limit
            if value is None or limit is None:
                continue
            ok = value <= limit if check.at_most else value >= limit
            out.append(
                {
                    "target": target,
                    "check": check.name,
                    "value": value,
                    "limit": limit,
                    "unit": check.unit,
                    "at_most": check.at_most,
                    "pass": ok,
                    "group": check.group or check.name,
                }
            )
    return out


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _versus(entry: dict[str, Any]) -> str:
    if entry["latency"]:
        unit = entry["unit"].split()[-1]
        return f"{'+' if entry['added'] >= 0 else ''}{_fmt(entry['added'])} {unit}"
    return f"{entry['ratio']:.2f}x"


def client_table(results: Results) -> list[str]:
    others = [t for t in results["targets"] if t != DIRECT]
    head = f"{'benchmark':<21} {'metric':<11} {'direct':>10}"
    for t in others:
        head += f" {t:>10} {t + ' vs direct':>18}"
    lines = [head, "-" * len(head)]
    for name, bench in results["client"].items():
        first = True
        # The Docker route compares the docker tap only.
        present = [t for t in others if t in bench["compare"]]
        for key, direct_entry in bench["compare"][present[0]].items():
            row = f"{name if first else '':<21} {direct_entry['unit']:<11}"
            row += f" {_fmt(direct_entry['direct']):>10}"
            for t in others:
                entry = bench["compare"].get(t, {}).get(key)
                if entry is None:
                    row += f" {'-':>10} {'-':>18}"
                    continue
                row += f" {_fmt(entry['value']):>10} {_versus(entry):>18}"
            lines.append(row)
            first = False
    return lines


def other_lines(results: Results) -> list[str]:
    lines = []
    for name, t, r in [(n, t, r) for n in RESOURCES for t, r in results.get(n, {}).items()]:
        lines.append(
            f"{name} {t}: {r['cpu_seconds_per_1000_jobs']:.3f} CPU s per 1000 jobs "
            f"({r['cpu_us_per_job']:.0f} us/job) over {r['jobs']} jobs at c16; "
            f"RSS {r['rss_mib']:.1f} MiB at the end, {r['rss_after_warmup_mib']:.1f} MiB "
            f"after warm-up ({r['rss_growth_after_warmup_mib']:+.1f} MiB); "
            f"samples {r['rss_samples_mib']}"
        )
    for t, m in results.get("metrics", {}).items():
        for fmt, r in m.items():
            lines.append(
                f"{t}: /metrics ({fmt}) p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, "
                f"max {r['max_ms']:.2f} ms over {r['gets']} GETs; {r['series']} series, "
                f"{r['bytes']} bytes"
            )
    for t, r in results.get("ready", {}).items():
        lines.append(
            f"{t}: start to /-/ready {r['median_s'] * 1000:.0f} ms median, "
            f"{r['max_s'] * 1000:.0f} ms max over {r['starts']} starts"
        )
    cpu = results.get("docker_cpu", {})
    if cpu:
        tap = next((r for r in cpu.values() if "tap_cpu_us_per_job" in r), None)
        line = "docker route CPU per job:"
        if tap is not None:
            line += f" tap {tap['tap_cpu_us_per_job']:,.0f} us;"
        line += " dockerd+containerd " + ", ".join(
            f"{r['daemon_cpu_us_per_job']:,.0f} us ({t})" for t, r in cpu.items()
        )
        lines.append(line)
    for t, a in results.get("accounting", {}).items():
        if not a["checked"]:
            lines.append(f"{t}: exports no step_runner_jobs_total; accounting not checked")
        else:
            verdict = "match" if a["match"] else "MISMATCH"
            lines.append(f"{t}: jobs counted {a['counted']} vs run {a['expected']}: {verdict}")
    return lines


def check_lines(checks: list[dict[str, Any]]) -> list[str]:
    lines = []
    for c in checks:
        op = "<=" if c["at_most"] else ">="
        value = f"{_fmt(c['value'])} {c['unit']}"
        by = f"{'+' if _margin(c) >= 0 else ''}{_fmt(_margin(c))} {c['unit']}"
        target = f"{op} {_fmt(c['limit'])} {c['unit']}"
        lines.append(
            f"{'PASS' if c['pass'] else 'MISS'}  {c['target']:<8} {c['check']:<36} "
            f"{value:>14}   (target {target}; {by})"
        )
    return lines


def _margin(c: dict[str, Any]) -> float:
    """How far a check is from its limit, in its unit; negative when it misses."""
    diff: float = c["limit"] - c["value"] if c["at_most"] else c["value"] - c["limit"]
    return diff


def worst(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target and group, the check closest to (or furthest past) its limit."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for c in checks:
        key = (c["target"], c.get("group", c["check"]))
        if key not in found or _margin(c) < _margin(found[key]):
            found[key] = c
    return list(found.values())


def render(results: Results) -> str:
    m = results["machine"]
    lines = [
        f"step-runner-exporter benchmark ({results['profile']['name']}, "
        f"{results['profile']['rounds']} interleaved rounds (x3 for FollowLogs), median of rounds; "
        "ratios and added times are medians of per-round pairs)",
        f"machine: {m['cores']} cores, {m['cpu_model']}, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, load {m['loadavg_at_start']} at start; "
        f"Python {m['python']}; {results['toolchain']}; commit {m['commit']}",
        f"command: {results['command']}",
        "",
    ]
    if results["client"]:
        lines += [*client_table(results), ""]
        for name, bench in results["client"].items():
            for t, cpu in bench.get("cpu_us_per_job", {}).items():
                lines.append(f"{name} {t}: {cpu:.0f} us CPU per job (median of rounds)")
    lines += other_lines(results)
    if results["checks"]:
        lines += ["", "targets of issues 5 and 11:", *check_lines(results["checks"])]
        lines += ["", "worst workload per target:", *check_lines(worst(results["checks"]))]
    return "\n".join(lines)


def _md_value(c: dict[str, Any]) -> str:
    op = "<=" if c["at_most"] else ">="
    verdict = "met" if c["pass"] else "MISSED"
    by = f"{'+' if _margin(c) >= 0 else ''}{_fmt(_margin(c))} {c['unit']}"
    return (
        f"{_fmt(c['value'])} {c['unit']} | {op} {_fmt(c['limit'])} {c['unit']} | {verdict} ({by})"
    )


def markdown(results: Results) -> str:
    """The worst workload per target, then every check, as Markdown tables (README)."""
    checks = results["checks"]
    lines = [
        "| target (worst workload) | measured | limit | verdict (margin) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c['group']}: `{c['check']}` | {_md_value(c)} |" for c in worst(checks)]
    lines += ["", "| workload: check | measured | limit | verdict (margin) |", "|---|---|---|---|"]
    lines += [f"| `{c['check']}` | {_md_value(c)} |" for c in checks]
    lines += [
        "",
        "| workload | metric | direct | sidecar | sidecar vs direct |",
        "|---|---|---|---|---|",
    ]
    for name, bench in results["client"].items():
        for entry in bench["compare"].get("sidecar", {}).values():
            lines.append(
                f"| `{name}` | {entry['unit']} | {_fmt(entry['direct'])} | "
                f"{_fmt(entry['value'])} | {_versus(entry)} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
