"""YAML files an operator writes, read with the line of every key, and a schema written
once as frozen dataclasses.

Every problem in a file is collected and reported together, each with its file, line
and key path, so an operator fixes a file in one round trip instead of one error per
restart. Nothing here knows a particular file: `config.py` (the sidecar's) and
`webconfig.py` (exporter-toolkit's) are schemas built from these parts.

A schema is a frozen dataclass whose fields say how they are read (`setting`,
`required`, `collected`, `section`, `optional_section`): the field's name is the key,
so the known keys, the parsing and the resulting type are written once.
`parse_section` walks such a dataclass over loaded YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

KeyPath = tuple[str, ...]
# Line (1-based) of every key in a YAML document, by key path; () is the document.
Marks = Mapping[KeyPath, int]

T = TypeVar("T")
S = TypeVar("S", bound="DataclassInstance")

# A value parser: YAML value in, typed value out, or ValueError with an operator's message.
Parse = Callable[[object], T]
# A parser that reports its own problems (one per entry of a mapping, say) and always
# returns a value.
Collect = Callable[["Collector", object, KeyPath], T]


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
    """Read one YAML file as yaml.safe_load does, parsed once; raise ConfigError when it
    cannot be read or is not valid YAML. An empty file is an empty mapping."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(source, None, "", f"cannot read: {e.strerror or e}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(source, None, "", f"not UTF-8 text: {e.reason}")]) from None
    marks: dict[KeyPath, int] = {}
    duplicates: list[Problem] = []
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = None
            if node is not None:
                # Before constructing: construction flattens merge keys into the node,
                # which would look like duplicates and move marks.
                marks[()] = node.start_mark.line + 1
                _collect_marks(source, node, (), marks, duplicates)
                data = loader.construct_document(node)
        finally:
            loader.dispose()
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


# --- collecting problems ----------------------------------------------------------------


