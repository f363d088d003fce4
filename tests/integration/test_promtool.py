"""promtool (Debian's prometheus package, 2.42) accepts every rule file, and every
group's unit tests pass: the rules behave as their tests say, on that Prometheus."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitoring import build

from .prometheus import PROMTOOL

pytestmark = pytest.mark.integration

ROOT = build.ROOT
RULE_FILE = ROOT / build.RULES
TEST_FILES = sorted((ROOT / build.RULE_TESTS).glob("*.test.yml"))


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def test_check_rules() -> None:
    done = promtool("check", "rules", RULE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_check_rules_of_the_prometheus_rule(tmp_path: Path) -> None:
    """The PrometheusRule's spec is a rule file too."""
    resource = yaml.safe_load(
        (ROOT / "deploy/kubernetes/monitoring/prometheusrule.yaml").read_text()
    )
    spec = tmp_path / "spec.rules.yml"
    spec.write_text(yaml.safe_dump(resource["spec"]))
    done = promtool("check", "rules", spec)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name.removesuffix(".test.yml"))
def test_rule_unit_tests(test_file: Path) -> None:
    done = promtool("test", "rules", test_file)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_unit_tests_catch_a_missing_traffic_guard(tmp_path: Path) -> None:
    """The tests have teeth: without the minimum-traffic guard, a case that must not
    fire does."""
    (tmp_path / "tests").mkdir()
    rule_file = RULE_FILE.read_text()
    assert "* 3600 >= 30" in rule_file
    (tmp_path / RULE_FILE.name).write_text(rule_file.replace("* 3600 >= 30", "* 3600 >= 0"))
    test_file = ROOT / build.RULE_TESTS / "step_runner_job_failure_alerts.test.yml"
    shutil.copy(test_file, tmp_path / "tests")
    done = promtool("test", "rules", tmp_path / "tests" / test_file.name)
    assert done.returncode != 0
    assert "below the traffic guard" in done.stdout + done.stderr
