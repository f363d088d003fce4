"""End to end: a real Prometheus scrapes the real sidecar (a subprocess) while the
simulated Runner drives a mixed workload through it into the simulated step-runner.
Then every dashboard query and every rule expression is evaluated through Prometheus'
HTTP API, and the headline numbers must equal the simulated Runner's own tally."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exporter.simulator import SCENARIOS, Tally, run_jobs
from monitoring import rules
from monitoring.dashboards import DASHBOARDS
from monitoring.settings import MIN_JOBS_PER_HOUR, UNKNOWN_FAILURE_RATIO, error_budget

from .harness import simulated_step_runner_thread
from .prometheus import Prometheus, PrometheusError, poll, running_prometheus
from .sidecar import running_sidecar_process

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULE_FILE = ROOT / "rules" / "step-runner.rules.yml"
RUNNER = "e2e-runner"
# Enough for the SLO alerts' traffic guard even averaged over 6 hours (30 jobs an hour).
JOBS = 200
# Every scenario the simulator knows, equally likely: every failure label set, panics,
# schema drift and undecodable messages all show up.
MIX = {name: 1.0 for name in SCENARIOS}
RATE_INTERVAL = "1m"
RANGE = "1h"  # longer than the test: the range starts before the first scrape
CATEGORIES = ("infrastructure", "script", "unknown")


def grafana_regex(value: str) -> str:
    """A single selected variable value as Grafana writes it into a PromQL regex."""
    escaped = re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", value)
    return escaped.replace("\\", "\\\\")


def substitute(expr: str, runner: str, instance: str) -> str:
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", RANGE)
        .replace("$runner", runner)
        .replace("$instance", instance)
    )


@dataclass
class Run:
    prom: Prometheus
    tally: Tally
    instance: str
    at: float  # the last scrape after the workload: every query is evaluated there
    started: float

    @property
    def total(self) -> int:
        return len(self.tally.jobs)

    def category(self, category: str) -> int:
        return sum(n for labels, n in self.tally.failures.items() if labels[3] == category)


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    with (
        simulated_step_runner_thread() as (sim, loop),
        running_sidecar_process(sim.listen_address, labels={"runner": RUNNER}) as sidecar,
        running_prometheus([sidecar.web], [RULE_FILE]) as prom,
    ):
        # Prometheus sees every counter at 0 before the first job, so increase() over a
        # range that starts earlier is exact.
        prom.wait_scraped(2)
        started = time.time()
        tally = loop.run(
            run_jobs(sidecar.listen, JOBS, concurrency=8, mix=MIX, seed=3), timeout=120
        )
        ended = time.time()
        assert not tally.mismatches, [job.problems() for job in tally.mismatches]
        total = len(tally.jobs)

        # Jobs are counted before their Close: a scrape from before the workload ended
        # can hold every job and still miss the last calls.
        def settled() -> float | None:
            at = prom.last_scrape()
            done = at > ended and prom.value("sum(step_runner_jobs_total)", at) == total
            return at if done else None

        at = poll(settled, 30, f"a scrape after the last call, with all {total} jobs")
        yield Run(prom, tally, sidecar.web, at, started)


def test_raw_counters_equal_the_tally(run: Run) -> None:
    by_result = {
        s["metric"]["result"]: s["value"]
        for s in run.prom.query(f'step_runner_jobs_total{{runner="{RUNNER}"}}', run.at)
    }
    assert by_result == {r: float(run.tally.results.get(r, 0)) for r in by_result}
    assert set(by_result) == {"success", "failed", "cancelled"}
    failures = {
        (m["failure_reason"], m["source"], m["kind"], m["category"]): v
        for m, v in (
            (s["metric"], s["value"])
            for s in run.prom.query("step_runner_job_failures_total > 0", run.at)
        )
    }
    assert failures == {labels: float(n) for labels, n in run.tally.failures.items()}
    assert len(failures) >= 10, "the mix should produce most failure label sets"


def _boards() -> list[dict[str, Any]]:
    """The committed dashboard files, exactly what Grafana is given."""
    return [json.loads((ROOT / "dashboards" / name).read_text()) for name in sorted(DASHBOARDS)]


def _all_queries() -> list[tuple[str, str, bool]]:
    """(where, expr, exemplar) for every panel target of every dashboard."""
    found = []
    for board in _boards():
        for panel in board["panels"]:
            for t in panel["targets"]:
                where = f"{board['uid']} / {panel['title']} / {t['refId']}"
                found.append((where, t["expr"], bool(t["exemplar"])))
    return found


@pytest.mark.parametrize("selection", ["all", "selected"])
def test_every_dashboard_query_returns_data(run: Run, selection: str) -> None:
    """With "All" and with this runner and instance selected, as Grafana substitutes
    them: no error and a non-empty result for every target."""
    runner, instance = (
        (".*", ".*") if selection == "all" else (grafana_regex(RUNNER), grafana_regex(run.instance))
    )
    empty = []
    queries = _all_queries()
    for where, expr, _ in queries:
        if not run.prom.query(substitute(expr, runner, instance), run.at):
            empty.append(where)
    assert not empty, f"empty results: {empty}"
    assert len(queries) >= 40


def test_variables_list_the_runner_and_instance(run: Run) -> None:
    for board in _boards():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["runner"]["definition"] == (
            "label_values(step_runner_exporter_build_info, runner)"
        )
        assert run.prom.label_values("runner", "step_runner_exporter_build_info") == [RUNNER]
        match = f'step_runner_exporter_build_info{{runner=~"{RUNNER}"}}'
        assert run.prom.label_values("instance", match) == [run.instance]


def _query(title: str) -> str:
    """The (first) query of the panel with this title."""
    return next(expr for where, expr, _ in _all_queries() if where.split(" / ")[1] == title)


def _panel_value(run: Run, title: str) -> float | None:
    return run.prom.value(substitute(_query(title), ".*", ".*"), run.at)


def test_headline_stats_equal_the_tally(run: Run) -> None:
    total = run.total
    failed = run.tally.results["failed"]
    assert _panel_value(run, "Failure ratio") == pytest.approx(failed / total, rel=1e-9)
    for title, category in (
        ("Infrastructure failures", "infrastructure"),
        ("Script failures", "script"),
        ("Unknown failures", "unknown"),
    ):
        expected = run.category(category) / total
        assert _panel_value(run, title) == pytest.approx(expected, rel=1e-9), title
    remaining = 1 - run.category("infrastructure") / total / error_budget()
    assert _panel_value(run, "Error budget remaining (30d)") == pytest.approx(remaining, rel=1e-9)
    # Every call the simulated Runner made went through the sidecar and has ended.
    in_flight = run.prom.query(substitute(_query("RPCs in flight by method"), ".*", ".*"), run.at)
    assert in_flight and all(s["value"] == 0 for s in in_flight)
    calls = sum(run.tally.codes.values())
    assert run.prom.value("sum(grpc_server_handled_total)", run.at) == calls


def test_failure_breakdowns_equal_the_tally(run: Run) -> None:
    by_reason: Counter[str] = Counter()
    for labels, n in run.tally.failures.items():
        by_reason[labels[0]] += n
    bars = run.prom.query(substitute(_query("Failed jobs by failure_reason"), ".*", ".*"), run.at)
    assert {s["metric"]["failure_reason"]: s["value"] for s in bars if s["value"]} == {
        reason: float(n) for reason, n in by_reason.items()
    }
    rows = run.prom.query(substitute(_query("Top failure kinds"), ".*", ".*"), run.at)
    top = {
        (s["metric"]["failure_reason"], s["metric"]["source"], s["metric"]["kind"]): s["value"]
        for s in rows
    }
    counts = {labels[:3]: float(n) for labels, n in run.tally.failures.items()}
    assert len(top) == min(10, len(counts))
    assert all(counts[labels] == value for labels, value in top.items())
    left_out = [n for labels, n in counts.items() if labels not in top]
    assert not left_out or max(left_out) <= min(top.values())


def test_recording_rules_record_the_tally(run: Run) -> None:
    """The rule manager's own ratio series (what the alerts read) reach the tally's
    infrastructure ratio once it has evaluated after the last scrape."""
    expected = run.category("infrastructure") / run.total
    for window in ("5m", "30m", "1h", "6h"):
        name = rules.failure_ratio(window)
        expr = f'{name}{{category="infrastructure", runner="{RUNNER}"}}'

        def close(expr: str = expr) -> bool | None:
            value = run.prom.value(expr)
            return (value is not None and abs(value - expected) <= 1e-9 * expected) or None

        poll(close, 20, f"{name} == {expected}")


def test_every_rule_expression_evaluates(run: Run) -> None:
    exprs = [(rule.name, rule.expr) for group in rules.GROUPS for rule in group.rules]
    for name, expr in exprs:
        try:
            run.prom.query(expr, run.at)
        except PrometheusError as err:
            raise AssertionError(f"{name}: {err}") from err
    assert len(exprs) == len(rules.all_records()) + len(rules.all_alerts())
    groups = {g["name"]: g for g in run.prom.rule_groups()}
    assert set(groups) == {g.name for g in rules.GROUPS}
    for group in groups.values():
        for rule in group["rules"]:
            assert rule["health"] != "err", (rule["name"], rule.get("lastError"))


def test_alerts_fire_as_the_tally_predicts(run: Run) -> None:
    ratio = run.category("infrastructure") / run.total
    budget = error_budget()

    def guarded(hours: int) -> bool:
        # All jobs ran within the window: their average per hour over it.
        return run.total / hours >= MIN_JOBS_PER_HOUR

    expected = {"StepRunnerPanics", "StepRunnerSchemaDrift", "StepRunnerDecodeErrors"}
    if ratio > 14.4 * budget and guarded(1):
        expected.add("StepRunnerInfraErrorBudgetFastBurn")
    if ratio > 6 * budget and guarded(6):
        expected.add("StepRunnerInfraErrorBudgetSlowBurn")
    if run.category("unknown") / run.total > UNKNOWN_FAILURE_RATIO and guarded(1):
        expected.add("StepRunnerUnknownFailuresHigh")
    assert len(expected) == 6, "the workload should trigger every job alert"

    seen: set[str] = set()

    def active() -> list[dict[str, Any]] | None:
        alerts = run.prom.alerts()
        seen.clear()
        seen.update(a["labels"]["alertname"] for a in alerts)
        return alerts if expected <= seen else None

    try:
        alerts = poll(active, 30, f"alerts {sorted(expected)}")
    except AssertionError as err:
        raise AssertionError(f"{err}; active: {sorted(seen)}") from err
    names = {a["labels"]["alertname"] for a in alerts}
    # Whatever else is active must be justified by the workload, not by a broken rule.
    assert names - expected <= {"StepRunnerJobsEvicted"}, names
    for alert in alerts:
        assert alert["labels"]["runner"] == RUNNER
        annotations = alert["annotations"]
        assert "<no value>" not in str(annotations), alert
        assert annotations["runbook_url"].endswith(f"/{alert['labels']['alertname']}.md")
        assert f"var-runner={RUNNER}" in annotations["dashboard_url"]


def test_failure_exemplars_link_to_the_failed_jobs(run: Run) -> None:
    failures = {
        job.job_id: job.expected.failure
        for job in run.tally.jobs
        if job.expected.failure is not None
    }
    series = run.prom.query_exemplars(
        f'step_runner_job_failures_total{{runner="{RUNNER}"}}', run.started - 60, run.at + 1
    )
    exemplars = [(s["seriesLabels"], e) for s in series for e in s["exemplars"]]
    assert exemplars, "no exemplars stored: was OpenMetrics negotiated?"
    for labels, exemplar in exemplars:
        job_id = exemplar["labels"]["job_id"]
        want = failures[job_id]
        got = (labels["failure_reason"], labels["source"], labels["kind"], labels["category"])
        assert got == want, job_id
    # What Grafana asks for: the exemplars of each exemplar-enabled panel's query.
    for where, expr, exemplar in _all_queries():
        if exemplar:
            found = run.prom.query_exemplars(
                substitute(expr, ".*", ".*"), run.started - 60, run.at + 1
            )
            assert found, where