class Collector:
    """Validates one document, collecting every problem instead of stopping at the first.

    `flags` names the command-line flag a key's value came from (its problems are
    reported there); `base_dir` anchors relative file paths written in the file.
    """

    def __init__(
        self,
        source: str,
        marks: Marks | None = None,
        flags: Mapping[KeyPath, str] | None = None,
        *,
        base_dir: Path | None = None,
    ) -> None:
        self.source = source
        self.marks: Marks = marks or {}
        self.flags: Mapping[KeyPath, str] = flags or {}
        self.base_dir = base_dir
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

    def mapping(
        self,
        value: object,
        path: KeyPath,
        known: Sequence[str],
        refused: Mapping[str, str] | None = None,
    ) -> dict[str, object] | None:
        """A section's keys: absent or null is empty, anything but a mapping is a
        problem (None); unknown keys, and `refused` ones with their reason, are problems."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(path, f"expected a mapping, got {show(value)}")
            return None
        out: dict[str, object] = {}
        for key, item in value.items():
            reason = refused.get(str(key)) if refused else None
            if reason is not None:
                self.add((*path, str(key)), reason)
            elif isinstance(key, str) and key in known:
                out[key] = item
            else:
                self.add((*path, str(key)), _unknown_key_message(str(key), known))
        return out

    def check(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _unknown_key_message(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (expected one of: {', '.join(known)})"


# --- the schema: dataclass fields that say how they are read ----------------------------

_KEY = "exporter.yamlfile.key"


@dataclass(frozen=True, slots=True)
class Key:
    """How one dataclass field is read; set by the functions below, never by hand."""

    parse: Parse[Any] | None = None
    collect: Collect[Any] | None = None
    section: type[DataclassInstance] | None = None
    flag: str | None = None  # the command-line flag that overrides it
    help: str = ""  # the flag's help text
    # A path written in a file is relative to that file (like Prometheus' file
    # references); one given by a flag is relative to the working directory.
    file_path: bool = False


def reads(
    parse: Parse[Any], *, flag: str | None = None, help: str = "", file_path: bool = False
) -> Mapping[str, Key]:
    """The metadata of a field read by `parse`, for `dataclasses.field` where the
    shorthands below do not fit (a keyword-only field, say)."""
    return {_KEY: Key(parse=parse, flag=flag, help=help, file_path=file_path)}


def setting(
    default: T, parse: Parse[T], *, flag: str | None = None, help: str = "", file_path: bool = False
) -> T:
    """A key with a default; `parse` reads its value."""
    return field(default=default, metadata=reads(parse, flag=flag, help=help, file_path=file_path))


def required(
    parse: Parse[T], *, flag: str | None = None, help: str = "", file_path: bool = False
) -> T:
    """A key that must be set (in the file, or by its flag)."""
    return cast(T, field(metadata=reads(parse, flag=flag, help=help, file_path=file_path)))


def collected(default_factory: Callable[[], T], collect: Collect[T], *, repr: bool = True) -> T:
    """A key whose parser reports its own problems, for mappings of user-chosen names."""
    key = Key(collect=collect)
    return field(default_factory=default_factory, metadata={_KEY: key}, repr=repr)


def empty_mapping() -> Mapping[str, str]:
    return MappingProxyType({})


def string_mapping(
    expected: str, problem: Callable[[object, object], str | None], *, keep_blank: bool = True
) -> Collect[Mapping[str, str]]:
    """A parser for a mapping of user-chosen names to strings (labels, users, headers):
    `expected` says what it must be; `problem(name, value)` is an entry's message, or
    None when both are valid strings (or the value is null). Entries with a problem are
    left out, and so are blank values unless `keep_blank`. The result is read-only."""

    def collect(c: Collector, value: object, path: KeyPath) -> Mapping[str, str]:
        if value is None:
            return empty_mapping()
        if not isinstance(value, Mapping):
            c.add(path, f"{expected}, got {show(value)}")
            return empty_mapping()
        entries: dict[str, str] = {}
        for name, item in value.items():
            message = problem(name, item)
            if message is not None:
                c.add((*path, str(name)), message)
            elif item or keep_blank:
                entries[cast(str, name)] = cast(str, item)
        return MappingProxyType(entries)

    return collect


def section(cls: type[S]) -> S:
    """A nested mapping read as the dataclass `cls`; absent means all its defaults."""
    return field(default_factory=cls, metadata={_KEY: Key(section=cls)})


def optional_section(cls: type[S]) -> S | None:
    """A nested mapping read as `cls`; absent or null means None."""
    return field(default=None, metadata={_KEY: Key(section=cls)})


def nullable(parse: Parse[T]) -> Parse[T | None]:
    """`parse`, with YAML null read as None."""

    def parse_or_none(value: object) -> T | None:
        return None if value is None else parse(value)

    return parse_or_none


@dataclass(frozen=True, slots=True)
class Check:
    """A rule across keys of one section: `problem` gets the values of `needs` (only
    when each is set or defaulted, never after its own problem) and returns a message,
    reported at `key`, or None."""

    key: str
    needs: tuple[str, ...]
    problem: Callable[..., str | None]


def _keys(cls: type[DataclassInstance]) -> list[tuple[dataclasses.Field[Any], Key]]:
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default(f: dataclasses.Field[Any]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory = f.default_factory
    assert callable(factory), f
    return factory()


def parse_section(c: Collector, cls: type[S], value: object, path: KeyPath = ()) -> S | None:
    """`value` read as the schema dataclass `cls`; None when it is not a mapping or a
    required key is missing or invalid. Every problem is added to `c`."""
    keys = _keys(cls)
    refused: Mapping[str, str] = getattr(cls, "REFUSED", {})
    section = c.mapping(value, path, [f.name for f, _ in keys], refused)
    if section is None:
        return None
    values: dict[str, object] = {}
    complete = True
    for f, key in keys:
        child = (*path, f.name)
        raw = section.get(f.name)
        if key.section is not None:
            optional = f.default is None
            parsed = None if optional and raw is None else parse_section(c, key.section, raw, child)
            # A section that is not a mapping is a problem already: its defaults stand in.
            if parsed is not None or optional:
                values[f.name] = parsed
        elif f.name not in section:
            if _has_default(f):
                values[f.name] = _default(f)
            else:
                c.add(child, _missing(path, f.name, key), located=bool(path))
                complete = False
        elif key.collect is not None:
            values[f.name] = key.collect(c, raw, child)
        else:
            assert key.parse is not None
            try:
                parsed_value = key.parse(raw)
            except ValueError as e:
                c.add(child, str(e))
                complete = complete and _has_default(f)
                continue
            if key.file_path and child not in c.flags:
                parsed_value = _relative_to_file(c.base_dir, parsed_value)
            values[f.name] = parsed_value
    for check in cast(Iterable[Check], getattr(cls, "CHECKS", ())):
        if all(name in values for name in check.needs):
            message = check.problem(*(values[name] for name in check.needs))
            if message is not None:
                c.add((*path, check.key), message)
    if not complete:
        return None
    return cast(Callable[..., S], cls)(**values)


def _missing(path: KeyPath, name: str, key: Key) -> str:
    if path:
        return f"required when {'.'.join(path)} is set (missing {name})"
    if key.flag is not None:
        return f"required: set it in the config file or with {key.flag}"
    return "required"


def _relative_to_file(base_dir: Path | None, value: object) -> object:
    if base_dir is None or not isinstance(value, Path) or value.is_absolute():
        return value
    return base_dir / value


# --- command-line flags -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flag:
    key: str  # dotted key path, e.g. web.listen_address
    flag: str  # e.g. --web.listen-address
    help: str


def flags(cls: type[DataclassInstance], path: KeyPath = ()) -> Iterator[Flag]:
    """The flags that override keys of the schema `cls`, in schema order."""
    for f, key in _keys(cls):
        if key.section is not None:
            yield from flags(key.section, (*path, f.name))
        elif key.flag is not None:
            yield Flag(".".join((*path, f.name)), key.flag, key.help)


def merge_overrides(
    data: Mapping[object, object], overrides: Mapping[str, str], known: Mapping[str, str]
) -> tuple[dict[object, object], dict[KeyPath, str]]:
    """`data` with each override (a dotted key in `known`, which maps keys to their
    flags) in place of the file's value, and the flag each overridden key came from."""
    merged = dict(data)
    flag_of: dict[KeyPath, str] = {}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown override {key!r}; expected one of {', '.join(known)}")
        path = tuple(key.split("."))
        flag_of[path] = known[key]
        if len(path) == 1:
            merged[key] = value
            continue
        section = merged.get(path[0])
        if section is None:
            merged[path[0]] = {path[1]: value}
        elif isinstance(section, Mapping):
            merged[path[0]] = {**section, path[1]: value}
        # else: the section's own type problem is reported and no config results.
    return merged, flag_of
