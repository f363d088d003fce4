from __future__ import annotations

import dataclasses
import ipaddress
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.config import (
    OVERRIDE_FLAGS,
    RESERVED_LABEL_NAMES,
    Address,
    Config,
    ConfigError,
    Problem,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "config.yml"
# Two lines, so whatever a test appends starts on line 3.
BASE = "listen: unix:///run/a.sock\nupstream: unix:///run/b.sock\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str, overrides: dict[str, str] | None = None) -> list[Problem]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path, overrides)
    return list(raised.value.problems)


def only_problem(tmp_path: Path, text: str, overrides: dict[str, str] | None = None) -> Problem:
    found = problems(tmp_path, text, overrides)
    assert len(found) == 1, found
    return found[0]


def test_the_docker_tap_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    # Its socket is as powerful as the daemon's: a TCP listener on the network would be
    # an unauthenticated root API.
    text = "tap: docker\nlisten: '0.0.0.0:2375'\nupstream: unix:///run/docker.sock\n"
    problem = only_problem(tmp_path, text)
    assert (problem.line, problem.key) == (2, "listen")
    assert "full Docker (root) access" in problem.message
    assert "0.0.0.0:2375" in problem.message
    for loopback in ("127.0.0.1:2375", "[::1]:2375", "localhost:2375"):
        config = load_config(write(tmp_path, text.replace("0.0.0.0:2375", loopback)))
        assert config.tap == "docker"
    step_runner = load_config(write(tmp_path, text.replace("tap: docker", "tap: step-runner")))
    assert step_runner.listen == Address.tcp("0.0.0.0", 2375)


# --- valid files ----------------------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.listen == Address.unix("/run/step-runner/step-runner.sock")
    assert config.upstream == Address.unix("/run/step-runner/step-runner-upstream.sock")
    assert config.socket.mode == 0o660
    assert config.socket.owner is None
    assert dict(config.labels) == {"runner": "runner-1"}
    assert config.web.listen_address == ("0.0.0.0", 9854)
    assert config.web.config_file is None
    assert config.jobs.ttl == 6 * 3600
    assert config.observer.deadline_tolerance == pytest.approx(0.020)
    assert config.service_package is None


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config == Config(Address.unix("/run/a.sock"), Address.unix("/run/b.sock"))
    assert config.socket.mode == 0o660
    assert config.service_package is None  # any package (SPEC section 2)
    assert config.grpc_service is None
    assert config.tap == "step-runner"
    assert (config.docker.max_body_bytes, config.docker.exec_ttl) == (65_536, 600.0)
    assert config.docker.max_execs == 4096
    assert config.web.listen_address == ("0.0.0.0", 9854)
    assert config.web.metrics_path == "/metrics"
    assert dict(config.labels) == {}
    assert (config.jobs.max_tracked, config.jobs.ttl) == (10_000, 21_600.0)
    assert config.observer.max_message_bytes == 4 * 1024 * 1024
    assert config.observer.deadline_tolerance == pytest.approx(0.020)
    assert config.limits.max_connections == 1024
    assert (config.shutdown.grace_period, config.shutdown.final_scrape_wait) == (30.0, 15.0)
    assert (config.log.level, config.log.format) == ("info", "text")


def test_every_setting_is_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """\
            listen: 127.0.0.1:7000
            upstream: "[::1]:7001"
            socket: {mode: 0640, owner: gitlab-runner, group: 998}
            service_package: gitlab.step.v1
            web: {listen_address: ":9900", metrics_path: /m, config_file: web.yml}
            labels: {runner: r1, region: eu}
            jobs: {max_tracked: 50, ttl: 1h30m}
            observer: {max_message_bytes: 1024, deadline_tolerance: 250ms}
            limits: {max_connections: 8}
            shutdown: {grace_period: 5, final_scrape_wait: 0s}
            log: {level: DEBUG, format: json}
            """,
        )
    )
    assert config.listen == Address.tcp("127.0.0.1", 7000)
    assert config.upstream == Address.tcp("::1", 7001)
    assert config.socket == dataclasses.replace(config.socket, mode=0o640, group=998)
    assert config.socket.owner == "gitlab-runner"
    assert config.grpc_service == "gitlab.step.v1.StepRunner"
    assert config.web.listen_address == ("", 9900)
    assert config.web.metrics_path == "/m"
    # Relative to the file that names it, like Prometheus' own file references.
    assert config.web.config_file == tmp_path / "web.yml"
    assert dict(config.labels) == {"runner": "r1", "region": "eu"}
    assert (config.jobs.max_tracked, config.jobs.ttl) == (50, 5400.0)
    assert config.observer.max_message_bytes == 1024
    assert config.observer.deadline_tolerance == pytest.approx(0.25)
    assert config.limits.max_connections == 8
    assert (config.shutdown.grace_period, config.shutdown.final_scrape_wait) == (5.0, 0.0)
    assert (config.log.level, config.log.format) == ("debug", "json")


