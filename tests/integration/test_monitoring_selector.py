"""The monitoring bundle as a mixin: one change to monitoring.settings.SIDECAR_SELECTOR
(a scrape job named differently, a cluster label) regenerates every rule, rule test,
dashboard and manifest, every query selecting a raw series carries the new matchers,
and the regenerated rule tests still pass in promtool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitoring import build, grafana, rules
from monitoring.metrics import known_series
from monitoring.promql import selections

from .prometheus import PROMTOOL

pytestmark = pytest.mark.integration

SELECTOR = {"job": "ci-sidecars", "cluster": "eu-1"}
MATCHERS = ('job="ci-sidecars"', 'cluster="eu-1"')


def regenerate(root: Path, selector: dict[str, str]) -> None:
    """`python -m monitoring.build` after one edit of monitoring/settings.py."""
    code = (
        "import sys\n"
        "from monitoring import settings\n"
        f"settings.SIDECAR_SELECTOR = {selector!r}\n"
        "from monitoring import build\n"
        "sys.exit(build.main(['--root', sys.argv[1]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(root)],
        cwd=build.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def rule_queries(root: Path) -> list[tuple[str, str]]:
    rule_file = yaml.safe_load((root / build.RULES).read_text())
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in rule_file["groups"]
        for rule in group["rules"]
    ]


def dashboard_queries(root: Path) -> list[tuple[str, str]]:
    queries = []
    for path in sorted((root / "dashboards").glob("*.json")):
        board: dict[str, Any] = json.loads(path.read_text())
        queries += list(grafana.iter_queries(board))
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                # label_values(SELECTOR, label): the selector is the query.
                definition = variable["definition"]
                selector = definition[len("label_values(") : definition.rindex(",")]
                queries.append((f"{path.name} / ${variable['name']}", selector))
    return queries


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    regenerate(root, SELECTOR)
    return root


def raw_selections(queries: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    raw = known_series()
    return [
        (where, metric, matchers)
        for where, expr in queries
        for metric, matchers in selections(expr)
        if metric in raw
    ]


def test_every_query_of_a_raw_series_carries_the_selector(regenerated: Path) -> None:
    found = raw_selections(rule_queries(regenerated) + dashboard_queries(regenerated))
    # Rules, panels and variables: enough that a query the walk missed would show.
    assert len({where for where, _, _ in found}) > 40
    for where, metric, matchers in found:
        for matcher in MATCHERS:
            assert matcher in matchers, f"{where}: {metric}{{{matchers}}}"


def test_the_default_selects_by_name_alone(tmp_path: Path) -> None:
    regenerate(tmp_path, {})
    assert build.stale(tmp_path) == []  # the committed files are the default's
    for where, metric, matchers in raw_selections(rule_queries(tmp_path)):
        assert "job=" not in matchers, f"{where}: {metric}{{{matchers}}}"


def test_manifests_carry_the_regenerated_rules(regenerated: Path) -> None:
    manifests = regenerated / "deploy/kubernetes/monitoring"
    resource = yaml.safe_load((manifests / "prometheusrule.yaml").read_text())
    rule_file = yaml.safe_load((regenerated / build.RULES).read_text())
    assert resource["spec"] == rule_file
    configmaps = (manifests / "dashboards-configmap.yaml").read_text()
    assert 'job=\\"ci-sidecars\\"' in configmaps


def test_the_regenerated_rule_tests_pass(regenerated: Path) -> None:
    tests = sorted((regenerated / build.RULE_TESTS).glob("*.test.yml"))
    assert len(tests) == len(rules.GROUPS)
    done = subprocess.run(
        [PROMTOOL, "test", "rules", *map(str, tests)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
