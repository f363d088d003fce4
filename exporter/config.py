"""The sidecar's configuration (examples/config.yml), parsed once into frozen objects.

Every problem in a file is collected and reported together, each with its file, line
and key path, so an operator fixes a config in one round trip instead of one error per
restart. The YAML machinery here (`read_yaml`, `Collector`, `Problem`, `ConfigError`) is
shared with the web config file parser in `webconfig.py`.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeVar

import yaml

from .metrics import RESERVED_LABELS

KeyPath = tuple[str, ...]
# Line (1-based) of every key in a YAML document, by key path; () is the document.
Marks = Mapping[KeyPath, int]

T = TypeVar("T")

# Static label names that would clash with a metric's own labels (kept with the metrics).
RESERVED_LABEL_NAMES = RESERVED_LABELS

RESERVED_METRICS_PATHS = ("/-/healthy", "/-/ready")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# What the listening socket speaks (SPEC section 7).
TAPS = ("step-runner", "docker")

# Override keys (load_config) and the command-line flags they come from.
OVERRIDE_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "tap": "--tap",
        "listen": "--listen",
        "upstream": "--upstream",
        "web.listen_address": "--web.listen-address",
        "log.level": "--log.level",
        "web.config_file": "--web.config.file",
    }
)

# sun_path holds 108 bytes including the terminating NUL on Linux.
_MAX_UNIX_PATH_BYTES = 107
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_PROTO_PACKAGE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_OCTAL_MODE = re.compile(r"(?:0o)?[0-7]{1,4}")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_DURATION_UNITS: dict[str, float] = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DAY = 86400.0


# --- problems ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration and where it is.

    `source` is the file (as given), a command-line flag such as `--listen`, or a
    placeholder like `<command line>`; `key` is the dotted key path, "" for the file as
    a whole; `line` is 1-based, None when the thing is absent or not in a file.
    """

    source: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        # A flag already names its setting; repeating the key would only add noise.
        if self.key and not self.source.startswith("--"):
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration is invalid; `problems` lists all of it, in file order."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        ordered = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
        self.problems: tuple[Problem, ...] = tuple(ordered)
        super().__init__("\n".join(str(p) for p in self.problems))