def test_config_is_immutable(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE + "labels: {runner: r1}\n"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = Address.unix("/elsewhere")  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.labels["runner"] = "r2"  # type: ignore[index]
    assert not hasattr(config, "__dict__")


def test_empty_file_is_an_empty_mapping_completed_by_overrides(tmp_path: Path) -> None:
    overrides = {"listen": "unix:///run/a.sock", "upstream": "unix:///run/b.sock"}
    assert load_config(write(tmp_path, ""), overrides).listen == Address.unix("/run/a.sock")


def test_no_file_at_all_uses_overrides_and_defaults() -> None:
    config = load_config(None, {"listen": "127.0.0.1:7000", "upstream": "unix:///run/b.sock"})
    assert config.listen == Address.tcp("127.0.0.1", 7000)
    assert config.log.level == "info"


# --- overrides --------------------------------------------------------------------------


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "web: {listen_address: '127.0.0.1:1'}\nlog: {level: error}\n")
    config = load_config(
        path,
        {
            "listen": "unix:///run/flag.sock",
            "upstream": "127.0.0.1:7001",
            "web.listen_address": "[::1]:9999",
            "log.level": "debug",
            "web.config_file": "rel/web.yml",
        },
    )
    assert config.listen == Address.unix("/run/flag.sock")
    assert config.upstream == Address.tcp("127.0.0.1", 7001)
    assert config.web.listen_address == ("::1", 9999)
    assert config.log.level == "debug"
    # A flag's relative path is relative to the working directory, not the file.
    assert config.web.config_file == Path("rel/web.yml")


def test_invalid_override_is_located_at_its_flag(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, BASE, {"web.listen_address": "localhost"})
    assert problem == Problem(
        "--web.listen-address", None, "web.listen_address", "expected HOST:PORT, got 'localhost'"
    )
    assert str(problem) == "--web.listen-address: expected HOST:PORT, got 'localhost'"


@pytest.mark.parametrize(("key", "flag"), sorted(OVERRIDE_FLAGS.items()))
def test_every_override_is_validated(tmp_path: Path, key: str, flag: str) -> None:
    problem = only_problem(tmp_path, BASE, {key: ""})
    assert (problem.source, problem.line, problem.key) == (flag, None, key)


def test_unknown_override_key_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown override"):
        load_config(None, {"listen_address": "x"})


# --- where problems are reported ----------------------------------------------------------


def test_all_problems_are_reported_together_in_file_order(tmp_path: Path) -> None:
    text = BASE + "log:\n  level: loud\nweb:\n  listen_address: localhost\njobs: {ttl: soon}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert [(p.line, p.key) for p in raised.value.problems] == [
        (4, "log.level"),
        (6, "web.listen_address"),
        (7, "jobs.ttl"),
    ]
    lines = str(raised.value).splitlines()
    assert lines[1] == f"{path}:6: web.listen_address: expected HOST:PORT, got 'localhost'"
    assert len(lines) == 3


def test_missing_listen_and_upstream(tmp_path: Path) -> None:
    found = problems(tmp_path, "")
    assert [(p.key, p.line) for p in found] == [("listen", None), ("upstream", None)]
    assert found[0].message == "required: set it in the config file or with --listen"
    assert str(found[1]).endswith(
        "config.yml: upstream: required: set it in the config file or with --upstream"
    )


def test_file_must_be_a_mapping(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "- listen\n- upstream\n")
    assert (problem.line, problem.key) == (1, "")
    assert problem.message == "expected a mapping of settings, got a list"


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, BASE + "web:\n  listen_address: x\n bad: indent\n")
    assert problem.line == 5
    assert problem.message.startswith("invalid YAML: ")


def test_yaml_control_character_has_its_line(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, BASE + "labels: {runner: \x07}\n")
    assert (problem.line, problem.message) == (3, "invalid YAML: character U+0007 is not allowed")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "missing.yml")
    assert (
        str(raised.value) == f"{tmp_path / 'missing.yml'}: cannot read: No such file or directory"
    )


