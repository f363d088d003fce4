"""A real Prometheus server (Debian's /usr/bin/prometheus) for integration tests:
127.0.0.1 on a free port, config and TSDB in a temp dir, exemplar storage on, a short
scrape interval, always stopped. Plus small helpers for its HTTP API."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .harness import stop_process

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
JOB = "step-runner-exporter"
T = TypeVar("T")


class PrometheusError(AssertionError):
    """The HTTP API answered with an error (a bad query, an evaluation failure)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `probe` until it returns something other than None; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Prometheus:
    url: str
    directory: Path
    process: subprocess.Popen[bytes]
    targets: tuple[str, ...]

    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")

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
    port = free_port()
    with (directory / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--enable-feature=exemplar-storage",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", directory, process, tuple(targets))
    try:
        poll(lambda: _ready(server), timeout, "Prometheus /-/ready")
        yield server
    finally:
        stop_process(process)
        shutil.rmtree(directory, ignore_errors=True)


def _ready(server: Prometheus) -> bool | None:
    if server.process.poll() is not None:
        raise AssertionError(f"prometheus exited {server.process.returncode}:\n{server.log()}")
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
            return True if response.status == 200 else None
    except OSError:
        return None
