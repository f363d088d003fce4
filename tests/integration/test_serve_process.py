"""`step-runner-exporter serve` and `check-config` run as separate processes,
exactly as a user would run them."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.simulator import run_jobs

from .harness import run_async, short_tmpdir, simulated_step_runner_thread, wait_until
from .sidecar import http_get

pytestmark = pytest.mark.integration

COMMAND = str(Path(sys.executable).with_name("step-runner-exporter"))


class LogReader:
    """Collects a process's stderr lines on a thread, so waiting never blocks on a pipe."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)

    def find(self, pattern: str) -> re.Match[str] | None:
        for line in list(self.lines):
            if match := re.search(pattern, line):
                return match
        return None


def test_serve_as_a_process_counts_jobs_and_stops_on_sigterm() -> None:
    with short_tmpdir() as d, simulated_step_runner_thread() as (sim, _loop):
        config = Path(d, "config.yml")
        config.write_text(
            f"listen: unix://{d}/sidecar.sock\n"
            f"upstream: {sim.listen_address}\n"
            "labels: {runner: proc-test}\n"
            "shutdown: {grace_period: 5s, final_scrape_wait: 200ms}\n"
        )
        proc = subprocess.Popen(
            [COMMAND, "serve", "--config.file", str(config), "--web.listen-address", "127.0.0.1:0"],
            stderr=subprocess.PIPE,
            text=True,
        )
        logs = LogReader(proc)
        try:
            wait_until(lambda: logs.find(r"web=127\.0\.0\.1:(\d+)") is not None, what="listening")
            match = logs.find(r"web=127\.0\.0\.1:(\d+)")
            assert match is not None
            base = f"http://127.0.0.1:{match.group(1)}"
            wait_until(lambda: http_get(f"{base}/-/ready")[0] == 200, what="ready")

            tally = run_async(run_jobs(f"unix://{d}/sidecar.sock", 60, concurrency=8, seed=3), 60)
            assert tally.mismatches == []

            def exported() -> dict[str, float]:
                body = http_get(f"{base}/metrics")[2].decode()
                families = {f.name: f for f in text_string_to_metric_families(body)}
                return {
                    s.labels["result"]: s.value
                    for s in families["step_runner_jobs"].samples
                    if s.name == "step_runner_jobs_total" and s.labels["runner"] == "proc-test"
                }

            want = {r: float(tally.results.get(r, 0)) for r in ("success", "failed", "cancelled")}
            wait_until(lambda: exported() == want, what="counters equal to the tally")
            assert logs.find(r'msg="job classified" job_id=\S+ result=') is not None

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert not Path(d, "sidecar.sock").exists()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_serve_refuses_to_replace_a_regular_file() -> None:
    with short_tmpdir() as d:
        victim = Path(d, "precious")
        victim.write_text("data")
        started = time.monotonic()
        result = subprocess.run(
            [COMMAND, "serve", "--listen", f"unix://{victim}", "--upstream", f"unix://{d}/up.sock",
             "--web.listen-address", "127.0.0.1:0"],
            check=False, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 1
        assert "not a socket; refusing to replace it" in result.stderr
        assert victim.read_text() == "data"
        assert time.monotonic() - started < 30


def test_check_config_reports_every_problem_with_its_location() -> None:
    with short_tmpdir() as d:
        bad = Path(d, "bad.yml")
        bad.write_text(
            "listen: unix:///run/sr.sock\n"
            "upstream: localhost\n"
            "web:\n"
            "  listen_address: nope\n"
            "labels:\n"
            "  __bad: x\n"
            "surprise: 1\n"
        )
        result = subprocess.run(
            [COMMAND, "check-config", "--config.file", str(bad)],
            check=False,
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0
        err = result.stderr
        for line, key in (
            (2, "upstream"),
            (4, "web.listen_address"),
            (6, "labels"),
            (7, "surprise"),
        ):
            assert re.search(rf"bad\.yml:{line}:.*{re.escape(key)}", err), (line, key, err)

        good = Path(__file__).parents[2] / "examples" / "config.yml"
        result = subprocess.run(
            [COMMAND, "check-config", "--config.file", str(good)],
            check=False,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert "OK" in result.stdout