def test_duplicate_keys_are_reported(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, BASE + "log: {level: info}\nlog: {format: json}\n")
    assert (problem.line, problem.key) == (4, "log")
    assert problem.message == "duplicate key (first on line 3); YAML keeps only the last"


def test_parse_config_without_marks_still_names_the_key() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"listen": "unix:///a", "upstream": "unix:///b", "jobs": {"ttl": 0}})
    assert str(raised.value) == "<config>: jobs.ttl: must be more than 0s and at most 31d, got 0s"


# --- one case per rule ------------------------------------------------------------------------

NOT_WORLD_WRITABLE = "any local user could drive step-runner"
PACKAGE_HINT = "expected a protobuf package name like 'proto' or 'gitlab.step'"
DURATION_HINT = "expected a duration like 30s, 250ms or 1h30m, or a number of seconds"

RULES = [
    # (text appended after BASE, 'LINE: KEY: MESSAGE')
    (
        "foo: 1\n",
        "3: foo: unknown key (expected one of: tap, listen, upstream, socket,"
        " service_package, web, labels, jobs, observer, limits, shutdown, log, docker)",
    ),
    ("lables: {}\n", "3: lables: unknown key (did you mean 'labels'?)"),
    ("tap: kubernetes\n", "3: tap: expected one of step-runner, docker, got 'kubernetes'"),
    (
        "docker:\n  max_body_bytes: 10\n",
        "4: docker.max_body_bytes: must be between 1024 and 1048576, got 10",
    ),
    ("docker:\n  exec_tll: 1m\n", "4: docker.exec_tll: unknown key (did you mean 'exec_ttl'?)"),
    ("web:\n  metrics: /m\n", "4: web.metrics: unknown key (did you mean 'metrics_path'?)"),
    ("jobs: 5\n", "3: jobs: expected a mapping, got 5"),
    ("jobs:\n  max_tracked: many\n", "4: jobs.max_tracked: expected an integer, got 'many'"),
    (
        "limits:\n  max_connections: true\n",
        "4: limits.max_connections: expected an integer, got true",
    ),
    ("jobs:\n  max_tracked: 1.5\n", "4: jobs.max_tracked: expected an integer, got 1.5"),
    (
        'socket:\n  mode: "0666"\n',
        f"4: socket.mode: must not be world-writable (o+w), got 0666: {NOT_WORLD_WRITABLE}",
    ),
    (
        "socket:\n  mode: 0o0662\n",
        f"4: socket.mode: must not be world-writable (o+w), got 0662: {NOT_WORLD_WRITABLE}",
    ),
    (
        "socket:\n  mode: 660\n",
        "4: socket.mode: must be between 0000 and 0777, got 0o1224"
        ' (quote octal modes, like "0660")',
    ),
    ("socket:\n  mode: rw\n", "4: socket.mode: expected an octal string like \"0660\", got 'rw'"),
    ("socket:\n  owner: -1\n", "4: socket.owner: expected a name or a non-negative id, got -1"),
    (
        "socket:\n  group: [a]\n",
        "4: socket.group: expected a name, a numeric id or null, got a list",
    ),
    (
        "service_package: 1proto\n",
        f"3: service_package: {PACKAGE_HINT}, got '1proto'",
    ),
    (
        "service_package: a..b\n",
        f"3: service_package: {PACKAGE_HINT}, got 'a..b'",
    ),
    ("web:\n  metrics_path: metrics\n", "4: web.metrics_path: must start with '/', got 'metrics'"),
    (
        "web:\n  metrics_path: /-/healthy\n",
        "4: web.metrics_path: /-/healthy is the exporter's own health endpoint",
    ),
    (
        "web:\n  metrics_path: /-/ready\n",
        "4: web.metrics_path: /-/ready is the exporter's own health endpoint",
    ),
    (
        "web:\n  metrics_path: /m?x=1\n",
        "4: web.metrics_path: must be a plain URL path without spaces, '?' or '#', got '/m?x=1'",
    ),
    (
        "web:\n  listen_address: localhost\n",
        "4: web.listen_address: expected HOST:PORT, got 'localhost'",
    ),
    (
        "web:\n  listen_address: localhost:99999\n",
        "4: web.listen_address: port must be 0-65535, got 99999",
    ),
    (
        "web:\n  listen_address: '::1:9854'\n",
        "4: web.listen_address: IPv6 addresses need brackets, like [::1]:PORT, got '::1:9854'",
    ),
    (
        "web:\n  listen_address: '[host]:80'\n",
        "4: web.listen_address: expected an IPv6 address in brackets, got '[host]:80'",
    ),
    ("web:\n  config_file: 5\n", "4: web.config_file: expected a file path or null, got 5"),
    ("labels: [runner]\n", "3: labels: expected a mapping of label names to values, got a list"),
    ("labels:\n  9x: y\n", "4: labels.9x: label name must match [a-zA-Z_][a-zA-Z0-9_]*, got '9x'"),
    (
        "labels:\n  a-b: y\n",
        "4: labels.a-b: label name must match [a-zA-Z_][a-zA-Z0-9_]*, got 'a-b'",
    ),
    (
        "labels:\n  __meta: y\n",
        "4: labels.__meta: label names starting with '__' are reserved for Prometheus",
    ),
    ("labels:\n  runner: 3\n", "4: labels.runner: label values must be strings (quote it), got 3"),
    (
        "labels:\n  runner: ''\n",
        "4: labels.runner: label value must not be empty: Prometheus drops empty labels",
    ),
    ("jobs:\n  max_tracked: 0\n", "4: jobs.max_tracked: must be between 1 and 10000000, got 0"),
    ("jobs:\n  ttl: 0\n", "4: jobs.ttl: must be more than 0s and at most 31d, got 0s"),
    ("jobs:\n  ttl: 32d\n", "4: jobs.ttl: must be more than 0s and at most 31d, got 32d"),
    (
        "jobs:\n  ttl: 5 minutes\n",
        f"4: jobs.ttl: {DURATION_HINT}, got '5 minutes'",
    ),
    (
        "jobs:\n  ttl: .inf\n",
        f"4: jobs.ttl: {DURATION_HINT}, got inf",
    ),
    (
        "observer:\n  max_message_bytes: 0\n",
        "4: observer.max_message_bytes: must be between 1 and 2147483647, got 0",
    ),
    (
        "observer:\n  max_message_bytes: 2147483648\n",
        "4: observer.max_message_bytes: must be between 1 and 2147483647, got 2147483648",
    ),
    (
        "observer:\n  deadline_tolerance: 2s\n",
        "4: observer.deadline_tolerance: must be between 0s and 1s, got 2s",
    ),
    (
        "observer:\n  deadline_tolerance: -0.5\n",
        "4: observer.deadline_tolerance: must be between 0s and 1s, got -500ms",
    ),
    (
        "limits:\n  max_connections: 0\n",
        "4: limits.max_connections: must be between 1 and 100000, got 0",
    ),
    (
        "shutdown:\n  grace_period: 2h\n",
        "4: shutdown.grace_period: must be between 0s and 1h, got 2h",
    ),
    (
        "shutdown:\n  final_scrape_wait: -5s\n",
        f"4: shutdown.final_scrape_wait: {DURATION_HINT}, got '-5s'",
    ),
    (
        "log:\n  level: verbose\n",
        "4: log.level: expected one of debug, info, warning, error, got 'verbose'",
    ),
    ("log:\n  format: xml\n", "4: log.format: expected one of text, json, got 'xml'"),
]


