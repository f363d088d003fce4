"""The monitoring bundle, generated from this package so nothing can drift:

- rules/step-runner.rules.yml: recording rules and alerts (Prometheus rule-file format);
  add it to `rule_files` of a Prometheus that scrapes the sidecars.
- rules/tests/<group>.test.yml: promtool unit tests, one file per rule group
  (`promtool test rules rules/tests/*.test.yml`).
- dashboards/*.json and dashboards/provisioning/: Grafana dashboards and a file
  provisioning config for them.
- deploy/kubernetes/monitoring/: the same rules as a PrometheusRule and the dashboards
  as ConfigMaps for Grafana's dashboard sidecar (`kubectl apply -f`).
- docs/runbooks/<AlertName>.md: written by hand; each alert's runbook_url points there.

Parameters (SLO target, traffic guard, URLs, severities, the selector of the sidecars'
series) are in `monitoring.settings`, as a mixin's `_config` is.
After changing anything here run `python -m monitoring.build`; `--check` fails when a
committed output is stale, and so does tests/unit/test_monitoring_build.py.
"""
