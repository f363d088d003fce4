"""The processes a benchmark runs: the Go stand-ins, the sidecar (or the plain splice)
and what /proc says about them."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.build import REPO, GoBinaries
from exporter import native

CLIENT_TIMEOUT_S = 900.0
START_TIMEOUT_S = 30.0


class BenchError(RuntimeError):
    pass


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.002)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _unix_connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def http_get(address: str, path: str, accept: str | None = None) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def is_ready(address: str) -> bool:
    try:
        return http_get(address, "/-/ready")[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def log_tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen[bytes], web: str | None = None) -> None:
    """SIGTERM, then the one scrape the sidecar waits for before it exits, then SIGKILL
    if it still runs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if web is not None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                http_get(web, "/metrics")
        try:
            proc.wait(timeout=0.2)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def start_go_server(binaries: GoBinaries, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(binaries.server), "-socket", str(sock)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until(
            lambda: proc.poll() is not None or _unix_connectable(sock),
            START_TIMEOUT_S,
            "the Go step-runner stand-in",
        )
    except BenchError:
        stop(proc)
        raise
    if proc.poll() is not None:
        raise BenchError(f"the Go step-runner stand-in exited:\n{log_tail(log)}")
    return proc


def sidecar_command() -> list[str]:
    # The console script of the interpreter running the benchmark (the project venv).
    script = Path(sys.executable).parent / "step-runner-exporter"
    if script.exists():
        return [str(script)]
    found = shutil.which("step-runner-exporter")
    if found:
        return [found]
    return [sys.executable, "-m", "exporter.cli"]


# The mix's `deadline` job gives Status a 50 ms deadline (stepclient's deadlineTimeout).
# The sidecar times a call from when it *reads* the request HEADERS; on a machine loaded
# far beyond its cores its loop can read them tens of ms late while the client's timer
# already runs, and the reset then looks early, a cancel. Real Runner deadlines are
# minutes, where the default 20 ms tolerance is ample; here it is widened to just under
# that deadline so the accounting check measures the sidecar, not the scheduler.
BENCH_SIDECAR_CONFIG = "observer:\n  deadline_tolerance: 45ms\n"


# The sidecar on its pure-Python observer core, for comparison with the compiled one
# (`sidecar`, which is whatever this checkout built: see its build_info).
SIDECARS = ("sidecar", "sidecar-pure")


def proxy_command(kind: str) -> list[str]:
    if kind in SIDECARS:
        return sidecar_command()
    if kind == "splice":
        return [sys.executable, "-m", "benchmarks.splice"]
    raise ValueError(f"unknown proxy kind {kind!r}")


@dataclass
class Proxy:
    """A sidecar (or the plain splice) listening on `socket` in front of step-runner."""

    kind: str
    proc: subprocess.Popen[bytes]
    socket: Path
    web: str
    log: Path
    started: float  # time.monotonic() just before the process was started


def launch_proxy(
    kind: str, workdir: Path, upstream: Path, tag: str, extra: Sequence[str] = ()
) -> Proxy:
    """Start without waiting: the caller decides how to wait (ready timing needs it).
    `extra`: more `serve` flags, such as `--tap=docker`."""
    sock = workdir / f"{tag}.sock"
    web = f"127.0.0.1:{free_port()}"
    log = workdir / f"{tag}.log"
    cmd = [
        *proxy_command(kind),
        "serve",
        f"--listen=unix://{sock}",
        f"--upstream=unix://{upstream}",
        f"--web.listen-address={web}",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if kind in SIDECARS:
        config = workdir / f"{tag}.yml"
        config.write_text(BENCH_SIDECAR_CONFIG)
        cmd.append(f"--config.file={config}")
        if kind == "sidecar-pure":
            env[native.PURE_ENV] = "1"
    with log.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    return Proxy(kind, proc, sock, web, log, started)


def wait_ready(proxy: Proxy) -> float:
    """Seconds from process start to /-/ready answering 200."""
    wait_until(
        lambda: proxy.proc.poll() is not None or is_ready(proxy.web),
        START_TIMEOUT_S,
        f"{proxy.kind} /-/ready",
    )
    elapsed = time.monotonic() - proxy.started
    if proxy.proc.poll() is not None:
        raise BenchError(
            f"{proxy.kind} exited with {proxy.proc.returncode}:\n{log_tail(proxy.log)}"
        )
    return elapsed


def start_proxy(
    kind: str, workdir: Path, upstream: Path, tag: str, extra: Sequence[str] = ()
) -> Proxy:
    proxy = launch_proxy(kind, workdir, upstream, tag, extra)
    try:
        wait_ready(proxy)
    except BenchError:
        stop(proxy.proc, proxy.web)
        raise
    return proxy


def run_client(binaries: GoBinaries, **flags: object) -> dict[str, Any]:
    """Run the Go client once; its flags as keyword arguments (log_bytes= for -log-bytes),
    with the route among them (socket=, or docker= and the exec's flags)."""
    args = [f"-{k.replace('_', '-')}={v}" for k, v in flags.items()]
    try:
        done = subprocess.run(
            [str(binaries.client), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"stepclient {' '.join(args)} timed out") from exc
    if done.returncode != 0:
        raise BenchError(f"stepclient {' '.join(args)} failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    if result.get("errors"):
        raise BenchError(
            f"stepclient {' '.join(args)}: {result['errors']} jobs failed unexpectedly, "
            f"first: {result.get('first_error')}"
        )
    return result


# /proc accounting covers the sidecar's whole process tree, in case it ever forks workers.


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its descendants."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def rss_bytes(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total
