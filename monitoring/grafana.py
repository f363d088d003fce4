"""Small builders for Grafana's classic dashboard JSON (schemaVersion 39, Grafana 10.4+):
only built-in panel types, every query on the `${datasource}` variable."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .links import DashboardRef

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
PANEL_TYPES = frozenset({"stat", "timeseries", "table", "bargauge", "gauge"})

Panel = dict[str, Any]
Target = dict[str, Any]


def query(
    expr: str,
    legend: str = "",
    *,
    instant: bool = False,
    exemplar: bool = False,
    table: bool = False,
) -> Target:
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "exemplar": exemplar,
        "format": "table" if table else "time_series",
    }


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: Sequence[Target],
    *,
    width: int,
    height: int,
    defaults: dict[str, Any],
    options: dict[str, Any],
    overrides: Sequence[dict[str, Any]] = (),
) -> Panel:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        # Placeholder until `layout` places it.
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
        "fieldConfig": {"defaults": defaults, "overrides": list(overrides)},
        "options": options,
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
    }


def stat(
    title: str,
    description: str,
    target: Target,
    *,
    unit: str,
    steps: Sequence[tuple[float | None, str]] = ((None, "blue"),),
    decimals: int | None = None,
    width: int = 4,
    mappings: Sequence[dict[str, Any]] = (),
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": thresholds(*steps),
        "mappings": list(mappings),
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return _panel(
        "stat",
        title,
        description,
        [target],
        width=width,
        height=4,
        defaults=defaults,
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none" if target["instant"] else "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
    )


def gauge(
    title: str,
    description: str,
    target: Target,
    *,
    unit: str,
    steps: Sequence[tuple[float | None, str]],
    minimum: float,
    maximum: float,
    width: int = 4,
) -> Panel:
    return _panel(
        "gauge",
        title,
        description,
        [target],
        width=width,
        height=4,
        defaults={
            "unit": unit,
            "min": minimum,
            "max": maximum,
            "color": {"mode": "thresholds"},
            "thresholds": thresholds(*steps),
        },
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showThresholdMarkers": True,
            "showThresholdLabels": False,
        },
    )


def timeseries(
    title: str,
    description: str,
    targets: Sequence[Target],
    *,
    unit: str,
    width: int = 12,
    height: int = 8,
    stack: bool = False,
    colors: dict[str, str] | None = None,
    threshold_lines: Sequence[tuple[float, str]] = (),
) -> Panel:
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 20 if stack else 0,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "line" if threshold_lines else "off"},
    }
    defaults: dict[str, Any] = {
        "unit": unit,
        "min": 0,
        "color": {"mode": "palette-classic"},
        "custom": custom,
        "thresholds": thresholds((None, "transparent"), *threshold_lines),
    }
    overrides = [
        {
            "matcher": {"id": "byName", "options": name},
            "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}],
        }
        for name, color in (colors or {}).items()
    ]
    return _panel(
        "timeseries",
        title,
        description,
        targets,
        width=width,
        height=height,
        defaults=defaults,
        overrides=overrides,
        options={
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
                "calcs": ["mean", "max", "lastNotNull"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    )


def bargauge(title: str, description: str, target: Target, *, unit: str, width: int = 12) -> Panel:
    return _panel(
        "bargauge",
        title,
        description,
        [target],
        width=width,
        height=8,
        defaults={"unit": unit, "min": 0, "color": {"mode": "continuous-BlYlRd"}},
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
        },
    )


def table(
    title: str,
    description: str,
    target: Target,
    *,
    value_name: str,
    width: int = 12,
) -> Panel:
    panel = _panel(
        "table",
        title,
        description,
        [target],
        width=width,
        height=8,
        defaults={"custom": {"align": "auto"}},
        options={"showHeader": True, "sortBy": [{"displayName": value_name, "desc": True}]},
    )
    panel["transformations"] = [
        {
            "id": "organize",
            "options": {"excludeByName": {"Time": True}, "renameByName": {"Value": value_name}},
        }
    ]
    return panel


def layout(rows: Sequence[Sequence[Panel]]) -> list[Panel]:
    """Place rows of panels top to bottom, left to right, and number them from 1."""
    placed: list[Panel] = []
    y = 0
    for row in rows:
        x = 0
        for panel in row:
            grid = panel["gridPos"]
            if x + grid["w"] > GRID_WIDTH:
                raise ValueError(f"row overflows the grid at {panel['title']!r}")
            placed.append({"id": len(placed) + 1, **panel, "gridPos": {**grid, "x": x, "y": y}})
            x += grid["w"]
        y += max(p["gridPos"]["h"] for p in row)
    return placed


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def query_variable(name: str, label: str, definition: str) -> dict[str, Any]:
    """A multi-value label variable whose "All" matches every value, even an empty one."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": definition,
        "query": {"query": definition, "refId": f"{name}-values"},
        "current": {},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
    }


def dashboard(
    ref: DashboardRef,
    *,
    description: str,
    variables: Sequence[dict[str, Any]],
    panels: list[Panel],
    links: Sequence[DashboardRef] = (),
) -> dict[str, Any]:
    return {
        "id": None,
        "uid": ref.uid,
        "title": ref.title,
        "description": description,
        "tags": ["step-runner", "gitlab-runner"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "1m",
        "time": {"from": "now-6h", "to": "now"},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "type": "link",
                "title": link.title,
                "url": f"/d/{link.uid}/{link.slug}",
                "icon": "dashboard",
                "includeVars": True,
                "keepTime": True,
                "targetBlank": False,
                "tooltip": "",
                "asDropdown": False,
                "tags": [],
            }
            for link in links
        ],
        "templating": {"list": list(variables)},
        "panels": panels,
    }


def iter_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target of a dashboard."""
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            yield f"{board['uid']} / {panel['title']} / {t['refId']}", t["expr"]
