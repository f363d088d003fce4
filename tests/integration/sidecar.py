"""The real sidecar, in-process on a short temp unix socket, always stopped."""

from __future__ import annotations

import contextlib
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from exporter import demo
from exporter.app import Sidecar
from exporter.config import parse_config
from exporter.simulator import Tally

from .harness import short_tmpdir


@contextlib.asynccontextmanager
async def running_sidecar(upstream: str, **config: Any) -> AsyncIterator[Sidecar]:
    """A started Sidecar in front of `upstream`; `target(sidecar)` is its gRPC target."""
    with short_tmpdir("srx-sc-") as directory:
        raw: dict[str, Any] = {
            "listen": f"unix://{directory}/sidecar.sock",
            "upstream": upstream,
            "web": {"listen_address": "127.0.0.1:0"},
            "shutdown": {"grace_period": 0, "final_scrape_wait": 0},
        }
        raw.update(config)
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


def http_get(url: str, accept: str = "") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


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
