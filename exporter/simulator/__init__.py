"""A simulated step-runner and a simulated GitLab Runner, for the demo and the tests."""

from .client import CallResult, JobRecord, Tally, call_once, invoke, run_forever, run_job, run_jobs
from .scenarios import DEFAULT_MIX, SCENARIOS, Expected, Scenario, log_content
from .server import SimStats, SimulatedStepRunner

__all__ = [
    "DEFAULT_MIX",
    "SCENARIOS",
    "CallResult",
    "Expected",
    "JobRecord",
    "Scenario",
    "SimStats",
    "SimulatedStepRunner",
    "Tally",
    "call_once",
    "invoke",
    "log_content",
    "run_forever",
    "run_job",
    "run_jobs",
]
