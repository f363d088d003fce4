"""The schema machinery (exporter/yamlfile.py): YAML read once with the line of every
key, and a frozen dataclass as the one description of a file's keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from exporter.config import FLAGS, OVERRIDE_FLAGS, Config, load_config
from exporter.webconfig import WebServerConfig
from exporter.yamlfile import (
    Check,
    Collector,
    ConfigError,
    KeyPath,
    Problem,
    collected,
    flags,
    nullable,
    optional_section,
    parse_section,
    read_yaml,
    required,
    section,
    setting,
)


def _package(value: object) -> str:
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(f"expected a package name, got {value!r}")
    return value


def _number(value: object) -> int:
    if not isinstance(value, int):
        raise ValueError("expected an integer")
    return value


def _path(value: object) -> Path:
    if not isinstance(value, str):
        raise ValueError("expected a path")
    return Path(value)


def _names(c: Collector, value: object, path: KeyPath) -> tuple[str, ...]:
    if not isinstance(value, list):
        c.add(path, "expected a list")
        return ()
    return tuple(str(v) for v in value)


@dataclass(frozen=True, slots=True)
class Inner:
    low: int = setting(1, _number)
    high: int = setting(2, _number)
    file: Path | None = setting(None, nullable(_path), flag="--inner.file", file_path=True)

    REFUSED: ClassVar[Mapping[str, str]] = {"old": "gone: use low"}
    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check("high", ("low", "high"), lambda lo, hi: "below low" if hi < lo else None),
    )


@dataclass(frozen=True, slots=True)
class Needs:
    name: str = required(_package)


@dataclass(frozen=True, slots=True)
class Root:
    target: str = required(_package, flag="--target", help="where")
    # The shape of `service_package: str | None` (null: any package).
    package: str | None = setting(None, nullable(_package))
    inner: Inner = section(Inner)
    needs: Needs | None = optional_section(Needs)
    names: tuple[str, ...] = collected(tuple, _names)


def parse(data: Any, base_dir: Path | None = None) -> tuple[Root | None, list[Problem]]:
    c = Collector("f.yml", base_dir=base_dir)
    return parse_section(c, Root, data), c.problems


def messages(data: Any) -> list[tuple[str, str]]:
    return [(p.key, p.message) for p in parse(data)[1]]


def test_optional_string_defaults_to_none_and_accepts_null() -> None:
    assert parse({"target": "t"})[0] == Root("t")
    assert parse({"target": "t", "package": None})[0] == Root("t", None)
    assert parse({"target": "t", "package": "step"})[0] == Root("t", "step")
    assert messages({"target": "t", "package": "a b"}) == [
        ("package", "expected a package name, got 'a b'")
    ]


def test_keys_are_the_fields() -> None:
    assert messages({"target": "t", "inner": {"lwo": 1}}) == [
        ("inner.lwo", "unknown key (did you mean 'low'?)")
    ]
    assert messages({"target": "t", "zzz": 1}) == [
        ("zzz", "unknown key (expected one of: target, package, inner, needs, names)")
    ]


def test_required_keys_at_the_top_and_in_a_section() -> None:
    root, problems = parse({"needs": {}})
    assert root is None
    assert [(p.key, p.line, p.message) for p in problems] == [
        ("target", None, "required: set it in the config file or with --target"),
        ("needs.name", None, "required when needs is set (missing name)"),
    ]
    assert parse({"target": "t", "needs": None})[0] == Root("t")


def test_checks_see_set_and_default_values_but_never_an_invalid_one() -> None:
    assert messages({"target": "t", "inner": {"low": 5}}) == [("inner.high", "below low")]
    assert messages({"target": "t", "inner": {"low": "x", "high": 0}}) == [
        ("inner.low", "expected an integer")
    ]


def test_refused_keys_give_their_reason() -> None:
    assert messages({"target": "t", "inner": {"old": 1}}) == [("inner.old", "gone: use low")]


def test_a_section_that_is_not_a_mapping_is_one_problem() -> None:
    assert messages({"target": "t", "inner": [1], "needs": 3, "names": "x"}) == [
        ("inner", "expected a mapping, got a list"),
        ("needs", "expected a mapping, got 3"),
        ("names", "expected a list"),
    ]


def test_file_paths_are_relative_to_the_file_unless_a_flag_gave_them(tmp_path: Path) -> None:
    root, _ = parse({"target": "t", "inner": {"file": "x.pem"}}, base_dir=tmp_path)
    assert root is not None and root.inner.file == tmp_path / "x.pem"
    c = Collector("f.yml", flags={("inner", "file"): "--inner.file"}, base_dir=tmp_path)
    flagged = parse_section(c, Root, {"target": "t", "inner": {"file": "x.pem"}})
    assert flagged is not None and flagged.inner.file == Path("x.pem")


def test_flags_come_from_the_schema() -> None:
    assert [(f.key, f.flag, f.help) for f in flags(Root)] == [
        ("target", "--target", "where"),
        ("inner.file", "--inner.file", ""),
    ]
    assert list(OVERRIDE_FLAGS) == [f.key for f in FLAGS]
    assert dict(OVERRIDE_FLAGS) == {
        "tap": "--tap",
        "listen": "--listen",
        "upstream": "--upstream",
        "web.listen_address": "--web.listen-address",
        "web.config_file": "--web.config.file",
        "log.level": "--log.level",
    }


@pytest.mark.parametrize("schema", [Config, WebServerConfig])
def test_every_field_of_a_schema_says_how_it_is_read(schema: type[Any]) -> None:
    pending = [schema]
    while pending:
        cls = pending.pop()
        for f in dataclasses.fields(cls):
            key = f.metadata.get("exporter.yamlfile.key")
            assert key is not None, f"{cls.__name__}.{f.name}"
            if key.section is not None:
                pending.append(key.section)


def test_yaml_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readers = 0
    real = yaml.reader.Reader.__init__

    def counting(self: yaml.reader.Reader, stream: Any) -> None:
        nonlocal readers
        readers += 1
        real(self, stream)

    monkeypatch.setattr(yaml.reader.Reader, "__init__", counting)
    path = tmp_path / "c.yml"
    path.write_text("listen: unix:///run/a.sock\nupstream: unix:///run/b.sock\n")
    load_config(path)
    assert readers == 1


def test_merge_keys_are_not_duplicates_and_take_their_parents_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text(
        "listen: unix:///run/a.sock\n"
        "upstream: unix:///run/b.sock\n"
        "x-log: &log {level: loud, format: json}\n"
        "log:\n"
        "  <<: *log\n"
        "  format: text\n"
    )
    doc = read_yaml(path)
    # Overriding a merged key is what merge keys are for, not a duplicate.
    assert doc.problems == ()
    assert doc.data["log"] == {"level": "loud", "format": "text"}  # type: ignore[index]
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert [(p.line, p.key) for p in raised.value.problems] == [(3, "x-log"), (4, "log.level")]
