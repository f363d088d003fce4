"""The deployment files checked with the real tools, and the sidecar started exactly as
the systemd unit and the container image start it.

- promtool on the example Prometheus configs, with the rules and targets laid out as
  Compose mounts them;
- systemd-analyze verify and security on the units (skipped where not installed);
- `kubectl kustomize`, where installed, against the hand-assembled build the unit tests
  validate;
- the Dockerfile's install command in a fresh virtualenv;
- smoke tests: the unit's ExecStart and the image's ENTRYPOINT + CMD, with the config from
  deploy/, in front of a simulated step-runner, scraped over HTTP.

The smoke tests add only --listen, --upstream and --web.listen-address (SPEC section 6:
flags override the file) so the sockets live in a temp dir and the port is free; every
other argument is the deployment file's own.
"""

from __future__ import annotations

import ast
import contextlib
import grp
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import load_config
from exporter.simulator import run_jobs
from tests.integration.docker_daemon import DockerDaemon, docker_daemon, unavailable
from tests.integration.harness import short_tmpdir, simulated_step_runner_thread, wait_until
from tests.integration.sidecar import ANY_PORT, ServeProcess, serve_process
from tests.unit.test_deploy_files import (
    CONFIG_IN_IMAGE,
    CONFIG_ON_VM,
    DEPLOY,
    DOCKER_CONFIG_ON_HOST,
    DOCKER_GROUP,
    DOCKER_LAYOUTS,
    DOCKER_UNIT,
    IN_PLACE_LAYOUT,
    KUSTOMIZE_DIR,
    REPO,
    UNIT_FILE,
    DockerLayout,
    bind_mounts,
    compose,
    console_script,
    copy_sources,
    docker_exec_start,
    docker_unit_of,
    dockerfile_stages,
    effective_directives,
    exec_start,
    final_stage,
    image_command,
    image_config_source,
    kustomization_needs_monitoring,
    kustomize_build,
    last,
    memory_limit,
    podmonitor,
    unit_directives,
    venv_dir_of_build,
    words,
)

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 20.0
# shutdown.grace_period + final_scrape_wait is the worst case; a scrape ends it sooner.
STOP_TIMEOUT = 50.0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this machine")
    return path


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


# --- promtool --------------------------------------------------------------------------


def materialize(service: str, root: Path) -> None:
    """Copy a Compose service's bind mounts to where the container sees them, under root."""
    for source, target in bind_mounts(service):
        destination = root / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination)
        else:
            shutil.copy(source, destination)


