"""A real Prometheus server (Debian's /usr/bin/prometheus) for integration tests:
127.0.0.1 on a port it picks itself (port 0; it logs the one it bound), config and TSDB
in a temp dir, exemplar storage on, a short scrape interval, always stopped. Plus small
helpers for its HTTP API."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import harness
from .harness import ProcessLog, child_process

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
JOB = "step-runner-exporter"
T = TypeVar("T")


class PrometheusError(AssertionError):
    """The HTTP API answered with an error (a bad query, an evaluation failure)."""


def poll(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """harness.poll at a pace that leaves Prometheus' HTTP API alone."""
    return harness.poll(probe, timeout, what, interval=0.05)


@dataclass
class Prometheus:
    url: str
    directory: Path
    logs: ProcessLog
    targets: tuple[str, ...]

    def log(self) -> str:
        return self.logs.text()

    def get(self, path: str, **params: str) -> Any:
        """GET an /api/v1 endpoint; the `data` of a success, else PrometheusError."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's samples as [{"metric": {...}, "value": float}], a scalar as
        one sample without labels."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": float(data["result"][1])}]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr}: a {data['resultType']}, not an instant vector")
        return [{"metric": s["metric"], "value": float(s["value"][1])} for s in data["result"]]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single sample's value, or None for an empty result."""
        samples = self.query(expr, at)
        if len(samples) > 1:
            raise AssertionError(f"{expr}: {len(samples)} samples, wanted one")
        return samples[0]["value"] if samples else None

    def query_exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        """[{"seriesLabels": {...}, "exemplars": [{"labels", "value", "timestamp"}]}]"""
        data = self.get("query_exemplars", query=expr, start=f"{start:.3f}", end=f"{end:.3f}")
        return list(data)

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self.get(f"label/{label}/values", **{"match[]": match}))

    def rule_groups(self) -> list[dict[str, Any]]:
        return list(self.get("rules")["groups"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.get("alerts")["alerts"])

    def wait_scraped(self, times: int, timeout: float = 30.0, job: str = JOB) -> float:
        """Wait until every target of `job` has been scraped successfully `times` times;
        return the timestamp of the latest scrape."""

        def probe() -> float | None:
            counts = self.query(f'sum_over_time(up{{job="{job}"}}[1h])')
            if len(counts) < len(self.targets) or min(s["value"] for s in counts) < times:
                return None
            return self.last_scrape(job)

        return poll(probe, timeout, f"{times} scrapes of every {job} target")

    def last_scrape(self, job: str = JOB) -> float:
        """The timestamp of the latest scrape of `job`: evaluate at it and every range
        ends on a sample, so increase() does not extrapolate past it."""
        value = self.value(f'max(timestamp(up{{job="{job}"}}))')
        if value is None:
            raise AssertionError(f"no scrape of {job} yet")
        return value


def _config(targets: Sequence[str], rule_files: Sequence[Path], interval: str) -> dict[str, Any]:
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(p.resolve()) for p in rule_files],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
    }


@contextlib.contextmanager
def running_prometheus(
    targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    *,
    interval: str = "1s",
    timeout: float = 30.0,
) -> Iterator[Prometheus]:
    """A ready Prometheus scraping `targets` (host:port) as job "step-runner-exporter"
    every `interval`, evaluating `rule_files` as often; stopped and removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix="srx-prom-", dir="/tmp"))
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump(_config(targets, rule_files, interval)))
    argv = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        "--web.listen-address=127.0.0.1:0",
        "--enable-feature=exemplar-storage",
        "--storage.tsdb.retention.time=1d",
        # info, for the line that says which port it bound.
        "--log.level=info",
    ]
    try:
        with child_process(argv, _ready, what="prometheus", timeout=timeout) as (_, log, url):
            yield Prometheus(url, directory, log, tuple(targets))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _ready(log: ProcessLog) -> str | None:
    """Prometheus' URL once it bound its port and answers /-/ready."""
    listening = log.record("Listening on")
    if listening is None:
        return None
    url = f"http://{listening['address']}"
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return url if response.status == 200 else None
    except OSError:
        return None
