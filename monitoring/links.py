"""URLs that alerts carry: where the runbook is, which dashboard to open."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .settings import GRAFANA_BASE_URL, RUNBOOK_BASE_URL


@dataclass(frozen=True, slots=True)
class DashboardRef:
    uid: str
    title: str

    @property
    def slug(self) -> str:
        """The slug Grafana derives from the title (any slug works; this one reads well)."""
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


JOB_FAILURES = DashboardRef("step-runner-job-failures", "Step-runner job failures")
SIDECAR = DashboardRef("step-runner-sidecar", "Step-runner sidecar")


def runbook_url(alert: str) -> str:
    return f"{RUNBOOK_BASE_URL}{alert}.md"


def dashboard_url(dashboard: DashboardRef, variables: Sequence[str] = ()) -> str:
    """The dashboard's URL with each named alert label passed as its template variable."""
    url = f"{GRAFANA_BASE_URL.rstrip('/')}/d/{dashboard.uid}/{dashboard.slug}"
    query = "&".join(f"var-{name}={{{{ $labels.{name} }}}}" for name in variables)
    return f"{url}?{query}" if query else url