def test_promtool_accepts_the_compose_prometheus_with_its_rules_and_targets(
    tmp_path: Path,
) -> None:
    promtool = tool("promtool")
    materialize("prometheus", tmp_path)
    config = tmp_path / "etc/prometheus/prometheus.yml"
    result = run([promtool, "check", "config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    # The rule glob matched the monitoring bundle's file and its rules were checked.
    assert "rules/step-runner.rules.yml" in output
    assert "SUCCESS: 0 rules found" not in output
    assert " rules found" in output


@pytest.mark.parametrize(
    "name", ["prometheus.yml", "federation.yml", "remote-write.yml", "docker-autoscaler.yml"]
)
def test_promtool_accepts_the_example_configs(name: str) -> None:
    promtool = tool("promtool")
    result = run([promtool, "check", "config", str(DEPLOY / "prometheus" / name)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_can_fail(tmp_path: Path) -> None:
    promtool = tool("promtool")
    broken = tmp_path / "prometheus.yml"
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    broken.write_text(text.replace("sample_limit: 1500", "sample_limit: lots"), encoding="utf-8")
    assert run([promtool, "check", "config", str(broken)]).returncode != 0


# --- systemd ---------------------------------------------------------------------------


def verify_unit(unit: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` in a scratch root that holds the system's units and an
    executable at the unit's ExecStart path, so the check covers the command too."""
    analyze = tool("systemd-analyze")
    units = root / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    if not (root / "usr/lib/systemd/system").exists():
        shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(unit, units / unit.name)
    for start in unit_directives(unit)["Service.ExecStart"]:
        binary = root / start.split()[0].lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\n", encoding="utf-8")
        binary.chmod(0o755)
    return run([analyze, "verify", f"--root={root}", unit.name])


@pytest.mark.parametrize("name", ["step-runner-exporter.service", "step-runner.service"])
def test_systemd_analyze_verifies_the_units(name: str, tmp_path: Path) -> None:
    if not Path("/usr/lib/systemd/system/sysinit.target").exists():
        pytest.skip("no systemd unit directory to verify against")
    result = verify_unit(DEPLOY / "systemd" / name, tmp_path)
    # verify exits 0 on directives it ignores; anything it prints is a problem.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_analyze_verify_can_fail(tmp_path: Path) -> None:
    if not Path("/usr/lib/systemd/system/sysinit.target").exists():
        pytest.skip("no systemd unit directory to verify against")
    broken = tmp_path / "step-runner-exporter.service"
    text = UNIT_FILE.read_text(encoding="utf-8")
    broken.write_text(text.replace("ProtectSystem=strict", "ProtectSystem=stricter"), "utf-8")
    result = verify_unit(broken, tmp_path / "root")
    assert "stricter" in result.stderr


def test_systemd_analyze_rates_the_sandbox_ok() -> None:
    analyze = tool("systemd-analyze")
    # 2.0 and below is what systemd-analyze calls "OK"; an unsandboxed unit scores 9.6.
    result = run([analyze, "security", "--offline=yes", "--threshold=20", str(UNIT_FILE)])
    if "Unknown option" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot analyse unit files offline: {result.stderr}")
    assert result.returncode == 0, result.stdout + result.stderr
    (verdict,) = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    exposure = float(verdict.split(":")[1].split()[0])
    assert exposure <= 2.0, verdict


# --- systemd: the docker tap's unit and drop-ins -----------------------------------------

SYSTEM_UNITS = Path("/usr/lib/systemd/system")
EXEC_SETTINGS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop")


def stub_commands(root: Path, directives: dict[str, list[str]]) -> None:
    """An executable under root for every command a unit runs, so that verify checks the
    paths without the binaries installed (dockerd, /bin/kill, the console script)."""
    for setting in EXEC_SETTINGS:
        for command in directives.get(f"Service.{setting}", []):
            binary = command.split()[0].lstrip("-@:+!")
            target = root / binary.lstrip("/")
            if binary.startswith("/") and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("#!/bin/sh\n", encoding="utf-8")
                target.chmod(0o755)


def install_docker_layout(layout: DockerLayout, root: Path) -> list[str]:
    """The layout installed under root as docs/deployment.md installs it (the unit and
    every drop-in in /etc/systemd/system, the system's own units beside them); returns
    the names of the units it touches."""
    if not (SYSTEM_UNITS / "sysinit.target").exists():
        pytest.skip("no systemd unit directory to verify against")
    units = root / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(DOCKER_UNIT, units / DOCKER_UNIT.name)
    names = [DOCKER_UNIT.name, *(n for n in layout.dropins if n != DOCKER_UNIT.name)]
    for name, dropin in layout.dropins.items():
        (units / f"{name}.d").mkdir(exist_ok=True)
        shutil.copy(dropin, units / f"{name}.d" / dropin.name)
    for name in names:
        base = units / name if (units / name).exists() else SYSTEM_UNITS / name
        if not base.exists():
            unavailable(f"{base} is missing: Debian's docker.io installs it (make docker-bin)")
        dropins = [layout.dropins[name]] if name in layout.dropins else []
        stub_commands(root, effective_directives(base, *dropins))
    return names


@pytest.mark.parametrize("layout", DOCKER_LAYOUTS, ids=lambda layout: layout.name)
def test_systemd_analyze_verifies_the_docker_tap_units(
    layout: DockerLayout, tmp_path: Path
) -> None:
    analyze = tool("systemd-analyze")
    names = install_docker_layout(layout, tmp_path)
    assert len(names) == 1 + len(set(layout.dropins) - {DOCKER_UNIT.name})
    for name in names:
        result = run([analyze, "verify", f"--root={tmp_path}", name])
        # verify exits 0 on directives it ignores; anything it prints is a problem.
        assert result.returncode == 0 and not result.stderr.strip(), f"{name}: {result.stderr}"


def test_systemd_analyze_verify_catches_a_broken_drop_in(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    broken = tmp_path / "docker.socket.d" / "10-step-runner-exporter.conf"
    broken.parent.mkdir()
    text = IN_PLACE_LAYOUT.dropins["docker.socket"].read_text(encoding="utf-8")
    broken.write_text(text.replace("=/run/docker/daemon.sock", "=run/daemon.sock"), "utf-8")
    layout = DockerLayout("broken", IN_PLACE_LAYOUT.config, {"docker.socket": broken})
    install_docker_layout(layout, tmp_path / "root")
    result = run([analyze, "verify", f"--root={tmp_path / 'root'}", "docker.socket"])
    assert "run/daemon.sock" in result.stderr, result.stderr


@pytest.mark.parametrize("layout", DOCKER_LAYOUTS, ids=lambda layout: layout.name)
def test_systemd_analyze_rates_the_docker_tap_sandbox_ok(
    layout: DockerLayout, tmp_path: Path
) -> None:
    analyze = tool("systemd-analyze")
    install_docker_layout(layout, tmp_path)
    argv = [analyze, "security", "--offline=yes", f"--root={tmp_path}", "--threshold=20"]
    result = run([*argv, DOCKER_UNIT.name])
    if "Unknown option" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot analyse unit files offline: {result.stderr}")
    assert result.returncode == 0, result.stdout + result.stderr
    (verdict,) = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert float(verdict.split(":")[1].split()[0]) <= 2.0, verdict
    # The drop-in's root user is what security sees in place of the daemon's socket.
    runs_as_root = "Service runs as root user" in result.stdout
    assert runs_as_root == (layout is IN_PLACE_LAYOUT), result.stdout


@pytest.mark.parametrize("layout", DOCKER_LAYOUTS, ids=lambda layout: layout.name)
def test_docker_tap_configs_pass_check_config(layout: DockerLayout, tmp_path: Path) -> None:
    check = [str(VENV_BIN / console_script()), "check-config", "--config.file"]
    result = run([*check, str(layout.config)])
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker.yml"
    text = layout.config.read_text(encoding="utf-8")
    broken.write_text(text.replace("tap: docker", "tap: dockerd"), encoding="utf-8")
    result = run([*check, str(broken)])
    assert result.returncode != 0 and "tap" in result.stdout + result.stderr


# --- kustomize -------------------------------------------------------------------------


def test_kubectl_kustomize_builds_what_the_tests_validate() -> None:
    kubectl = tool("kubectl")
    kustomization_needs_monitoring()
    result = run([kubectl, "kustomize", str(KUSTOMIZE_DIR)])
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert result.returncode == 0, result.stderr
    import yaml

    def key(obj: dict[str, object]) -> str:
        return json.dumps(obj, sort_keys=True)

    real = sorted((d for d in yaml.safe_load_all(result.stdout) if d), key=key)
    assert real == sorted(kustomize_build(), key=key)


# --- the image's install command ---------------------------------------------------------


def test_image_install_command_works_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """The build stage on this machine: a context of exactly what it COPYs, a fresh
    virtualenv where it makes one, and its pip install (with --no-deps: the dependency
    pins are pyproject's, resolved by every other test)."""
    build_stage = dockerfile_stages()[0]
    context = tmp_path / "src"
    for source, destination in copy_sources(build_stage):
        target = context / destination.removeprefix("./")
        if destination.endswith("/") or destination == "./":
            target = context / Path(source).name
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / source, target)
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    (install,) = [i.args for i in build_stage if i.keyword == "RUN" and "pip install" in i.args]
    spec = install.split("pip install", 1)[1].split()[-1].strip("'\"")
    assert spec == ".[fast]"
    result = run(
        [str(venv / "bin/pip"), "install", "--no-deps", "--disable-pip-version-check", spec],
        cwd=context,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    script = venv / "bin" / console_script()
    assert script.is_file() and os.access(script, os.X_OK)
    assert f"{venv_dir_of_build()}/bin/{console_script()}" == image_command()[0]
    site = next((venv / "lib").glob("python3*/site-packages"))
    for packaged in ("exporter/cli.py", "exporter/proto/step.proto", "exporter/py.typed"):
        assert (site / packaged).is_file(), f"{packaged} missing from the installed package"


# --- smoke tests ---------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def jobs_by_result(text: str) -> dict[str, int]:
    return {
        labels["result"]: int(value)
        for name, labels, value in samples(text)
        if name == "step_runner_jobs_total" and value
    }


def replace_paths(argv: list[str], mapping: dict[str, str]) -> list[str]:
    """The deployment's argv with its in-image/on-host paths pointed at this checkout."""
    return [mapping.get(arg, arg) for arg in argv]


@contextlib.contextmanager
def sidecar_process(argv: list[str], env: dict[str, str]) -> Iterator[ServeProcess]:
    """The deployment's command line, its web endpoint on a port it picks (ANY_PORT)."""
    with serve_process(argv, env=env, timeout=STARTUP_TIMEOUT) as sidecar:
        assert http_get(sidecar.url("/-/ready"))[0] == 200, sidecar.log.text()
        yield sidecar


def stop_with_final_scrape(sidecar: ServeProcess) -> str:
    """SIGTERM, as systemd and the kubelet send it; the sidecar keeps /metrics up until
    scraped once more, then exits 0. Returns that last scrape."""
    sidecar.terminate()
    last: list[str] = []

    def scraped_and_exited() -> bool:
        status, text = http_get(sidecar.url("/metrics"))
        if status == 200:
            last.append(text)
        return sidecar.process.poll() is not None

    wait_until(scraped_and_exited, STOP_TIMEOUT, "the sidecar to stop after its final scrape")
    assert sidecar.process.returncode == 0, sidecar.log.text()
    assert last, "no scrape succeeded after SIGTERM: the last increments would be lost"
    return last[-1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def check_scrape(text: str, *, jobs: int) -> None:
    assert sum(jobs_by_result(text).values()) == jobs, jobs_by_result(text)
    # Within the sample limit Prometheus enforces (podmonitor.yaml, prometheus.yml).
    assert len(samples(text)) <= podmonitor()["spec"]["sampleLimit"]
    assert ("step_runner_exporter_upstream_up", {}, 1.0) in [
        (n, {k: v for k, v in labels.items() if k != "runner"}, v) for n, labels, v in samples(text)
    ]


def test_sidecar_runs_as_the_systemd_unit_starts_it() -> None:
    argv = exec_start()
    env = dict(os.environ)
    for value in unit_directives()["Service.Environment"]:
        for item in value.split():
            name, _, setting = item.partition("=")
            env[name] = setting
    argv = replace_paths(
        argv,
        {
            argv[0]: str(VENV_BIN / console_script()),
            CONFIG_ON_VM: str(DEPLOY / "systemd" / "config.yml"),
        },
    )
    assert argv[1:] == ["serve", "--config.file", str(DEPLOY / "systemd" / "config.yml")]
    with simulated_step_runner_thread() as (sim, loop), short_tmpdir() as directory:
        listen = f"unix://{directory}/step-runner.sock"
        relocated = [
            *argv,
            *("--listen", listen, "--upstream", sim.listen_address),
            *("--web.listen-address", ANY_PORT),
        ]
        with sidecar_process(relocated, env) as sidecar:
            assert http_get(sidecar.url("/-/healthy"))[0] == 200
            mix = {"success": 3.0, "step_failure": 1.0}
            tally = loop.run(run_jobs(listen, 8, concurrency=2, mix=mix, seed=4), timeout=60)
            assert sum(tally.results.values()) == 8
            wait_until(
                lambda: jobs_by_result(http_get(sidecar.url("/metrics"))[1]) == dict(tally.results),
                10,
                "the sidecar to count every job",
            )
            assert rss_bytes(sidecar.process.pid) < memory_limit(), (
                "MemoryMax / the pod limit is too low"
            )
            text = stop_with_final_scrape(sidecar)
        check_scrape(text, jobs=8)
        # The VM config's static label is on every series (the SLO groups by it).
        assert all(labels.get("runner") == "runner-1" for _, labels, _ in samples(text) if labels)


def test_sidecar_runs_as_the_container_starts_it_behind_the_compose_demo() -> None:
    """The image's ENTRYPOINT + CMD on the image's config, between the Compose demo's
    simulated step-runner and traffic services (their own commands, sockets relocated)."""
    env = dict(os.environ)
    for instruction in final_stage():
        if instruction.keyword == "ENV":
            for item in instruction.args.split():
                name, _, value = item.partition("=")
                if name != "PATH":
                    env[name] = value
    argv = replace_paths(
        image_command(),
        {
            image_command()[0]: str(VENV_BIN / console_script()),
            CONFIG_IN_IMAGE: str(image_config_source()),
        },
    )
    services = compose()["services"]
    demo = str(DEPLOY / "compose" / "demo_roles.py")
    with short_tmpdir() as directory:
        upstream = f"unix://{directory}/upstream.sock"
        listen = f"unix://{directory}/step-runner.sock"

        def demo_argv(service: str, flag: str, address: str) -> list[str]:
            command = list(services[service]["command"])
            command[command.index(flag) + 1] = address
            assert services[service]["entrypoint"][0] == "python"
            return [sys.executable, demo, *command]

        simulator = subprocess.Popen(
            demo_argv("step-runner", "--listen", upstream),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            relocated = [
                *argv,
                *("--listen", listen, "--upstream", upstream),
                *("--web.listen-address", ANY_PORT),
            ]
            with sidecar_process(relocated, env) as sidecar:
                traffic = demo_argv("traffic", "--target", listen)
                traffic[traffic.index("--pause") + 1] = "0"
                result = run([*traffic, "--jobs", "12"])
                assert result.returncode == 0, result.stderr
                sent = ast.literal_eval(result.stdout.strip().splitlines()[-1].split(": ", 1)[1])
                assert sum(sent.values()) == 12
                wait_until(
                    lambda: (
                        sum(jobs_by_result(http_get(sidecar.url("/metrics"))[1]).values()) == 12
                    ),
                    10,
                    "the sidecar to count every job",
                )
                text = stop_with_final_scrape(sidecar)
            check_scrape(text, jobs=12)
            assert set(jobs_by_result(text)) <= {"success", "failed", "cancelled"}
        finally:
            simulator.send_signal(signal.SIGTERM)
            try:
                assert simulator.wait(10) == 0, "the demo step-runner did not stop on SIGTERM"
            finally:
                if simulator.poll() is None:
                    simulator.kill()
                    simulator.wait(10)


# --- smoke test: the docker tap as its unit starts it, in front of a real daemon ----------


def docker_tap_implemented() -> bool:
    """Whether this build has the docker tap's own code (SPEC section 7), not only the
    `tap` key: then its metrics must count what passed."""
    return importlib.util.find_spec("exporter.taps") is not None


def family_total(text: str, name: str) -> float | None:
    values = [value for sample, _, value in samples(text) if sample == name]
    return sum(values) if values else None


@pytest.mark.parametrize("layout", DOCKER_LAYOUTS, ids=lambda layout: layout.name)
def test_docker_tap_runs_as_its_unit_starts_it_in_front_of_a_real_daemon(
    layout: DockerLayout,
) -> None:
    """The unit's ExecStart on the layout's config, only the socket paths and the web port
    relocated by flags, between the docker CLI and a real dockerd: the CLI gets exactly
    what it gets from the daemon, /metrics sees the daemon, SIGTERM leaves the final
    scrape and then a socket nobody can reach (what Runner meets while the tap is down).
    In place of the daemon's socket it also runs with the drop-in's identity, uid 0
    without a capability, and the daemon's socket in a 0700 directory as /run/docker is.
    (The beside layout's dynamic user is systemd's to make.)"""
    try:
        docker_gid = grp.getgrnam(DOCKER_GROUP).gr_gid
    except KeyError:
        unavailable(f"no group {DOCKER_GROUP} on this machine (Debian's docker.io creates it)")
    argv = replace_paths(
        docker_exec_start(),
        {
            docker_exec_start()[0]: str(VENV_BIN / console_script()),
            DOCKER_CONFIG_ON_HOST: str(layout.config),
        },
    )
    assert argv[1:] == ["serve", "--config.file", str(layout.config)]
    env = dict(os.environ)
    for value in docker_unit_of(layout)["Service.Environment"]:
        for item in value.split():
            name, _, setting = item.partition("=")
            env[name] = setting
    config = load_config(layout.config)
    with docker_daemon() as daemon, short_tmpdir() as directory:
        tap = f"unix://{directory}/docker.sock"
        relocated = [
            *argv,
            *("--listen", tap, "--upstream", daemon.host),
            *("--web.listen-address", ANY_PORT),
        ]
        identity: list[str] = []
        if layout is IN_PLACE_LAYOUT:
            assert stat.S_IMODE(os.stat(daemon.dir).st_mode) == 0o700
            identity = setpriv_as(docker_unit_of(layout))
        with sidecar_process([*identity, *relocated], env) as sidecar:
            if identity:
                assert capabilities(sidecar.process.pid) == {"CapEff": 0, "CapPrm": 0, "CapBnd": 0}
            # The socket as the config says: the daemon's permissions, group docker.
            st = os.stat(socket_path_of(tap))
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (config.socket.mode, docker_gid)
            compare_through_tap(daemon, tap)
            text = http_get(sidecar.url("/metrics"))[1]
            assert ("step_runner_exporter_upstream_up", 1.0) in [
                (name, value) for name, _, value in samples(text)
            ]
            if docker_tap_implemented():
                # create, ps, inspect, version and rm: at least one request each.
                wait_until(
                    lambda: docker_requests(sidecar) >= 5,
                    10,
                    "the tap to count the CLI's requests",
                )
                sessions = family_total(text, "step_runner_exporter_docker_exec_sessions_total")
                assert not sessions, "no exec was started"
            final = stop_with_final_scrape(sidecar)
        assert family_total(final, "step_runner_jobs_total") == 0
        assert all(
            labels.get("runner") == config.labels.get("runner") for _, labels, _ in samples(final)
        )
        # The tap is down: what GitLab Runner and docker CLI users get through it.
        down = daemon.cli("ps", host=tap, check=False)
        assert down.returncode != 0
        assert f"Cannot connect to the Docker daemon at {tap}" in down.stderr, down.stderr


def setpriv_as(directives: dict[str, list[str]]) -> list[str]:
    """A command prefix giving a process the in-place unit's identity without systemd:
    uid 0, its supplementary groups, no capability in any set, no new privileges."""
    setpriv = tool("setpriv")
    assert last(directives, "Service.User") == "root"
    assert directives["Service.CapabilityBoundingSet"] == [], "an empty bounding set"
    assert last(directives, "Service.NoNewPrivileges") == "yes"
    groups = [grp.getgrnam(g).gr_gid for g in words(directives, "Service.SupplementaryGroups")]
    return [
        setpriv,
        *("--reuid=0", "--regid=0", f"--groups={','.join(map(str, groups))}"),
        *("--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs"),
        "--",
    ]


def capabilities(pid: int) -> dict[str, int]:
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {name: int(fields[name], 16) for name in ("CapEff", "CapPrm", "CapBnd")}


def docker_requests(sidecar: ServeProcess) -> float:
    text = http_get(sidecar.url("/metrics"))[1]
    return family_total(text, "step_runner_exporter_docker_requests_total") or 0.0


def socket_path_of(address: str) -> str:
    return address.removeprefix("unix://")


def compare_through_tap(daemon: DockerDaemon, tap: str) -> None:
    """A few ordinary API calls through the tap and direct, with the same answers."""
    image = daemon.import_image("srx-deploy-smoke", {"/srx-smoke": b"#!/bin/sh\n"})
    created = daemon.cli("create", "--network", "none", image, "/srx-smoke", host=tap)
    container = created.stdout.strip()
    listing = ("ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Image}} {{.Command}}")
    through, direct = daemon.cli(*listing, host=tap), daemon.cli(*listing)
    assert through.stdout == direct.stdout and container in through.stdout
    inspect = ("inspect", "--format", "{{.Id}} {{.Config.Cmd}} {{.State.Status}}", container)
    assert daemon.cli(*inspect, host=tap).stdout == daemon.cli(*inspect).stdout
    version = ("version", "--format", "{{.Server.APIVersion}}")
    assert daemon.cli(*version, host=tap).stdout == daemon.cli(*version).stdout
    daemon.cli("rm", container, host=tap)
    assert container not in daemon.cli("ps", "-a", "--no-trunc", "-q").stdout
    # docker-autoscaler's transport: Runner runs `docker system dial-stdio` on the instance
    # (over SSH) and speaks the API through its stdin and stdout.
    through_stdio, direct_stdio = ping_through_dial_stdio(tap), ping_through_dial_stdio(daemon.host)
    assert through_stdio == direct_stdio and through_stdio[0] == "HTTP/1.1 200 OK", through_stdio


def ping_through_dial_stdio(host: str) -> list[str]:
    """`GET /_ping` over `docker -H HOST system dial-stdio`: the status line, the headers
    that do not change from one answer to the next, and the body."""
    request = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
    result = subprocess.run(
        ["docker", "-H", host, "system", "dial-stdio"],
        input=request,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.decode().partition("\r\n\r\n")
    status, *headers = head.split("\r\n")
    return [status, *sorted(h for h in headers if not h.startswith("Date:")), body]
