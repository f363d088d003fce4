"""The same rules and dashboards, packaged for Kubernetes and Grafana provisioning."""

from __future__ import annotations

from typing import Any

from .render import to_json
from .settings import GRAFANA_DASHBOARDS_PATH, GRAFANA_FOLDER, PROMETHEUS_URL, SCRAPE_INTERVAL

APP_LABELS = {
    "app.kubernetes.io/name": "step-runner-exporter",
    "app.kubernetes.io/component": "monitoring",
}

PROVIDER_COMMENT = f"""
Grafana file provisioning: copy this file to /etc/grafana/provisioning/dashboards/ and
the repository's dashboards/*.json files to {GRAFANA_DASHBOARDS_PATH}/."""
DATASOURCE_COMMENT = """
Optional: a Prometheus datasource for /etc/grafana/provisioning/datasources/. The
dashboards pick any Prometheus datasource through their `datasource` variable; set
timeInterval to the sidecars' scrape interval, which $__rate_interval is derived from."""


def prometheus_rule(rule_file: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "step-runner-exporter",
            # prometheus-operator selects rules by label: add what your ruleSelector wants.
            "labels": {**APP_LABELS, "role": "alert-rules"},
        },
        "spec": rule_file,
    }


def dashboard_configmap(filename: str, board: dict[str, Any]) -> dict[str, Any]:
    """A ConfigMap Grafana's dashboard sidecar (grafana_dashboard: "1") picks up."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"grafana-dashboard-{board['uid']}",
            "labels": {**APP_LABELS, "grafana_dashboard": "1"},
            "annotations": {"grafana_folder": GRAFANA_FOLDER},
        },
        "data": {filename: to_json(board)},
    }


def dashboard_provider() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "step-runner-exporter",
                "orgId": 1,
                "folder": GRAFANA_FOLDER,
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 60,
                "options": {"path": GRAFANA_DASHBOARDS_PATH, "foldersFromFilesStructure": False},
            }
        ],
    }


def datasource() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "uid": "prometheus",
                "type": "prometheus",
                "access": "proxy",
                "url": PROMETHEUS_URL,
                "isDefault": True,
                "jsonData": {"httpMethod": "POST", "timeInterval": SCRAPE_INTERVAL},
            }
        ],
    }
