"""The real sidecar, always stopped: in-process on a short temp unix socket, or as a
`step-runner-exporter serve` process whose web endpoint binds 127.0.0.1:0 and reports
the port it got in its "listening" log line."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter import demo
from exporter.app import Sidecar
from exporter.config import parse_config
from exporter.simulator import Tally

from .harness import ProcessLog, child_process, short_tmpdir, wait_until

COMMAND = str(Path(sys.executable).with_name("step-runner-exporter"))
# The port is the process's own pick, read back from its log: never one chosen here.
ANY_PORT = "127.0.0.1:0"


def sidecar_config(directory: str, upstream: str, **config: Any) -> dict[str, Any]:
    """A test sidecar's configuration: listening in `directory`, web on any port, no
    shutdown waits; `config` overrides top-level keys."""
    raw: dict[str, Any] = {
        "listen": f"unix://{directory}/sidecar.sock",
        "upstream": upstream,
        "web": {"listen_address": ANY_PORT},
        "shutdown": {"grace_period": 0, "final_scrape_wait": 0},
    }
    raw.update(config)
    return raw


@contextlib.asynccontextmanager
async def running_sidecar(upstream: str, **config: Any) -> AsyncIterator[Sidecar]:
    """A started Sidecar in front of `upstream`; `target(sidecar)` is its gRPC target."""
    with short_tmpdir("srx-sc-") as directory:
        raw = sidecar_config(directory, upstream, **config)
        sidecar = Sidecar(parse_config(raw, source="<test>"), process_metrics=False)
        await sidecar.start()
        try:
            yield sidecar
        finally:
            await sidecar.stop(grace=0, final_scrape_wait=0)


def target(sidecar: Sidecar) -> str:
    assert sidecar.splice is not None
    return str(sidecar.splice.listen)


def web_url(sidecar: Sidecar, path: str = "/metrics") -> str:
    assert sidecar.web is not None
    return f"http://127.0.0.1:{sidecar.web.port}{path}"


# -- as a process ------------------------------------------------------------------------------


@dataclass
class ServeProcess:
    """A running `serve`: where it listens, as its own "listening" line says."""

    process: subprocess.Popen[bytes]
    log: ProcessLog
    listen: str  # the gRPC target, unix:///path or host:port
    web: str  # host:port of the web endpoint

    def url(self, path: str = "/metrics", scheme: str = "http") -> str:
        return f"{scheme}://{self.web}{path}"

    @property
    def socket_path(self) -> Path:
        assert self.listen.startswith("unix://"), self.listen
        return Path(self.listen.removeprefix("unix://"))

    def terminate(self) -> None:
        """SIGTERM, as systemd and the kubelet stop it."""
        self.process.send_signal(signal.SIGTERM)


def serve_argv(*args: str, config: Path | None = None, web: str | None = ANY_PORT) -> list[str]:
    """The `serve` command line: the config file, then `args`, then the web address
    (a flag, so it wins over the file's); web=None keeps the file's or the default."""
    argv = [COMMAND, "serve"]
    if config is not None:
        argv += ["--config.file", str(config)]
    argv += args
    if web is not None:
        argv += ["--web.listen-address", web]
    return argv


@contextlib.contextmanager
def serve_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    log_file: Path | None = None,
) -> Iterator[ServeProcess]:
    """A `serve` process started with `argv` (see serve_argv), ready once it has logged
    "listening" (the last step of its start, at info level, text or JSON), always
    stopped. Its log: `.log.lines`, `.log.find()`, `.log.record()`."""
    with child_process(
        argv, _listening, what="the sidecar", env=env, timeout=timeout, log_file=log_file
    ) as (process, log, fields):
        yield ServeProcess(process, log, str(fields["listen"]), str(fields["web"]))


def _listening(log: ProcessLog) -> dict[str, Any] | None:
    return log.record("listening")


@contextlib.contextmanager
def running_sidecar_process(
    upstream: str, *args: str, env: Mapping[str, str] | None = None, **config: Any
) -> Iterator[ServeProcess]:
    """`serve` in front of `upstream`, configured by a file from sidecar_config(**config)
    and the flags `args`."""
    with short_tmpdir("srx-sp-") as directory:
        path = Path(directory, "config.yml")
        path.write_text(yaml.safe_dump(sidecar_config(directory, upstream, **config)))
        with serve_process(serve_argv(*args, config=path), env=env) as sidecar:
            yield sidecar


@contextlib.contextmanager
def docker_tap_process(upstream: str, config: str, *args: str) -> Iterator[ServeProcess]:
    """`serve --tap docker` in front of the daemon at `upstream` (its -H host) on a
    unix socket of its own, configured by the YAML text `config` and the flags `args`;
    ready once /-/ready says so, always stopped. The docker tests' one way to start it."""
    with short_tmpdir("srx-tap-") as directory:
        path = Path(directory, "config.yml")
        path.write_text(config)
        listen = f"unix://{directory}/tap.sock"
        argv = serve_argv(
            "--tap", "docker", "--listen", listen, "--upstream", upstream, *args, config=path
        )
        with serve_process(argv) as tap:
            ready = tap.url("/-/ready")
            wait_until(lambda: http_get(ready)[0] == 200, 30, "the tap ready")
            yield tap


# -- reading what it exported ------------------------------------------------------------------


def http_get(url: str, accept: str = "") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def families(process: ServeProcess) -> dict[str, Any]:
    """The metric families a `serve` process exports now, by name."""
    body = http_get(process.url())[2].decode()
    return {f.name: f for f in text_string_to_metric_families(body)}


def jobs_exported(process: ServeProcess, **labels: str) -> dict[str, float]:
    """step_runner_jobs_total by result, of the series that carry `labels`."""
    return {
        s.labels["result"]: s.value
        for s in families(process)["step_runner_jobs"].samples
        if s.name == "step_runner_jobs_total" and labels.items() <= s.labels.items()
    }


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def counted(sidecar: Sidecar) -> tuple[dict[str, int], Counter[tuple[str, ...]]]:
    """Jobs by result and failures by their labels, as the sidecar exported them."""
    return demo.counted(sidecar.registry)


def expected(tally: Tally) -> tuple[dict[str, int], Counter[tuple[str, ...]]]:
    """The same, from the simulated Runner's own tally."""
    return demo.tally_counts(tally)