@pytest.mark.parametrize(("text", "expected"), RULES, ids=[r[1].split(":")[1] for r in RULES])
def test_rule(tmp_path: Path, text: str, expected: str) -> None:
    problem = only_problem(tmp_path, BASE + text)
    line, key, message = expected.split(": ", 2)
    assert (problem.line, problem.key, problem.message) == (int(line), key, message)
    assert str(problem) == f"{tmp_path / 'config.yml'}:{expected}"


@pytest.mark.parametrize("name", sorted(RESERVED_LABEL_NAMES))
def test_label_names_of_the_exporters_own_metrics_are_refused(tmp_path: Path, name: str) -> None:
    problem = only_problem(tmp_path, BASE + f"labels:\n  runner: r1\n  {name}: x\n")
    assert (problem.key, problem.line) == (f"labels.{name}", 5)
    assert (
        problem.message == f"label name {name!r} clashes with a label of the exporter's own metrics"
    )


LONG_PATH = "/tmp/" + "s" * 103  # 108 bytes: one more than sun_path can hold

BAD_ADDRESSES = [
    ("localhost", "expected unix:///ABSOLUTE/PATH or HOST:PORT, got 'localhost'"),
    (
        "unix://relative.sock",
        "unix socket path must be absolute (unix:///ABSOLUTE/PATH), got 'unix://relative.sock'",
    ),
    (
        "unix:relative.sock",
        "unix socket path must be absolute (unix:///ABSOLUTE/PATH), got 'unix:relative.sock'",
    ),
    ("unix:///run/", "expected a socket file path, got 'unix:///run/'"),
    (f"unix://{LONG_PATH}", "unix socket path is longer than the 107 bytes the kernel allows"),
    ("host:0", "port must be 1-65535, got 0"),
    ("host:65536", "port must be 1-65535, got 65536"),
    ("host:http", "expected a port number after the last ':', got 'host:http'"),
    (":7000", "missing host in ':7000'"),
    ("::1:7000", "IPv6 addresses need brackets, like [::1]:PORT, got '::1:7000'"),
    ("bad host:1", "invalid host 'bad host' in 'bad host:1'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_ADDRESSES)
def test_listen_address_syntax(tmp_path: Path, text: str, message: str) -> None:
    problem = only_problem(tmp_path, f"upstream: unix:///run/b.sock\nlisten: '{text}'\n")
    assert (problem.key, problem.line, problem.message) == ("listen", 2, message)


def test_listen_must_not_be_a_yaml_number(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "listen: 7000\nupstream: unix:///run/b.sock\n")
    assert problem.message == "expected unix:///ABSOLUTE/PATH or HOST:PORT, got 7000"


def test_listen_equal_to_upstream_would_loop(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "listen: unix:///run/a.sock\nupstream: unix:///run/a.sock\n")
    assert (problem.key, problem.line) == ("upstream", 2)
    assert (
        problem.message
        == "must differ from listen (unix:///run/a.sock): the sidecar would forward to itself"
    )


def test_listen_equal_to_upstream_also_through_a_flag(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, BASE, {"upstream": "unix:/run/a.sock"})
    assert (problem.source, problem.key) == ("--upstream", "upstream")


def test_valid_socket_modes(tmp_path: Path) -> None:
    for written, mode in (("'0600'", 0o600), ("0o640", 0o640), ("0660", 0o660), ("'770'", 0o770)):
        config = load_config(write(tmp_path, BASE + f"socket: {{mode: {written}}}\n"))
        assert config.socket.mode == mode, written


# --- durations and addresses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2d1h1m1s1ms", 2 * 86400 + 3661.001),
        ("1.5s", 1.5),
        ("0s", 0.0),
        (20, 20.0),
        (0.02, 0.02),
    ],
)
def test_durations_parse(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5", "5 m", "-5s", "1m1h", "1s1s", "1w", "", True, None, [1]])
def test_bad_durations_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


@given(st.integers(min_value=0, max_value=10**10))
def test_format_duration_round_trips(millis: int) -> None:
    seconds = millis / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "unix:///run/step-runner/step-runner.sock",
        "127.0.0.1:80",
        "example.com:443",
        "[::1]:9854",
        "[fe80::1%eth0]:80",
        "localhost:65535",
    ],
)
def test_canonical_addresses_round_trip(text: str) -> None:
    assert str(Address.parse(text)) == text


def test_grpc_short_unix_form_is_canonicalised() -> None:
    address = Address.parse("unix:/run/a.sock")
    assert address == Address("unix", path="/run/a.sock")
    assert str(address) == "unix:///run/a.sock"


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(min_value=1, max_value=65535),
)
def test_ip_addresses_round_trip(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    address = Address.tcp(str(ip), port)
    assert Address.parse(str(address)) == address


@given(st.text(alphabet="abcxyz0123456789._-/", min_size=1, max_size=90))
def test_unix_paths_round_trip(name: str) -> None:
    address = Address.unix("/" + name.rstrip("/") + "s")
    assert Address.parse(str(address)) == address


def test_connection_budget_must_hold_at_least_one_message() -> None:
    data = {
        "listen": "unix:///run/a.sock",
        "upstream": "unix:///run/b.sock",
        "observer": {"max_message_bytes": 1000, "max_connection_bytes": 999},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="c.yml")
    assert "observer.max_connection_bytes" in str(info.value)
    assert "at least max_message_bytes (1000)" in str(info.value)
    data["observer"] = {"max_message_bytes": 1000, "max_connection_bytes": 1000}
    assert parse_config(data).observer.max_connection_bytes == 1000
