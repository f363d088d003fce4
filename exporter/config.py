"""The sidecar's configuration (examples/config.yml): its schema, written once, parsed
into frozen objects.

Each key is one field of the dataclasses below: its name, default, parser and the flag
that overrides it sit together (the machinery is `yamlfile.py`, shared with the web
config file in `webconfig.py`). Every problem in a file is reported together, each with
its file, line and key path.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Literal

from .methods import is_package, service_name
from .metrics import RESERVED_LABELS
from .yamlfile import (
    Check,
    Collector,
    ConfigError,
    Marks,
    Problem,
    collected,
    empty_mapping,
    flags,
    merge_overrides,
    nullable,
    parse_file,
    parse_section,
    reads,
    required,
    section,
    setting,
    show,
    string_mapping,
)

# Static label names that would clash with a metric's own labels (kept with the metrics).
RESERVED_LABEL_NAMES = RESERVED_LABELS

RESERVED_METRICS_PATHS = ("/-/healthy", "/-/ready")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# What the listening socket speaks (SPEC section 7).
TAPS = ("step-runner", "docker")

# sun_path holds 108 bytes including the terminating NUL on Linux.
_MAX_UNIX_PATH_BYTES = 107
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_OCTAL_MODE = re.compile(r"(?:0o)?[0-7]{1,4}")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_DURATION_UNITS: dict[str, float] = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DAY = 86400.0


# --- value parsers ------------------------------------------------------------------


def parse_duration(value: object) -> float:
    """Seconds from a YAML number or a string such as "250ms", "30s", "5m", "1h30m"
    (units d, h, m, s, ms, largest first, each at most once)."""
    expected = "expected a duration like 30s, 250ms or 1h30m, or a number of seconds"
    if isinstance(value, bool):
        raise ValueError(f"{expected}, got {show(value)}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{expected}, got {show(value)}")
        return float(value)
    if not isinstance(value, str) or not _DURATION.fullmatch(value.strip()):
        raise ValueError(f"{expected}, got {show(value)}")
    total = 0.0
    previous = -1
    order = list(_DURATION_UNITS)
    for number, unit in _DURATION_PART.findall(value.strip()):
        rank = order.index(unit)
        if rank <= previous:
            raise ValueError(f"{expected} (units largest first, each once), got {show(value)}")
        previous = rank
        total += float(number) * _DURATION_UNITS[unit]
    return total


def format_duration(seconds: float) -> str:
    """The canonical text of a duration, to millisecond precision: 5400.0 -> "1h30m"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _duration_in(low: float, high: float, *, low_open: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if seconds < low or seconds > high or (low_open and seconds == low):
            lo, hi = format_duration(low), format_duration(high)
            bounds = f"more than {lo} and at most {hi}" if low_open else f"between {lo} and {hi}"
            raise ValueError(f"must be {bounds}, got {format_duration(seconds)}")
        return seconds

    return parse


def _int_in(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {show(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    return value


def _choice(choices: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        raise ValueError(f"expected one of {', '.join(choices)}, got {show(value)}")

    return parse


def _parse_host(host: str, text: str) -> str:
    if ":" in host:
        raise ValueError(f"IPv6 addresses need brackets, like [::1]:PORT, got {show(text)}")
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"invalid host {host!r} in {show(text)}")
    return host


def parse_host_port(
    value: object, *, allow_empty_host: bool = False, allow_port_zero: bool = False
) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` to (host, port), host without brackets."""
    expected = f"expected HOST:PORT, got {show(value)}"
    if not isinstance(value, str):
        raise ValueError(expected)
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError(expected)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv6 address in brackets, got {show(value)}") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(expected)
        if host:
            host = _parse_host(host, value)
        elif not allow_empty_host:
            raise ValueError(f"missing host in {show(value)}")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"expected a port number after the last ':', got {show(value)}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port must be {low}-65535, got {port}")
    return host, port


@dataclass(frozen=True, slots=True)
class Address:
    """Where to listen or connect: a unix socket or a TCP host and port.

    `str()` gives the canonical text (`unix:///abs/path.sock`, `host:port`,
    `[::1]:port`), which is also a valid gRPC target. Port 0 is only accepted by the
    constructors, never from configuration text.
    """

    kind: Literal["unix", "tcp"]
    path: str = ""  # unix only: absolute
    host: str = ""  # tcp only: no brackets
    port: int = 0  # tcp only

    @classmethod
    def unix(cls, path: str | Path) -> Address:
        return cls("unix", path=str(path))

    @classmethod
    def tcp(cls, host: str, port: int) -> Address:
        return cls("tcp", host=host, port=port)

    @classmethod
    def parse(cls, value: object) -> Address:
        """`unix:///ABSOLUTE/PATH` (or gRPC's `unix:/ABSOLUTE/PATH`) or `HOST:PORT`;
        raises ValueError with a message fit for an operator."""
        if not isinstance(value, str) or ":" not in value:
            raise ValueError(f"expected unix:///ABSOLUTE/PATH or HOST:PORT, got {show(value)}")
        if value.startswith("unix:"):
            rest = value.removeprefix("unix:")
            path = rest[2:] if rest.startswith("//") else rest
            return cls.unix(_check_unix_path(path, value))
        return cls.tcp(*parse_host_port(value))

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _check_unix_path(path: str, text: str) -> str:
    if not path.startswith("/"):
        raise ValueError(
            f"unix socket path must be absolute (unix:///ABSOLUTE/PATH), got {show(text)}"
        )
    if path.endswith("/") or "\0" in path:
        raise ValueError(f"expected a socket file path, got {show(text)}")
    if len(path.encode()) > _MAX_UNIX_PATH_BYTES:
        raise ValueError(
            f"unix socket path is longer than the {_MAX_UNIX_PATH_BYTES} bytes the kernel allows"
        )
    return path


def _parse_mode(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'expected an octal string like "0660", got {show(value)}')
    if isinstance(value, str):
        if not _OCTAL_MODE.fullmatch(value):
            raise ValueError(f'expected an octal string like "0660", got {show(value)}')
        mode = int(value.removeprefix("0o"), 8)
    else:
        mode = value
    if not 0 <= mode <= 0o777:
        # YAML reads 660 as decimal (0o1224); only 0660 or "0660" is octal.
        raise ValueError(
            f'must be between 0000 and 0777, got {mode:#o} (quote octal modes, like "0660")'
        )
    if mode & 0o002:
        raise ValueError(
            f"must not be world-writable (o+w), got {mode:04o}:"
            " any local user could drive step-runner"
        )
    return mode


def _owner(value: object) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a name or a non-negative id, got {value}")
        return value
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"expected a name, a numeric id or null, got {show(value)}")


def _parse_package(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_package(value):
        raise ValueError(
            f"expected a protobuf package name like 'proto' or 'gitlab.step', got {show(value)}"
        )
    return value


def _parse_metrics_path(value: object) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {show(value)}")
    if any(c.isspace() or c in "?#" for c in text):
        raise ValueError(f"must be a plain URL path without spaces, '?' or '#', got {show(value)}")
    if text in RESERVED_METRICS_PATHS:
        raise ValueError(f"{text} is the exporter's own health endpoint")
    return text


def _parse_web_listen(value: object) -> tuple[str, int]:
    return parse_host_port(value, allow_empty_host=True, allow_port_zero=True)


def _file_path(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path or null, got {show(value)}")
    return Path(value)


def _label_problem(name: object, value: object) -> str | None:
    problem = _label_name_problem(name)
    if problem is not None:
        return problem
    if not isinstance(value, str):
        return f"label values must be strings (quote it), got {show(value)}"
    if not value:
        return "label value must not be empty: Prometheus drops empty labels"
    return None


def _label_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
        return f"label name must match [a-zA-Z_][a-zA-Z0-9_]*, got {show(name)}"
    if name.startswith("__"):
        return "label names starting with '__' are reserved for Prometheus"
    if name in RESERVED_LABEL_NAMES:
        return f"label name {name!r} clashes with a label of the exporter's own metrics"
    return None


# --- the configuration: one field per key ---------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketConfig:
    mode: int = setting(0o660, _parse_mode)
    # A str is a user (group) name, an int a uid (gid).
    owner: str | int | None = setting(None, nullable(_owner))
    group: str | int | None = setting(None, nullable(_owner))


@dataclass(frozen=True, slots=True)
class WebConfig:
    # ":PORT" (host "": every interface) as in Prometheus' --web.listen-address; port 0
    # lets the demo and tests bind a free port.
    listen_address: tuple[str, int] = setting(
        ("0.0.0.0", 9854),
        _parse_web_listen,
        flag="--web.listen-address",
        help="HOST:PORT of /metrics",
    )
    metrics_path: str = setting("/metrics", _parse_metrics_path)
    config_file: Path | None = setting(
        None,
        nullable(_file_path),
        flag="--web.config.file",
        help="exporter-toolkit web config (TLS, auth)",
        file_path=True,
    )


@dataclass(frozen=True, slots=True)
class JobsConfig:
    max_tracked: int = setting(10_000, _int_in(1, 10_000_000))
    ttl: float = setting(6 * 3600.0, _duration_in(0, 31 * _DAY, low_open=True))


@dataclass(frozen=True, slots=True)
class ObserverConfig:
    # gRPC's length prefix is 32 bits and grpc-go caps messages at 2^31-1 bytes.
    max_message_bytes: int = setting(4 * 1024 * 1024, _int_in(1, 2**31 - 1))
    # What one connection's observer may hold in partly received messages, all its
    # streams together; a message that would exceed it is skipped and counted.
    max_connection_bytes: int = setting(16 * 1024 * 1024, _int_in(1, 2**40))
    deadline_tolerance: float = setting(0.020, _duration_in(0, 1.0))

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            "max_connection_bytes",
            ("max_message_bytes", "max_connection_bytes"),
            lambda message, connection: (
                f"must be at least max_message_bytes ({message}), got {connection}"
                if connection < message
                else None
            ),
        ),
    )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = setting(1024, _int_in(1, 100_000))


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    grace_period: float = setting(30.0, _duration_in(0, 3600.0))
    final_scrape_wait: float = setting(15.0, _duration_in(0, 3600.0))


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """The docker tap's bounds (SPEC section 7): the only bodies it ever holds are exec
    create requests and responses, at most `max_body_bytes` each."""

    max_body_bytes: int = setting(64 * 1024, _int_in(1024, 1024 * 1024))
    # A marked exec id not started within this is forgotten.
    exec_ttl: float = setting(600.0, _duration_in(1.0, _DAY))
    # Marked exec ids remembered at once, process-wide.
    max_execs: int = setting(4096, _int_in(1, 1_000_000))


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = setting(
        "info", _choice(LOG_LEVELS), flag="--log.level", help="debug, info, warning or error"
    )
    format: str = setting("text", _choice(LOG_FORMATS))


def _docker_listen_problem(tap: str, listen: Address) -> str | None:
    # The docker tap's socket is as powerful as the daemon's (root on the host); a TCP
    # listener beyond loopback would publish it unauthenticated to the network.
    if tap != "docker" or listen.kind != "tcp" or _is_loopback(listen.host):
        return None
    return (
        f"the docker tap grants full Docker (root) access to whoever reaches it: listen on "
        f"a unix socket (or a loopback address), not {listen}"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Config:
    # Keyword-only so it can come first (the order of keys in messages) before the
    # positional required ones.
    tap: str = field(
        default="step-runner",
        kw_only=True,
        metadata=reads(
            _choice(TAPS),
            flag="--tap",
            help="what the listening socket speaks: step-runner (gRPC)"
            " or docker (Docker Engine API)",
        ),
    )
    listen: Address = required(
        Address.parse,
        flag="--listen",
        help="where clients dial: unix:///abs/path.sock or HOST:PORT",
    )
    upstream: Address = required(
        Address.parse,
        flag="--upstream",
        help="step-runner's socket (docker tap: the daemon's): unix:///abs/path.sock or HOST:PORT",
    )
    socket: SocketConfig = section(SocketConfig)
    # None: any package (SPEC section 2); a name pins one.
    service_package: str | None = setting(None, _parse_package)
    web: WebConfig = section(WebConfig)
    labels: Mapping[str, str] = collected(
        empty_mapping,
        string_mapping("expected a mapping of label names to values", _label_problem),
    )
    jobs: JobsConfig = section(JobsConfig)
    observer: ObserverConfig = section(ObserverConfig)
    limits: LimitsConfig = section(LimitsConfig)
    shutdown: ShutdownConfig = section(ShutdownConfig)
    log: LogConfig = section(LogConfig)
    docker: DockerConfig = section(DockerConfig)

    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            "upstream",
            ("listen", "upstream"),
            lambda listen, upstream: (
                f"must differ from listen ({listen}): the sidecar would forward to itself"
                if listen == upstream
                else None
            ),
        ),
        Check("listen", ("tap", "listen"), _docker_listen_problem),
    )

    @property
    def grpc_service(self) -> str | None:
        """The pinned service name (`step.StepRunner`), or None for any package."""
        return service_name(self.service_package) if self.service_package is not None else None


# Override keys (load_config) and the command-line flags they come from, in schema order.
FLAGS = tuple(flags(Config))
OVERRIDE_FLAGS: Mapping[str, str] = MappingProxyType({f.key: f.flag for f in FLAGS})


def load_config(path: Path | None, overrides: Mapping[str, str] | None = None) -> Config:
    """Load and validate a config file (None: defaults plus `overrides` only).

    `overrides` come from command-line flags (keys in OVERRIDE_FLAGS) and win over the
    file. Raises ConfigError listing every problem.
    """
    if path is None:
        return parse_config({}, "<command line>", overrides)
    return parse_file(
        path,
        lambda doc: parse_config(doc.data, str(path), overrides, doc.marks, base_dir=path.parent),
    )


def parse_config(
    data: object,
    source: str = "<config>",
    overrides: Mapping[str, str] | None = None,
    marks: Marks | None = None,
    *,
    base_dir: Path | None = None,
) -> Config:
    """Validate already-loaded YAML data (`marks` from read_yaml give line numbers;
    `base_dir` anchors relative file paths written in the file)."""
    c = Collector(source, marks, base_dir=base_dir)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        c.add((), f"expected a mapping of settings, got {show(data)}")
        raise ConfigError(c.problems)
    data, c.flags = merge_overrides(data, overrides or {}, OVERRIDE_FLAGS)
    config = parse_section(c, Config, data)
    c.check()
    assert config is not None  # anything missing or invalid is a problem above
    return config


__all__ = [
    "FLAGS",
    "OVERRIDE_FLAGS",
    "RESERVED_LABEL_NAMES",
    "Address",
    "Config",
    "ConfigError",
    "DockerConfig",
    "JobsConfig",
    "LimitsConfig",
    "LogConfig",
    "ObserverConfig",
    "Problem",
    "ShutdownConfig",
    "SocketConfig",
    "WebConfig",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_host_port",
]