def show(value: object) -> str:
    """A value as a user wrote it in YAML, short enough for a one-line message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- reading YAML with locations ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class YamlDocument:
    data: object
    marks: Marks
    # Duplicate keys: YAML silently keeps the last one, which hides typos and bad merges.
    problems: tuple[Problem, ...] = ()


def read_yaml(path: Path) -> YamlDocument:
    """Read one YAML file with yaml.safe_load; raise ConfigError when it cannot be read
    or is not valid YAML. An empty file is an empty mapping."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(source, None, "", f"cannot read: {e.strerror or e}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(source, None, "", f"not UTF-8 text: {e.reason}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        what = "; ".join(str(part) for part in (e.context, e.problem) if part)
        raise ConfigError([Problem(source, line, "", f"invalid YAML: {what}")]) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        message = f"invalid YAML: character U+{e.character:04X} is not allowed"
        raise ConfigError([Problem(source, line, "", message)]) from None
    except yaml.YAMLError as e:
        message = f"invalid YAML: {str(e).splitlines()[0]}"
        raise ConfigError([Problem(source, None, "", message)]) from None
    marks: dict[KeyPath, int] = {}
    duplicates: list[Problem] = []
    if node is not None:
        marks[()] = node.start_mark.line + 1
        _collect_marks(source, node, (), marks, duplicates)
    return YamlDocument({} if data is None else data, MappingProxyType(marks), tuple(duplicates))


def _collect_marks(
    source: str, node: yaml.Node, path: KeyPath, marks: dict[KeyPath, int], dups: list[Problem]
) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = str(key_node.value)
        child = (*path, key)
        line = key_node.start_mark.line + 1
        if key in first_line and key != "<<":
            message = f"duplicate key (first on line {first_line[key]}); YAML keeps only the last"
            dups.append(Problem(source, line, ".".join(child), message))
        first_line.setdefault(key, line)
        marks[child] = line
        _collect_marks(source, value_node, child, marks, dups)


class Collector:
    """Validates one document, collecting every problem instead of stopping at the first.

    Parsers are plain functions `value -> T` that raise ValueError with a message; the
    collector turns that into a Problem at the right key and carries on with a default.
    """

    def __init__(
        self, source: str, marks: Marks | None = None, flags: Mapping[KeyPath, str] | None = None
    ) -> None:
        self.source = source
        self.marks: Marks = marks or {}
        self.flags: Mapping[KeyPath, str] = flags or {}
        self.problems: list[Problem] = []

    def add(self, path: KeyPath, message: str, *, located: bool = True) -> None:
        key = ".".join(path)
        flag = self.flags.get(path)
        if flag is not None:
            self.problems.append(Problem(flag, None, key, message))
        else:
            self.problems.append(
                Problem(self.source, self._line(path) if located else None, key, message)
            )

    def _line(self, path: KeyPath) -> int | None:
        # Values a YAML merge key pulled in have no mark of their own: use the parent's.
        for end in range(len(path), -1, -1):
            line = self.marks.get(path[:end])
            if line is not None:
                return line
        return None

    def mapping(self, value: object, path: KeyPath, known: Sequence[str]) -> dict[str, object]:
        """A section's keys: absent or null is empty; unknown keys are problems."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(path, f"expected a mapping, got {show(value)}")
            return {}
        out: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(key, str) and key in known:
                out[key] = item
            else:
                self.add((*path, str(key)), _unknown_key_message(str(key), known))
        return out

    def field(
        self,
        section: Mapping[str, object],
        path: KeyPath,
        key: str,
        parse: Callable[[object], T],
        default: T,
    ) -> T:
        if key not in section:
            return default
        try:
            return parse(section[key])
        except ValueError as e:
            self.add((*path, key), str(e))
            return default

    def check(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _unknown_key_message(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (expected one of: {', '.join(known)})"


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


def _parse_owner(value: object) -> str | int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a name or a non-negative id, got {value}")
        return value
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"expected a name, a numeric id or null, got {show(value)}")


def _parse_package(value: object) -> str:
    if not isinstance(value, str) or not _PROTO_PACKAGE.fullmatch(value):
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
    # ":PORT" (all interfaces) as in Prometheus' --web.listen-address; port 0 lets the
    # demo and tests bind a free port.
    return parse_host_port(value, allow_empty_host=True, allow_port_zero=True)


def _parse_path(base_dir: Path | None) -> Callable[[object], Path | None]:
    def parse(value: object) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a file path or null, got {show(value)}")
        path = Path(value)
        # Like Prometheus: a relative path in a file is relative to that file.
        return base_dir / path if base_dir is not None and not path.is_absolute() else path

    return parse


# --- the configuration ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketConfig:
    mode: int = 0o660
    owner: str | int | None = None  # a str is a user name, an int a uid
    group: str | int | None = None


@dataclass(frozen=True, slots=True)
class WebConfig:
    listen_address: tuple[str, int] = ("0.0.0.0", 9854)  # host "" means every interface
    metrics_path: str = "/metrics"
    config_file: Path | None = None


@dataclass(frozen=True, slots=True)
class JobsConfig:
    max_tracked: int = 10_000
    ttl: float = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class ObserverConfig:
    max_message_bytes: int = 4 * 1024 * 1024
    # What one connection's observer may hold in partly received messages, all its
    # streams together; a message that would exceed it is skipped and counted.
    max_connection_bytes: int = 16 * 1024 * 1024
    deadline_tolerance: float = 0.020


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = 1024


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    grace_period: float = 30.0
    final_scrape_wait: float = 15.0


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """The docker tap's bounds (SPEC section 7): the only bodies it ever holds are exec
    create requests and responses, at most `max_body_bytes` each."""

    max_body_bytes: int = 64 * 1024
    exec_ttl: float = 600.0  # a marked exec id not started within this is forgotten
    max_execs: int = 4096  # marked exec ids remembered at once, process-wide


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


def _no_labels() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address
    upstream: Address
    socket: SocketConfig = SocketConfig()
    service_package: str = "proto"
    web: WebConfig = WebConfig()
    labels: Mapping[str, str] = field(default_factory=_no_labels)  # read-only
    jobs: JobsConfig = JobsConfig()
    observer: ObserverConfig = ObserverConfig()
    limits: LimitsConfig = LimitsConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    log: LogConfig = LogConfig()
    tap: str = "step-runner"
    docker: DockerConfig = DockerConfig()

    @property
    def grpc_service(self) -> str:
        """The full service name, `proto.StepRunner` by default."""
        return f"{self.service_package}.StepRunner"


_TOP_KEYS = (
    "tap",
    "listen",
    "upstream",
    "socket",
    "service_package",
    "web",
    "labels",
    "jobs",
    "observer",
    "limits",
    "shutdown",
    "log",
    "docker",
)


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


def parse_file(path: Path, parse: Callable[[YamlDocument], T]) -> T:
    """Read a YAML file and parse it; YAML-level problems (duplicate keys) and the
    parser's problems are reported together, in one ConfigError."""
    doc = read_yaml(path)
    try:
        result = parse(doc)
    except ConfigError as e:
        raise ConfigError([*doc.problems, *e.problems]) from None
    if doc.problems:
        raise ConfigError(doc.problems)
    return result


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
    c = Collector(source, marks)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        c.add((), f"expected a mapping of settings, got {show(data)}")
        raise ConfigError(c.problems)
    data, c.flags = _apply_overrides(data, overrides or {})
    root = c.mapping(data, (), _TOP_KEYS)

    listen = _address(c, root, "listen")
    upstream = _address(c, root, "upstream")
    if listen is not None and listen == upstream:
        c.add(
            ("upstream",),
            f"must differ from listen ({listen}): the sidecar would forward to itself",
        )
    socket = _socket(c, root)
    service_package = c.field(root, (), "service_package", _parse_package, "proto")
    web = _web(c, root, base_dir)
    labels = _labels(c, root)
    jobs = _jobs(c, root)
    observer = _observer(c, root)
    limits = _limits(c, root)
    shutdown = _shutdown(c, root)
    log = _log(c, root)
    tap = c.field(root, (), "tap", _choice(TAPS), "step-runner")
    docker = _docker(c, root)
    c.check()
    assert listen is not None and upstream is not None  # a missing one is a problem above
    return Config(
        listen,
        upstream,
        socket,
        service_package,
        web,
        labels,
        jobs,
        observer,
        limits,
        shutdown,
        log,
        tap,
        docker,
    )


def _apply_overrides(
    data: Mapping[object, object], overrides: Mapping[str, str]
) -> tuple[dict[object, object], dict[KeyPath, str]]:
    merged = dict(data)
    flags: dict[KeyPath, str] = {}
    for key, value in overrides.items():
        if key not in OVERRIDE_FLAGS:
            raise ValueError(
                f"unknown override {key!r}; expected one of {', '.join(OVERRIDE_FLAGS)}"
            )
        path = tuple(key.split("."))
        flags[path] = OVERRIDE_FLAGS[key]
        if len(path) == 1:
            merged[key] = value
            continue
        section = merged.get(path[0])
        if section is None:
            merged[path[0]] = {path[1]: value}
        elif isinstance(section, Mapping):
            merged[path[0]] = {**section, path[1]: value}
        # else: the section's own type problem is reported and no config results.
    return merged, flags


def _address(c: Collector, root: Mapping[str, object], key: str) -> Address | None:
    if key not in root:
        c.add((key,), f"required: set it in the config file or with --{key}", located=False)
        return None
    try:
        return Address.parse(root[key])
    except ValueError as e:
        c.add((key,), str(e))
        return None


def _socket(c: Collector, root: Mapping[str, object]) -> SocketConfig:
    path = ("socket",)
    s = c.mapping(root.get("socket"), path, ("mode", "owner", "group"))
    d = SocketConfig()
    return SocketConfig(
        mode=c.field(s, path, "mode", _parse_mode, d.mode),
        owner=c.field(s, path, "owner", _parse_owner, d.owner),
        group=c.field(s, path, "group", _parse_owner, d.group),
    )


def _web(c: Collector, root: Mapping[str, object], base_dir: Path | None) -> WebConfig:
    path = ("web",)
    w = c.mapping(root.get("web"), path, ("listen_address", "metrics_path", "config_file"))
    d = WebConfig()
    # A --web.config.file flag is relative to the working directory, not the file.
    file_dir = None if ("web", "config_file") in c.flags else base_dir
    return WebConfig(
        listen_address=c.field(w, path, "listen_address", _parse_web_listen, d.listen_address),
        metrics_path=c.field(w, path, "metrics_path", _parse_metrics_path, d.metrics_path),
        config_file=c.field(w, path, "config_file", _parse_path(file_dir), d.config_file),
    )


def _labels(c: Collector, root: Mapping[str, object]) -> Mapping[str, str]:
    value = root.get("labels")
    if value is None:
        return _no_labels()
    if not isinstance(value, Mapping):
        c.add(("labels",), f"expected a mapping of label names to values, got {show(value)}")
        return _no_labels()
    labels: dict[str, str] = {}
    for name, label_value in value.items():
        path = ("labels", str(name))
        problem = _label_name_problem(name)
        if problem is not None:
            c.add(path, problem)
        elif not isinstance(label_value, str):
            c.add(path, f"label values must be strings (quote it), got {show(label_value)}")
        elif not label_value:
            c.add(path, "label value must not be empty: Prometheus drops empty labels")
        else:
            labels[name] = label_value
    return MappingProxyType(labels)


def _label_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
        return f"label name must match [a-zA-Z_][a-zA-Z0-9_]*, got {show(name)}"
    if name.startswith("__"):
        return "label names starting with '__' are reserved for Prometheus"
    if name in RESERVED_LABEL_NAMES:
        return f"label name {name!r} clashes with a label of the exporter's own metrics"
    return None


def _jobs(c: Collector, root: Mapping[str, object]) -> JobsConfig:
    path = ("jobs",)
    j = c.mapping(root.get("jobs"), path, ("max_tracked", "ttl"))
    d = JobsConfig()
    return JobsConfig(
        max_tracked=c.field(j, path, "max_tracked", _int_in(1, 10_000_000), d.max_tracked),
        ttl=c.field(j, path, "ttl", _duration_in(0, 31 * _DAY, low_open=True), d.ttl),
    )


def _observer(c: Collector, root: Mapping[str, object]) -> ObserverConfig:
    path = ("observer",)
    keys = ("max_message_bytes", "max_connection_bytes", "deadline_tolerance")
    o = c.mapping(root.get("observer"), path, keys)
    d = ObserverConfig()
    # gRPC's length prefix is 32 bits and grpc-go caps messages at 2^31-1 bytes.
    max_bytes = _int_in(1, 2**31 - 1)
    config = ObserverConfig(
        max_message_bytes=c.field(o, path, "max_message_bytes", max_bytes, d.max_message_bytes),
        max_connection_bytes=c.field(
            o, path, "max_connection_bytes", _int_in(1, 2**40), d.max_connection_bytes
        ),
        deadline_tolerance=c.field(
            o, path, "deadline_tolerance", _duration_in(0, 1.0), d.deadline_tolerance
        ),
    )
    if config.max_connection_bytes < config.max_message_bytes:
        c.add(
            (*path, "max_connection_bytes"),
            f"must be at least max_message_bytes ({config.max_message_bytes}), "
            f"got {config.max_connection_bytes}",
        )
    return config


def _limits(c: Collector, root: Mapping[str, object]) -> LimitsConfig:
    path = ("limits",)
    lim = c.mapping(root.get("limits"), path, ("max_connections",))
    d = LimitsConfig()
    return LimitsConfig(
        max_connections=c.field(
            lim, path, "max_connections", _int_in(1, 100_000), d.max_connections
        )
    )


def _shutdown(c: Collector, root: Mapping[str, object]) -> ShutdownConfig:
    path = ("shutdown",)
    s = c.mapping(root.get("shutdown"), path, ("grace_period", "final_scrape_wait"))
    d = ShutdownConfig()
    hour = _duration_in(0, 3600.0)
    return ShutdownConfig(
        grace_period=c.field(s, path, "grace_period", hour, d.grace_period),
        final_scrape_wait=c.field(s, path, "final_scrape_wait", hour, d.final_scrape_wait),
    )


def _log(c: Collector, root: Mapping[str, object]) -> LogConfig:
    path = ("log",)
    lg = c.mapping(root.get("log"), path, ("level", "format"))
    d = LogConfig()
    return LogConfig(
        level=c.field(lg, path, "level", _choice(LOG_LEVELS), d.level),
        format=c.field(lg, path, "format", _choice(LOG_FORMATS), d.format),
    )


def _docker(c: Collector, root: Mapping[str, object]) -> DockerConfig:
    path = ("docker",)
    dk = c.mapping(root.get("docker"), path, ("max_body_bytes", "exec_ttl", "max_execs"))
    d = DockerConfig()
    return DockerConfig(
        max_body_bytes=c.field(
            dk, path, "max_body_bytes", _int_in(1024, 1024 * 1024), d.max_body_bytes
        ),
        exec_ttl=c.field(dk, path, "exec_ttl", _duration_in(1.0, _DAY), d.exec_ttl),
        max_execs=c.field(dk, path, "max_execs", _int_in(1, 1_000_000), d.max_execs),
    )
