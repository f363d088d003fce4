"""Writing PromQL selectors of the sidecars' series, and just enough PromQL reading to
list the series a query selects, so a test can check each one exists."""

from __future__ import annotations

import re

from . import settings


def sidecar_matchers(*extra: str) -> str:
    """The matchers of SIDECAR_SELECTOR followed by `extra`, comma separated."""
    selector = (f'{name}="{value}"' for name, value in settings.SIDECAR_SELECTOR.items())
    return ", ".join((*selector, *extra))


def sidecar_series(metric: str, *extra: str) -> str:
    """`metric` as the sidecars export it: with SIDECAR_SELECTOR and `extra` matchers."""
    matchers = sidecar_matchers(*extra)
    return f"{metric}{{{matchers}}}" if matchers else metric


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_COMMENTS = re.compile(r"#[^\n]*")
# A name not glued to a number, a variable or a dot, and not called like a function.
_NAME = re.compile(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "atan2", "inf", "nan", "Inf", "NaN"}
)
_LABEL_VALUES = re.compile(r"^label_values\((?:(.+),\s*)?(\w+)\)$")


def selected_metrics(expr: str) -> set[str]:
    text = _STRINGS.sub('""', expr)
    text = _COMMENTS.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    return {name for name in _NAME.findall(text) if name not in _KEYWORDS}


def variable_metrics(definition: str) -> set[str]:
    """The metrics a Grafana `label_values(selector, label)` variable query reads."""
    match = _LABEL_VALUES.match(definition.strip())
    if match is None:
        raise ValueError(f"not a label_values() query: {definition}")
    return selected_metrics(match.group(1)) if match.group(1) else set()


_SELECTION = re.compile(r"(?<![\w:$.])([a-zA-Z_][\w:]*)(?![\w:])(\{[^{}]*\})?(?!\s*\()")


def selections(expr: str) -> list[tuple[str, str]]:
    """Each (metric, matchers) a query selects by name, matchers without their braces
    ("" when none), so a test can check every selection carries a selector. Reads the
    queries this package writes: strings only ever appear inside matchers."""
    text = _COMMENTS.sub("", expr)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    return [
        (name, matchers[1:-1])
        for name, matchers in _SELECTION.findall(text)
        if name not in _KEYWORDS
    ]
