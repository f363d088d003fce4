"""Helpers to write promtool rule unit tests as data (rules/tests/<group>.test.yml)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from exporter.classifier import Failure

from .rules import Alert
from .settings import SIDECAR_SELECTOR

# The simulated sidecars carry SIDECAR_SELECTOR's labels, so the rules select them.
JOB = SIDECAR_SELECTOR.get("job", "step-runner-exporter")

TestCase = dict[str, Any]


def target(runner: str, instance: str | None = None) -> dict[str, str]:
    """A sidecar's target labels plus its static `runner` label."""
    labels = {"job": JOB, "instance": instance or f"{runner}:9854", "runner": runner}
    return {**labels, **SIDECAR_SELECTOR}


def selector(name: str, labels: Mapping[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}"


def series(name: str, values: str, labels: Mapping[str, str]) -> dict[str, str]:
    return {"series": selector(name, labels), "values": values}


def jobs(values: str, result: str, at: Mapping[str, str]) -> dict[str, str]:
    return series("step_runner_jobs_total", values, {**at, "result": result})


def failures(values: str, failure: Failure, at: Mapping[str, str]) -> dict[str, str]:
    return series("step_runner_job_failures_total", values, {**at, **failure.labels()})


def traffic(
    at: Mapping[str, str], per_step: int, failing: Failure, failed_per_step: int, steps: int
) -> list[dict[str, str]]:
    """Steady traffic: `per_step` jobs per input step, `failed_per_step` of them failing."""
    ok = per_step - failed_per_step
    return [
        jobs(f"0+{ok}x{steps}", "success", at),
        jobs(f"0+{failed_per_step}x{steps}", "failed", at),
        failures(f"0+{failed_per_step}x{steps}", failing, at),
    ]


_LABEL = re.compile(r"\{\{ \$labels\.(\w+) \}\}")
_VALUE = re.compile(r"\{\{ \$value(?: \| \w+)? \}\}")


def render(template: str, labels: Mapping[str, str], value: str) -> str:
    """The alert template as Prometheus should render it; `value` is the formatted
    $value we expect, so the test checks the humanize functions too."""
    text = _LABEL.sub(lambda m: labels[m.group(1)], template)
    return _VALUE.sub(value, text)


def fired(alert: Alert, labels: Mapping[str, str], value: str = "") -> dict[str, Any]:
    rule = alert.to_rule()
    return {
        "exp_labels": {**labels, **rule["labels"]},
        "exp_annotations": {
            key: render(text, labels, value) for key, text in rule["annotations"].items()
        },
    }


def alert_test(eval_time: str, alert: Alert, *expected: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": eval_time, "alertname": alert.name, "exp_alerts": list(expected)}


def expr_test(eval_time: str, expr: str, *samples: tuple[str, float]) -> dict[str, Any]:
    return {
        "expr": expr,
        "eval_time": eval_time,
        "exp_samples": [{"labels": labels, "value": value} for labels, value in samples],
    }


def test_file(cases: list[TestCase], evaluation_interval: str = "1m") -> dict[str, Any]:
    return {
        "rule_files": ["../step-runner.rules.yml"],
        "evaluation_interval": evaluation_interval,
        "tests": cases,
    }
