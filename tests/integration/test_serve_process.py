"""`step-runner-exporter serve` and `check-config` run as separate processes,
exactly as a user would run them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from exporter.simulator import run_jobs

from .harness import run_async, short_tmpdir, wait_until
from .sidecar import COMMAND, ServeProcess, http_get, jobs_exported

pytestmark = pytest.mark.integration


@pytest.mark.sidecar(
    labels={"runner": "proc-test"}, shutdown={"grace_period": "5s", "final_scrape_wait": "200ms"}
)
def test_serve_as_a_process_counts_jobs_and_stops_on_sigterm(
    sidecar_process: ServeProcess,
) -> None:
    assert sidecar_process.web.startswith("127.0.0.1:") and not sidecar_process.web.endswith(":0")
    assert http_get(sidecar_process.url("/-/ready"))[0] == 200

    tally = run_async(run_jobs(sidecar_process.listen, 60, concurrency=8, seed=3), 60)
    assert tally.mismatches == []

    want = {r: float(tally.results.get(r, 0)) for r in ("success", "failed", "cancelled")}
    wait_until(
        lambda: jobs_exported(sidecar_process, runner="proc-test") == want,
        what="counters equal to the tally",
    )
    assert sidecar_process.log.find(r'msg="job classified" job_id=\S+ result=') is not None

    sidecar_process.terminate()
    assert sidecar_process.process.wait(timeout=15) == 0
    assert not sidecar_process.socket_path.exists()


def test_serve_refuses_to_replace_a_regular_file() -> None:
    with short_tmpdir() as d:
        victim = Path(d, "precious")
        victim.write_text("data")
        result = subprocess.run(
            [COMMAND, "serve", "--listen", f"unix://{victim}", "--upstream", f"unix://{d}/up.sock",
             "--web.listen-address", "127.0.0.1:0"],
            check=False, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 1
        assert "not a socket; refusing to replace it" in result.stderr
        assert victim.read_text() == "data"


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
