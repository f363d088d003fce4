"""The monitoring bundle: generated files are current, dashboards are well-formed
Grafana JSON that only reads series that exist, every alert is complete and has a
runbook, and the Kubernetes packaging carries exactly the same content."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from exporter.events import DECODE_ERROR_MESSAGES
from exporter.metrics import INTERNAL_METRICS
from monitoring import build, grafana, rules
from monitoring.dashboards import DASHBOARDS
from monitoring.links import JOB_FAILURES, SIDECAR
from monitoring.metrics import EXPORTED_METRICS, known_series
from monitoring.promql import selected_metrics, variable_metrics

ROOT = build.ROOT
# The repository's copy of the contract (`make shared-copies` keeps it equal to
# ../shared/SPEC.md), so a fresh clone checks the metric table too.
SPEC = ROOT / "docs" / "SPEC.md"
DASHBOARD_FILES = sorted((ROOT / "dashboards").glob("*.json"))
RUNBOOKS = ROOT / "docs" / "runbooks"


def load(rel: str) -> Any:
    return yaml.safe_load((ROOT / rel).read_text())


# --- generated files -------------------------------------------------------------


def test_committed_outputs_are_current() -> None:
    assert build.stale(ROOT) == [], "run: python -m monitoring.build"


def test_check_fails_on_a_stale_missing_or_orphaned_file(tmp_path: Path) -> None:
    assert build.main(["--root", str(tmp_path)]) == 0
    assert build.main(["--check", "--root", str(tmp_path)]) == 0

    rule_file = tmp_path / build.RULES
    rule_file.write_text(rule_file.read_text().replace("for: 2m", "for: 1m"))
    (tmp_path / "dashboards" / "step-runner-sidecar.json").unlink()
    orphan = tmp_path / build.RULE_TESTS / "old_group.test.yml"
    orphan.write_text("tests: []\n")
    assert build.stale(tmp_path) == [
        f"{build.RULES}: stale",
        "dashboards/step-runner-sidecar.json: missing",
        f"{build.RULE_TESTS}/old_group.test.yml: no longer generated",
    ]
    assert build.main(["--check", "--root", str(tmp_path)]) == 1

    assert build.main(["--root", str(tmp_path)]) == 0
    assert build.stale(tmp_path) == []
    assert not orphan.exists()


def test_one_promtool_test_file_per_rule_group() -> None:
    files = {p.name for p in (ROOT / build.RULE_TESTS).glob("*.test.yml")}
    assert files == {f"{g.name}.test.yml" for g in rules.GROUPS}
    for group in rules.GROUPS:
        tests = load(f"{build.RULE_TESTS}/{group.name}.test.yml")
        tested = {
            t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
        }
        assert tested == {a.name for a in group.alerts}, group.name
        for alert in group.alerts:
            cases = [
                t
                for case in tests["tests"]
                for t in case.get("alert_rule_test", [])
                if t["alertname"] == alert.name
            ]
            assert any(t["exp_alerts"] for t in cases), f"{alert.name}: no case that fires"
            assert any(not t["exp_alerts"] for t in cases), f"{alert.name}: no case that must not"
        if group.records:
            assert any(case.get("promql_expr_test") for case in tests["tests"]), group.name


# --- rules -----------------------------------------------------------------------


def test_rule_names_follow_the_spec() -> None:
    for record in rules.all_records():
        assert re.fullmatch(r"step_runner:[a-z_]+:[a-z0-9_]+", record.name), record.name
    for alert in rules.all_alerts():
        assert re.fullmatch(r"StepRunner(?:[A-Z][a-z0-9]*)+", alert.name), alert.name
    names = [r.name for r in rules.all_alerts()] + [r.name for r in rules.all_records()]
    assert len(names) == len(set(names))


def test_every_alert_is_complete_and_has_a_runbook() -> None:
    uids = {JOB_FAILURES.uid, SIDECAR.uid}
    for alert in rules.all_alerts():
        rule = alert.to_rule()
        assert rule["labels"]["severity"] in ("critical", "warning")
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url", "dashboard_url"}
        assert annotations["runbook_url"].endswith(f"/docs/runbooks/{alert.name}.md")
        assert re.search(r"/d/([\w-]+)/", annotations["dashboard_url"])[1] in uids  # type: ignore[index]
        runbook = RUNBOOKS / f"{alert.name}.md"
        assert runbook.is_file(), f"missing {runbook.relative_to(ROOT)}"
        text = runbook.read_text()
        assert text.startswith(f"# {alert.name}\n"), runbook
    assert {p.stem for p in RUNBOOKS.glob("*.md")} == {a.name for a in rules.all_alerts()}


def test_runbook_queries_name_existing_series() -> None:
    allowed = known_series() | {r.name for r in rules.all_records()}
    for runbook in RUNBOOKS.glob("*.md"):
        for query in re.findall(r"```promql\n(.*?)```", runbook.read_text(), re.S):
            unknown = selected_metrics(query) - allowed
            assert not unknown, f"{runbook.name}: {unknown}"


def test_rules_read_only_existing_series() -> None:
    allowed = known_series() | {r.name for r in rules.all_records()}
    for group in rules.GROUPS:
        for rule in group.rules:
            assert selected_metrics(rule.expr) <= allowed, rule.name


def test_schema_drift_alerts_on_messages_the_observer_counts() -> None:
    # A renamed or misspelt label value would silence the alert for good.
    assert set(rules.CLASSIFYING_MESSAGES) <= set(DECODE_ERROR_MESSAGES)
    (drift,) = (a for a in rules.all_alerts() if a.name == "StepRunnerSchemaDrift")
    for message in rules.CLASSIFYING_MESSAGES:
        assert message in drift.expr


# --- dashboards ------------------------------------------------------------------


def test_dashboard_files_are_the_generated_ones() -> None:
    assert [p.name for p in DASHBOARD_FILES] == sorted(DASHBOARDS)


@pytest.fixture(params=[p.name for p in DASHBOARD_FILES])
def board(request: pytest.FixtureRequest) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "dashboards" / request.param).read_text())
    return data


def test_dashboard_header(board: dict[str, Any]) -> None:
    assert board["uid"] in (JOB_FAILURES.uid, SIDECAR.uid)
    assert len(board["uid"]) <= 40
    assert board["id"] is None
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "runner", "instance"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("runner", "instance"):
        assert variables[name]["datasource"] == grafana.DATASOURCE
        assert variables[name]["includeAll"] and variables[name]["multi"]
        assert variables[name]["definition"] == variables[name]["query"]["query"]


def test_panels_fit_the_grid_without_overlapping(board: dict[str, Any]) -> None:
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in grafana.PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["h"] >= 1, panel["title"]
        assert grid["x"] + grid["w"] <= grafana.GRID_WIDTH, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_every_query_uses_the_datasource_variable(board: dict[str, Any]) -> None:
    for panel in board["panels"]:
        assert panel["datasource"] == grafana.DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == grafana.DATASOURCE, panel["title"]
            assert "$runner" in target["expr"], panel["title"]


def test_rates_use_the_rate_interval(board: dict[str, Any]) -> None:
    for _, expr in grafana.iter_queries(board):
        for window in re.findall(r"\brate\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", expr


def test_queries_name_only_spec_metrics_and_recording_rules(board: dict[str, Any]) -> None:
    allowed = known_series() | {r.name for r in rules.all_records()}
    for where, expr in grafana.iter_queries(board):
        names = selected_metrics(expr)
        assert names, where
        assert names <= allowed, f"{where}: {names - allowed}"
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable_metrics(variable["definition"]) <= allowed


def test_failure_panels_show_exemplars(board: dict[str, Any]) -> None:
    """Every failure-rate graph links its spikes to job ids (ratios have no exemplars)."""
    graphs = 0
    for panel in board["panels"]:
        if panel["type"] != "timeseries" or panel["fieldConfig"]["defaults"]["unit"] == (
            "percentunit"
        ):
            continue
        for target in panel["targets"]:
            if "step_runner_job_failures_total" in target["expr"]:
                assert target["exemplar"] is True, panel["title"]
                graphs += 1
    assert graphs >= 4 or board["uid"] != JOB_FAILURES.uid


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (a) (rate(foo_total{b="c", d=~"$x"}[$__rate_interval]))\n'
        "/ ignoring (a) group_left\nbar:x:rate5m * 3600 >= 30 and on (job) up == 0\n"
        'or histogram_quantile(0.5, baz_bucket{le="+Inf"}) offset 5m'
    )
    assert selected_metrics(expr) == {"foo_total", "bar:x:rate5m", "up", "baz_bucket"}
    assert variable_metrics('label_values(m{runner=~"$runner"}, instance)') == {"m"}


# --- packaging -------------------------------------------------------------------


def test_prometheus_rule_carries_the_rule_file() -> None:
    resource = load("deploy/kubernetes/monitoring/prometheusrule.yaml")
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"] == load(build.RULES)


def test_dashboard_configmaps_carry_the_dashboards() -> None:
    text = (ROOT / "deploy/kubernetes/monitoring/dashboards-configmap.yaml").read_text()
    maps = list(yaml.safe_load_all(text))
    assert len(maps) == len(DASHBOARD_FILES)
    for configmap, path in zip(maps, DASHBOARD_FILES, strict=True):
        kubernetes_validate.validate(configmap, "1.30.0", strict=True)
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["data"] == {path.name: path.read_text()}


def test_provisioning_points_at_the_dashboards() -> None:
    provider = load("dashboards/provisioning/dashboards.yml")["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
    datasource = load("dashboards/provisioning/datasource.yml")["datasources"][0]
    assert datasource["type"] == "prometheus"


# --- metric names ----------------------------------------------------------------


def test_metric_list_matches_the_spec() -> None:
    text = SPEC.read_text()
    section_4 = text[text.index("## 4.") : text.index("## 5.")]
    tables = set(re.findall(r"^\| ([a-z][a-z0-9_]+) \|", section_4, re.M)) - {"name"}
    assert tables <= EXPORTED_METRICS
    # Sections 7 and 8 add metrics of the docker tap and of the sidecar's limits.
    named = set(re.findall(r"\b((?:step_runner|grpc_server)_[a-z0-9_]+)", text))
    assert named >= EXPORTED_METRICS - {spec.name for spec in INTERNAL_METRICS}
